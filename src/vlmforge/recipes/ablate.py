"""`vlmforge ablate`: the Idefics2 comparisons (Laurençon et al. 2024, "What matters when building
vision-language models?"), re-run with several seeds on the built-in synthetic tasks or on any
eval data: vlmforge/LLaVA QA files and the registered benchmarks of `vlmforge eval --bench`.

A grid is groups of cells; a cell is a set of overrides of the model and of the two training
stages (align, sft). Every cell of every group runs `seeds` times (seed s: same data, different
initialisation and order) through the same align → sft → eval pipeline as `vlmforge demo`, on
shared data and backbones made once per output folder. After every run `results.json` is written
(atomically), so an interrupted ablation resumes with the runs it has not finished; then
`results.md` (mean ± 95% t-interval per task, parameters, visual tokens per image, train time,
tokens/s) and `results.png` are redrawn from it.

Built-in grid `resolution` (LLaVA-UHD, Idefics2): on the synthetic `words` task (a line of 2-4
words on a 256 x 64 canvas, a word per line on 64 x 192; scored as `words`, which word is k-th,
`letters`, how many letters it has, and `count`, how many words), the whole image padded to a
square vs at its native aspect, and no slicing vs a fixed 2 x 2 grid vs adaptive slicing (at most
4 slices), each with its mean visual tokens per held-out image. Its encoder is first taught to read
the words drawn large (budget `read`: `pretrain --reading` on the words' glyphs).

Built-in grid `idefics2`: (1) fully autoregressive vs cross-attention, each with the LM frozen
and with LoRA; (2) connectors: linear, mlp, attention, perceiver 64 and 16, pixel shuffle;
(3) image splitting off vs on; (4) a smaller vs a larger LM (twice as deep, same tokenizer and
encoder). The base every cell starts from is the demo's model (mlp connector with the pooled
token, images squashed, the LM tuned in full). `--quick true` shortens sft (600 steps instead of
the demo's 1,500), not the data, the grid or the seeds. Every run trains from one feature store,
filled once per encoder setting. `--jobs N` runs N cells at once, each in its own process on one CPU thread.

Tasks (what every run is scored on): `shapes` and `text` (held-out synthetic questions, the
default), a QA file (JSON/JSONL, scored by normalised exact match as `vlmforge eval --data`), or
a benchmark name (`textvqa`, `docvqa`, …, read from `--data-root` and scored by its community
metric as `vlmforge eval --bench`). A grid YAML may name its tasks (`eval:`) and its own training
data (`data: {align: [...], sft: [...]}`); paths in a YAML are relative to the YAML's folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import yaml

from vlmforge import runtime
from vlmforge.config import ModelConfig, TinySpec, align_defaults, from_dict, save_json, sft_defaults

# The paper's figures, kept for the report (Idefics2, Tables 2-4 and section 3.3).
PAPER = {
    "architecture": "FA + LoRA 69.5 vs CA + LoRA 67.3 (avg. score, Table 3)",
    "connector": "perceiver 60.3 vs mapping network 51.8 vs linear 44.5 (Table 4: pooling + projection)",
    "splitting": "TextVQA 70.4 -> 73.0, DocVQA 67.3 -> 74.0 with image splitting",
    "lm": "a better LM backbone gives a better VLM (Table 2)",
    "tower": "frozen backbones 60.3 vs LoRA on both 69.5; unfreezing everything diverged (section 3.3)",
}

_LORA = {"lm_mode": "lora"}
_CA = {"architecture": "cross_attention", "xattn_every": 1}
IDEFICS2 = {
    "name": "idefics2",
    "seeds": 3,
    # the demo's model and stages: mlp connector with the pooled token, images squashed, LM tuned in full
    "base": {"model": {"connector": "mlp", "vision_pooled": True, "resize": "squash"}, "sft": {"lm_mode": "full"}},
    "groups": {
        "architecture": [
            {"name": "FA, LM frozen", "sft": {"lm_mode": "frozen"}},
            {"name": "FA + LoRA", "sft": _LORA},
            {"name": "CA, LM frozen", "model": _CA, "sft": {"lm_mode": "frozen"}},
            {"name": "CA + LoRA", "model": _CA, "sft": _LORA},
        ],
        "connector": [
            {"name": "linear", "model": {"connector": "linear"}},
            {"name": "mlp", "model": {"connector": "mlp"}},
            {"name": "attention", "model": {"connector": "attention"}},
            {"name": "perceiver 64", "model": {"connector": "perceiver", "connector_latents": 64}},
            {"name": "perceiver 16", "model": {"connector": "perceiver", "connector_latents": 16}},
            # a pooled token is no patch: pixel shuffle takes the 4 x 4 map alone
            {"name": "pixel shuffle", "model": {"connector": "pixel_shuffle", "vision_pooled": False}},
        ],
        "splitting": [
            {"name": "no splitting", "model": {"split_grid": 0}},
            {"name": "2x2 + whole", "model": {"split_grid": 2}},
        ],
        "tower": [  # the sft stage; a trained tower reads pixels, not the feature store
            {"name": "backbones frozen", "sft": {"lm_mode": "frozen"}},
            {"name": "LoRA on both", "sft": {"lm_mode": "lora", "vision_mode": "lora"}},
            {"name": "full unfreezing", "sft": {"lm_mode": "full", "vision_mode": "full"}},
        ],
        "lm": [
            {"name": "smaller LM", "lm": "small"},
            {"name": "larger LM", "lm": "large"},
        ],
    },
}
RESOLUTION = {
    "name": "resolution",
    "seeds": 3,
    "eval": ["words", "letters", "count"],
    # the encoder learns to read the words' glyphs first (`pretrain --reading`): without it, no cell
    # left the words prior, and resolution had nothing to buy
    "budget": {"n_shapes": 0, "n_text": 0, "n_words": 1500, "n_test": 150, "read": True},
    "base": {"model": {"connector": "mlp", "vision_pooled": True, "resize": "pad"}, "sft": {"lm_mode": "full"}},
    "groups": {
        "resolution": [
            {"name": "pad to square", "model": {}},
            {"name": "native aspect", "model": {"resize": "native"}},
            {"name": "fixed 2x2 + whole", "model": {"split_grid": 2}},
            {"name": "adaptive <= 4 + whole", "model": {"slicing": "adaptive", "max_slices": 4}},
        ],
    },
}
GRIDS = {"idefics2": IDEFICS2, "resolution": RESOLUTION}

# Budgets: data sizes, backbone specs and stage overrides, full (the demo's stages) and quick.
# Every run trains from one feature store (`cache_dtype`; None re-encodes the images every step).
FULL = {
    "n_shapes": 3000,
    "n_text": 500,
    "n_test": 300,
    "spec": {},
    "large_spec": {"lm_layers": 4},
    "align": {},
    "sft": {},
    "cache_dtype": "fp16",
}
# quick: 600 sft steps, an image's questions batched together sharing its tokens (`group_by_image`)
QUICK = {
    "n_shapes": 3000,
    "n_text": 500,
    "n_test": 200,
    "spec": {},
    "large_spec": {"lm_layers": 4},
    "align": {},
    "sft": {"max_steps": 600, "group_by_image": True},
    "cache_dtype": "fp16",
}

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval (0 for a single value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    t = T975.get(len(values) - 1, 1.96)
    return m, t * statistics.stdev(values) / math.sqrt(len(values))


SYNTHETIC_TASKS = ("shapes", "text")  # the default tasks
WORDS_TASKS = ("words", "letters", "count")  # the words task's question kinds (a budget with n_words makes them)


def parse_tasks(items, base: Path | None = None, data_root: str | None = None, limit: int | None = None) -> dict:
    """Eval tasks from `--eval` words or a grid's `eval:` → {name: spec}.

    A word is `shapes` / `text` (synthetic), a registered benchmark name (read from `data_root`),
    or a QA file path; `NAME=WORD` names the column. A YAML mapping may also give
    `{bench: NAME, root: DIR, split: S, limit: N}` or `{file: PATH, limit: N}`.
    """
    from vlmforge.eval.benchmarks import BENCHMARKS

    if not items:
        return {t: {"synthetic": t} for t in SYNTHETIC_TASKS}
    if isinstance(items, str):
        items = [items]
    pairs = (
        list(items.items())
        if isinstance(items, dict)
        else [tuple(w.split("=", 1)) if "=" in w else (None, w) for w in map(str, items)]
    )
    tasks = {}
    for name, spec in pairs:
        if isinstance(spec, dict):
            spec = dict(spec)
        elif spec in SYNTHETIC_TASKS + WORDS_TASKS:
            spec = {"synthetic": spec}
        elif spec.lower() in BENCHMARKS:
            spec = {"bench": spec.lower()}
        else:
            spec = {"file": spec}
        if "file" in spec:
            path = Path(spec["file"])
            spec["file"] = str(path.absolute() if base is None else base / path)
        if "bench" in spec:
            spec.setdefault("root", data_root)
            if spec["root"] is None:
                raise ValueError(f"eval task {spec['bench']!r} is a benchmark: give --data-root (or `root:`)")
            root = Path(spec["root"])
            spec["root"] = str(root.absolute() if base is None else base / root)
        if limit is not None and "synthetic" not in spec:
            spec.setdefault("limit", limit)
        if not {"synthetic", "file", "bench"} & set(spec):
            raise ValueError(f"eval task {name!r}: give `file:` or `bench:` ({spec})")
        name = name or spec.get("synthetic") or spec.get("bench") or Path(spec["file"]).stem
        if name in tasks:
            raise ValueError(f"eval task {name!r} is given twice")
        tasks[name] = spec
    return tasks


def check_tasks(tasks: dict) -> None:
    """Fail before any training when an eval task cannot be read."""
    from vlmforge.data.formats import load_records
    from vlmforge.eval.benchmarks import get_benchmark

    for name, spec in tasks.items():
        if "file" in spec:
            if not Path(spec["file"]).is_file():
                raise FileNotFoundError(f"eval task {name!r}: no file {spec['file']}")
            load_records(spec["file"])  # validates every record, naming the file and the row
        elif "bench" in spec:
            get_benchmark(spec["bench"]).rows(spec["root"], spec.get("split"))


def load_grid(grid: str) -> dict:
    from vlmforge.data.formats import is_source

    if grid in GRIDS:
        return GRIDS[grid]
    path = Path(grid)
    if not path.is_file():
        raise FileNotFoundError(f"grid {grid!r}: neither a built-in grid ({', '.join(GRIDS)}) nor a YAML file")
    try:
        g = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: malformed YAML ({e})") from e
    if not isinstance(g, dict) or not isinstance(g.get("groups"), dict) or not g["groups"]:
        raise ValueError(f"{path}: a grid needs `groups:` mapping group names to lists of cells")
    for group, cells in g["groups"].items():
        for cell in cells:
            if not isinstance(cell, dict) or "name" not in cell:
                raise ValueError(f"{path}: every cell of group {group!r} needs a name")
            unknown = set(cell) - {"name", "model", "align", "sft", "lm"}
            if unknown:
                raise ValueError(f"{path}: cell {cell['name']!r} has unknown keys {sorted(unknown)}")
    base = path.resolve().parent
    if g.get("eval"):
        g["eval"] = parse_tasks(g["eval"], base)
    if g.get("data") is not None:
        data = g["data"]
        if not isinstance(data, dict) or not data.get("sft") or set(data) - {"align", "sft"}:
            raise ValueError(f"{path}: `data:` needs `sft:` (and optionally `align:`) lists of files")
        g["data"] = {
            k: [f if is_source(f) else str(base / f) for f in ([v] if isinstance(v, str) else v)]
            for k, v in data.items()
        }
        for f in (f for v in g["data"].values() for f in v):
            if not Path(f).is_file() and not is_source(f):
                raise FileNotFoundError(f"{path}: training data {f} does not exist")
    return g


def _merge(*dicts: dict | None) -> dict:
    out: dict = {}
    for d in dicts:
        out.update(d or {})
    return out


def _prepare(out: Path, budget: dict, need_large: bool, data: dict | None) -> dict:
    """Shared data and backbones (made once; reused on resume)."""
    from vlmforge.recipes.pipeline import synthetic_setup

    spec = dataclasses.replace(TinySpec(), **budget["spec"])
    large = dataclasses.replace(spec, **budget["large_spec"]) if need_large else None
    return synthetic_setup(
        out,
        budget["n_shapes"],
        budget["n_text"],
        budget["n_test"],
        spec,
        large,
        data,
        budget.get("n_words", 0),
        budget.get("read", False),
    )


def _resolve(cell: dict, base: dict, shared: dict, budget: dict):
    """The model config and the two stage configs a cell trains with (data, output, seed unset)."""
    bb = shared[cell.get("lm", "small")]
    model_cfg = from_dict(
        ModelConfig,
        _merge({"vision": bb["vision"], "lm": bb["lm"], "tokenizer": bb["lm"]}, base.get("model"), cell.get("model")),
    )
    bs = {"batch_size": budget["batch_size"]} if "batch_size" in budget else {}
    # a cell runs on the threads of its process (one in a pool worker), not the demo's two
    align = dataclasses.replace(align_defaults(), threads=None)
    sft = dataclasses.replace(sft_defaults(), threads=None)
    align = dataclasses.replace(align, **_merge(bs, budget["align"], base.get("align"), cell.get("align")))
    sft = dataclasses.replace(sft, **_merge(bs, budget["sft"], base.get("sft"), cell.get("sft")))
    return model_cfg, align, sft


def fingerprint(cell: dict, base: dict, shared: dict, budget: dict) -> str:
    """Cells of different groups that resolve to the same configuration (e.g. every group's
    baseline) share one run per seed."""
    configs = [dataclasses.asdict(c) for c in _resolve(cell, base, shared, budget)]
    return hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_cells(cells: list[dict], base: dict, shared: dict, budget: dict) -> None:
    """Build each distinct cell's model once before anything trains, so that a cell that cannot
    be built (e.g. a connector that does not fit the encoder's tokens) fails the ablation at once,
    naming the cell, instead of after hours of other runs."""
    from vlmforge.model.vlm import VLM

    seen = set()
    for cell in cells:
        m = _resolve(cell, base, shared, budget)[0]
        key = json.dumps(dataclasses.asdict(m), sort_keys=True)
        if key not in seen:
            seen.add(key)
            try:
                VLM.from_backbones(m)
            except ValueError as e:
                raise ValueError(f"cell {cell['name']!r}: {e}") from e


def _fill_cache(cells: list[dict], base: dict, shared: dict, budget: dict, store: Path) -> None:
    """Encode every training image once per encoder setting of `cells` (splitting, resize, pooled
    token…) into one feature store that all their runs read (the Llama3-V recipe); images already
    in the store are skipped, so a resumed ablation encodes nothing again."""
    from vlmforge.cache.build import build_for

    done = set()
    for cell in cells:
        m = _resolve(cell, base, shared, budget)[0]
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
            build_for(store, m, shared["align_data"] + shared["sft_data"], budget["cache_dtype"])


def _score(model, model_dir: str, tasks: dict, shared: dict, run_dir: Path) -> dict:
    """Each task's score in [0, 1] (CIDEr-D may exceed 1)."""
    from vlmforge.eval.benchmarks import QAFile
    from vlmforge.eval.harness import LocalGenerator, run_benchmark
    from vlmforge.infer.engine import Engine

    engine, scores = Engine(model), {}  # one engine for every task of this model
    for name, spec in tasks.items():
        if "bench" in spec:
            gen = LocalGenerator(model, model_dir, spec.get("max_new_tokens", 32), engine)
            report = run_benchmark(
                spec["bench"], gen, spec["root"], run_dir / "eval", spec.get("split"), spec.get("limit"), batch_size=16
            )
        else:  # a QA file: the synthetic held-out questions or the grid's own
            qa = shared[f"test_{spec['synthetic']}_qa"] if "synthetic" in spec else spec["file"]
            gen = LocalGenerator(model, model_dir, 16, engine)
            report = run_benchmark(QAFile(qa), gen, None, None, limit=spec.get("limit"), batch_size=64)
        scores[name] = report["score"]
    return scores


def _run(cell: dict, base: dict, shared: dict, budget: dict, seed: int, run_dir: Path, tasks: dict) -> dict:
    from vlmforge.model.vlm import VLM
    from vlmforge.recipes.pipeline import align_then_sft
    from vlmforge.train.stages import apply_stage

    model_cfg, align, sft = _resolve(cell, base, shared, budget)
    t0 = time.time()
    store = {"cache": shared["cache"], "cache_dtype": budget["cache_dtype"]} if shared.get("cache") else {}
    model_dir = align_then_sft(
        model_cfg, align, sft, run_dir, shared["align_data"], shared["sft_data"], seed=seed, save_every=10**9, **store
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
    scores = _score(model, str(model_dir), tasks, shared, run_dir)
    tokens = sum(s["tokens"] for s in summaries)
    return {
        "scores": scores,
        "trainable_params": trainable,
        "total_params": params,
        "visual_tokens_per_image": _mean_visual_tokens(model, tasks, shared),
        "train_seconds": round(seconds, 1),
        "tokens_per_s": round(tokens / max(sum(s["elapsed"] for s in summaries), 1e-9), 1),
    }


def _mean_visual_tokens(model, tasks: dict, shared: dict) -> float:
    """Visual tokens per image in the LM's sequence, averaged over the images of the QA-file tasks
    (they vary with adaptive slicing and native resolution); the model's own figure otherwise."""
    from PIL import Image

    from vlmforge.data.formats import load_records

    files = [
        shared[f"test_{s['synthetic']}_qa"] if "synthetic" in s else s["file"]
        for s in tasks.values()
        if "bench" not in s
    ]
    paths = {p for f in files for r in load_records(f) for p in r.images}
    if not model.processor.variable or not paths:
        return model.tokens_per_image
    sizes = []
    for p in sorted(paths):
        with Image.open(p) as im:
            sizes.append(im.size)
    return round(sum(model.image_token_count(s) for s in sizes) / len(sizes), 1)


def _run_one_thread(*args) -> dict:
    """`_run` in a pool worker: one torch thread each, so that parallel runs share the cores."""
    with runtime.threads(1):
        return _run(*args)


def ablate(
    grid: str = "idefics2",
    out: str = "runs/ablate",
    quick: bool = False,
    seeds: int | None = None,
    jobs: int = 0,
    eval: list[str] | None = None,
    data_root: str | None = None,
    limit: int | None = None,
    groups: list[str] | None = None,
) -> dict:
    """Re-run the Idefics2 design comparisons, several seeds per cell, on the synthetic tasks or any eval data.

    Writes OUT/results.md (mean ± 95% CI per task, parameters, visual tokens, train time,
    tokens/s), OUT/results.png and OUT/results.json; finished runs are not re-run.

    Args:
        grid: a built-in grid (idefics2; resolution: pad vs native aspect, no vs fixed vs adaptive
            slicing, on the words task) or a YAML file (groups of cells of model/align/sft overrides).
        out: output folder.
        quick: small data and budgets (same grid and seeds).
        seeds: seeds per cell (default: the grid's, 3 for idefics2).
        jobs: cells run at once, each in its own process on one CPU thread (0: one per CPU core).
        eval: tasks to score every run on (default: the grid's, else shapes text): `shapes`, `text`,
            `words` / `letters` / `count` (with a grid whose budget makes the words data), a benchmark
            name (textvqa, docvqa, ...; needs --data-root), or a QA file; NAME=... names a column.
        data_root: folder holding one folder per benchmark (as `vlmforge eval --bench`).
        limit: only the first N questions of each file or benchmark task.
        groups: run only these groups of the grid (e.g. `tower`); default all.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm import tqdm

    g = load_grid(grid)
    if groups:
        unknown = sorted(set(groups) - set(g["groups"]))
        if unknown:
            raise ValueError(
                f"grid {grid!r} has no group {', '.join(map(repr, unknown))} (its groups: {', '.join(g['groups'])})"
            )
        g = {**g, "groups": {k: v for k, v in g["groups"].items() if k in groups}}
    tasks = parse_tasks(eval or g.get("eval"), None, data_root, limit)
    check_tasks(tasks)
    budget = _merge(QUICK if quick else FULL, g.get("budget"))
    if any(s.get("synthetic") in WORDS_TASKS for s in tasks.values()) and not budget.get("n_words"):
        raise ValueError(
            "eval tasks words, letters and count need the words data: a grid whose budget sets "
            "n_words (e.g. the built-in grid `resolution`)"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_seeds = seeds or int(g.get("seeds", 3))
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {"runs": {}}
    old_tasks = results.get("tasks", {t: {"synthetic": t} for t in SYNTHETIC_TASKS})
    if results.get("grid", g) != g or results.get("quick", quick) != quick or (results["runs"] and old_tasks != tasks):
        raise ValueError(f"{res_path} holds results of another grid, budget or eval tasks; use a new --out")
    results.update(grid=g, quick=quick, budget=budget, seeds=n_seeds, tasks=tasks)
    need_large = any(c.get("lm") == "large" for cells in g["groups"].values() for c in cells)
    shared = _prepare(out, budget, need_large, g.get("data"))
    base = g.get("base", {})
    done_by_config = {(r.get("config"), r["seed"]): k for k, r in results["runs"].items()}
    todo, aliases = [], {}  # aliases: the first key of a (config, seed) -> the other cells' keys
    for group, cells in g["groups"].items():
        for cell in cells:
            fp = fingerprint(cell, base, shared, budget)
            for seed in range(n_seeds):
                key = f"{group}/{cell['name']}/seed{seed}"
                if key in results["runs"]:
                    continue
                first = done_by_config.get((fp, seed))
                if first in results["runs"]:  # the same configuration already ran for another cell
                    same = {"group": group, "cell": cell["name"], "same_as": first}
                    results["runs"][key] = {**results["runs"][first], **same}
                    continue
                if first is not None:
                    aliases[first].append((key, group, cell))
                    continue
                done_by_config[(fp, seed)] = key
                aliases[key] = []
                safe = cell["name"].replace(" ", "_").replace("/", "_")
                todo.append((key, group, cell, seed, fp, out / "runs" / group / safe / f"seed{seed}"))
    save_json(results, res_path)
    _check_cells([t[2] for t in todo], base, shared, budget)
    if budget.get("cache_dtype") and todo:
        shared["cache"] = str(out / "cache")
        _fill_cache([t[2] for t in todo], base, shared, budget, out / "cache")
    bar = tqdm(total=len(todo), desc="ablate", unit="run")

    def record(key, group, cell, seed, fp, run_dir, result):
        results["runs"][key] = {"group": group, "cell": cell["name"], "seed": seed, "config": fp, **result}
        for other, other_group, other_cell in aliases[key]:
            results["runs"][other] = {
                **results["runs"][key],
                "group": other_group,
                "cell": other_cell["name"],
                "same_as": key,
            }
        save_json(results, res_path)
        shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints and models of finished runs are not kept
        bar.update(1)
        bar.set_postfix_str(key)

    jobs = jobs or os.cpu_count() or 1
    if jobs <= 1:
        for key, group, cell, seed, fp, run_dir in todo:
            record(key, group, cell, seed, fp, run_dir, _run(cell, base, shared, budget, seed, run_dir, tasks))
    else:
        ctx = multiprocessing.get_context("spawn")
        with runtime.progress_bars(False):  # inherited by the workers: one progress bar, the parent's
            with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=runtime.die_with_parent) as pool:
                running = {pool.submit(_run_one_thread, t[2], base, shared, budget, t[3], t[5], tasks): t for t in todo}
                try:
                    while running:
                        finished, _ = wait(running, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            record(*running.pop(fut), fut.result())  # a failed run raises here
                except BaseException:  # finished runs are saved; queued ones are not started
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    bar.close()
    save_json(results, res_path)
    write_report(results, out)
    print((out / "results.md").read_text())
    return results


def task_names(results: dict) -> list[str]:
    return list(results.get("tasks") or SYNTHETIC_TASKS)


def summarize(results: dict) -> dict:
    """{group: [{cell, n, scores: {task: (mean, ci)}, …}]} in grid order, scores x100."""
    table = {}
    for group, cells in results["grid"]["groups"].items():
        rows = []
        for cell in cells:
            runs = [r for r in results["runs"].values() if r["group"] == group and r["cell"] == cell["name"]]
            if not runs:
                continue
            row = {"cell": cell["name"], "n": len(runs)}
            row["scores"] = {t: mean_ci([100 * r["scores"][t] for r in runs]) for t in task_names(results)}
            for k in ("trainable_params", "total_params", "visual_tokens_per_image"):
                row[k] = runs[0][k]
            row["train_seconds"] = statistics.fmean(r["train_seconds"] for r in runs)
            row["tokens_per_s"] = statistics.fmean(r["tokens_per_s"] for r in runs)
            rows.append(row)
        table[group] = rows
    return table


def write_report(results: dict, out: Path) -> None:
    from vlmforge.io import atomic_write_text

    table = summarize(results)
    names = task_names(results)
    lines = [
        f"# vlmforge ablate: {results['grid'].get('name', 'grid')}{' (quick)' if results['quick'] else ''}",
        "",
        f"Scores (x100), mean ± 95% t-interval over {results['seeds']} seeds, on: "
        + "; ".join(f"`{t}` ({_describe_task(s)})" for t, s in (results.get("tasks") or parse_tasks(None)).items())
        + f". Budget {json.dumps(results['budget'])}.",
        "",
    ]
    for group, rows in table.items():
        lines += [f"## {group}", ""]
        if group in PAPER:
            lines += [f"Paper: {PAPER[group]}.", ""]
        head = ["cell", *names, "trainable", "total", "visual tokens/image", "train s", "tokens/s", "seeds"]
        lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for r in rows:
            cols = " | ".join(f"{r['scores'][t][0]:.1f} ± {r['scores'][t][1]:.1f}" for t in names)
            lines.append(
                f"| {r['cell']} | {cols} "
                f"| {r['trainable_params']:,} | {r['total_params']:,} | {r['visual_tokens_per_image']} "
                f"| {r['train_seconds']:.0f} | {r['tokens_per_s']:.0f} | {r['n']} |"
            )
        lines.append("")
    atomic_write_text(out / "results.md", "\n".join(lines))
    _plot(table, out / "results.png")
    from vlmforge.eval.html import from_markdown, image_tag, write_page

    write_page(out / "results.html", lines[0][2:], from_markdown("\n".join(lines)) + [image_tag(out / "results.png")])


def _describe_task(spec: dict) -> str:
    if "synthetic" in spec:
        return "held-out synthetic questions, exact match"
    limit = f", first {spec['limit']}" if spec.get("limit") else ""
    if "file" in spec:
        return f"{spec['file']}, normalised exact match{limit}"
    from vlmforge.eval.benchmarks import get_benchmark

    return f"benchmark {spec['bench']} from {spec['root']}, {get_benchmark(spec['bench']).metric}{limit}"


def _plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g, rows in table.items() if rows]
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        rows = table[group]
        x = range(len(rows))
        names = list(rows[0]["scores"])
        width = 0.8 / len(names)
        for k, task in enumerate(names):
            off = (k - (len(names) - 1) / 2) * width
            ax.bar(
                [i + off for i in x],
                [r["scores"][task][0] for r in rows],
                width,
                yerr=[r["scores"][task][1] for r in rows],
                label=task,
                capsize=3,
            )
        ax.set_xticks(list(x), [r["cell"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(group)
        ax.set_ylabel("score (x100)")
        ax.set_ylim(0, max(100, *(r["scores"][t][0] + r["scores"][t][1] for r in rows for t in names)))
    axes[0][0].legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
