"""The runs of an ablation: a `Plan` (the grid's base overrides, the shared data and backbones, the
budget and the tasks) resolves a cell into its model and stage configs, checks and caches what
the cells need, and runs one cell with one seed through align → sft → eval."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from vlmforge import runtime
from vlmforge.config import ModelConfig, TrainConfig, align_defaults, from_dict, sft_defaults
from vlmforge.recipes.ablate.grids import Budget, Cell
from vlmforge.recipes.ablate.tasks import BenchTask, FileTask, SyntheticTask, Task
from vlmforge.recipes.pipeline import SyntheticSetup


def _merge(*dicts: dict | None) -> dict:
    out: dict = {}
    for d in dicts:
        out.update(d or {})
    return out


@dataclass
class Plan:
    """What every run of an ablation shares."""

    base: dict  # the grid's overrides every cell starts from (model / align / sft)
    shared: SyntheticSetup
    budget: Budget
    tasks: dict[str, Task]
    cache: str | None = None  # the feature store every run reads, once filled

    def resolve(self, cell: Cell) -> tuple[ModelConfig, TrainConfig, TrainConfig]:
        """The model config and the two stage configs a cell trains with (data, output, seed unset)."""
        bb = self.shared.large if cell.lm == "large" else self.shared.small
        model = _merge(
            {"vision": bb["vision"], "lm": bb["lm"], "tokenizer": bb["lm"]}, self.base.get("model"), cell.model
        )
        bs = {"batch_size": self.budget.batch_size} if self.budget.batch_size is not None else {}
        # a cell runs on the threads of its process (one in a pool worker), not the demo's two
        align = dataclasses.replace(align_defaults(), threads=None)
        sft = dataclasses.replace(sft_defaults(), threads=None)
        align = dataclasses.replace(align, **_merge(bs, self.budget.align, self.base.get("align"), cell.align))
        sft = dataclasses.replace(sft, **_merge(bs, self.budget.sft, self.base.get("sft"), cell.sft))
        return from_dict(ModelConfig, model), align, sft

    def fingerprint(self, cell: Cell) -> str:
        """Cells of different groups that resolve to the same configuration (e.g. every group's
        baseline) share one run per seed."""
        configs = [dataclasses.asdict(c) for c in self.resolve(cell)]
        return hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def check(self, cells: list[Cell]) -> None:
        """Build each distinct cell's model once before anything trains, so that a cell that cannot
        be built (e.g. a connector that does not fit the encoder's tokens) fails the ablation at once,
        naming the cell, instead of after hours of other runs."""
        from vlmforge.model.vlm import VLM

        seen = set()
        for cell in cells:
            m = self.resolve(cell)[0]
            key = json.dumps(dataclasses.asdict(m), sort_keys=True)
            if key not in seen:
                seen.add(key)
                try:
                    VLM.from_backbones(m)
                except ValueError as e:
                    raise ValueError(f"cell {cell.name!r}: {e}") from e

    def fill_cache(self, cells: list[Cell], store: Path) -> None:
        """Encode every training image once per encoder setting of `cells` (splitting, resize, pooled
        token…) into one feature store that all their runs read (the Llama3-V recipe); images already
        in the store are skipped, so a resumed ablation encodes nothing again."""
        from vlmforge.cache.build import build_for

        done = set()
        for cell in cells:
            m = self.resolve(cell)[0]
            key = (
                m.vision,
                m.feature_layer,
                m.vision_pooled,
                m.resize,
                m.image_size,
                m.split_grid,
                m.slicing,
                m.max_slices,
                m.min_side,
                m.max_side,
            )
            if key not in done:
                done.add(key)
                build_for(store, m, self.shared.align_data + self.shared.sft_data, self.budget.cache_dtype)
        self.cache = str(store)

    def qa_file(self, task: Task) -> str | None:
        """The QA file a task is scored on (None for a benchmark)."""
        if isinstance(task, SyntheticTask):
            return self.shared.qa(task.synthetic)
        return task.file if isinstance(task, FileTask) else None


def run(plan: Plan, cell: Cell, seed: int, run_dir: Path) -> dict:
    """One cell with one seed: align → sft → eval; its scores, parameters, tokens and time."""
    from vlmforge.model.vlm import VLM
    from vlmforge.recipes.pipeline import align_then_sft
    from vlmforge.train.stages import apply_stage

    model_cfg, align, sft = plan.resolve(cell)
    t0 = time.time()
    store = {"cache": plan.cache, "cache_dtype": plan.budget.cache_dtype} if plan.cache else {}
    shared = plan.shared
    model_dir = align_then_sft(
        model_cfg, align, sft, run_dir, shared.align_data, shared.sft_data, seed=seed, save_every=10**9, **store
    )
    summaries = [
        json.loads((run_dir / s / "summary.json").read_text())
        for s in ("align", "sft")
        if (run_dir / s / "summary.json").exists()
    ]
    # the stages' own clocks, which a resumed run carries on (this process may have trained less)
    seconds = sum(s["elapsed"] for s in summaries) if summaries else time.time() - t0
    model = VLM.from_pretrained(model_dir)
    apply_stage(model, sft)  # what the sft stage trained
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.eval()
    scores = _score(plan, model, str(model_dir), run_dir)
    tokens = sum(s["tokens"] for s in summaries)
    return {
        "scores": scores,
        "trainable_params": trainable,
        "total_params": params,
        "visual_tokens_per_image": _mean_visual_tokens(plan, model),
        "train_seconds": round(seconds, 1),
        "tokens_per_s": round(tokens / max(sum(s["elapsed"] for s in summaries), 1e-9), 1),
    }


def run_one_thread(plan: Plan, cell: Cell, seed: int, run_dir: Path) -> dict:
    """`run` in a pool worker: one torch thread each, so that parallel runs share the cores."""
    with runtime.threads(1):
        return run(plan, cell, seed, run_dir)


def _score(plan: Plan, model, model_dir: str, run_dir: Path) -> dict:
    """Each task's score in [0, 1] (CIDEr-D may exceed 1)."""
    from vlmforge.eval.benchmarks import QAFile
    from vlmforge.eval.harness import LocalGenerator, run_benchmark
    from vlmforge.infer.engine import Engine

    engine, scores = Engine(model), {}  # one engine for every task of this model
    for name, task in plan.tasks.items():
        if isinstance(task, BenchTask):
            gen = LocalGenerator(model, model_dir, task.max_new_tokens, engine)
            report = run_benchmark(task.bench, gen, task.root, run_dir / "eval", task.split, task.limit, batch_size=16)
        else:  # a QA file: the synthetic held-out questions or the grid's own
            gen = LocalGenerator(model, model_dir, 16, engine)
            limit = task.limit if isinstance(task, FileTask) else None
            report = run_benchmark(QAFile(plan.qa_file(task)), gen, None, None, limit=limit, batch_size=64)
        scores[name] = report["score"]
    return scores


def _mean_visual_tokens(plan: Plan, model) -> float:
    """Visual tokens per image in the LM's sequence, averaged over the images of the QA-file tasks
    (they vary with adaptive slicing and native resolution); the model's own figure otherwise."""
    from PIL import Image

    from vlmforge.data.formats import load_records

    files = [f for f in map(plan.qa_file, plan.tasks.values()) if f]
    paths = {p for f in files for r in load_records(f) for p in r.images}
    if not model.processor.variable or not paths:
        return model.tokens_per_image
    sizes = []
    for p in sorted(paths):
        with Image.open(p) as im:
            sizes.append(im.size)
    return round(sum(model.image_token_count(s) for s in sizes) / len(sizes), 1)
