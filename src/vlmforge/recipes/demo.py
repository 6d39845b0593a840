"""`vlmforge demo`: the whole flow on the tiny model, in one command.

data → tokenizer and backbones (the encoder learns to read) → feature cache → align → sft on the
shapes alone (`warm`), then on shapes and text → eval on held-out images → four sample answers,
all under `runs/demo/` (final model in `runs/demo/model`). Each phase records its completion in
`state.json`, and the training stages checkpoint, so an interrupted demo continues where it stopped.
The demo measures and prints its own wall time and the accuracy targets.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from vlmforge.config import DemoConfig, save_json
from vlmforge.data.synthetic import split_key

SLOW_MACHINE_GFLOPS = 110  # the slow machines of this kind (AVX2 only), for which the time target is set
TARGETS = {
    "wall_time_s": 600,
    "text": 0.80,
    "shapes_overall": 0.95,
    "shapes_per_type": 0.90,
    "shapes_other_sizes": 0.90,
}


def _size(text: str) -> tuple[int, int]:
    """`96x64` -> (96, 64), or a ValueError naming the text."""
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image size {text!r} is not WIDTHxHEIGHT (e.g. 96x64)") from None
    if w < 16 or h < 16:
        raise ValueError(f"image size {text!r}: each side must be at least 16 pixels")
    return w, h


def _setup_seconds() -> float | None:
    stamp = Path(".venv/.installed")
    try:
        return float(stamp.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class _Phases:
    """The demo's phases, each run once: its seconds and result recorded in `state.json`, so an
    interrupted demo continues where it stopped."""

    def __init__(self, out: Path):
        self.file = out / "state.json"
        self.state = json.loads(self.file.read_text()) if self.file.exists() else {"phases": {}}
        self.resumed: list[str] = []

    def __call__(self, name: str, fn):
        from tqdm import tqdm

        done = self.state["phases"]
        if name in done:
            self.resumed.append(name)
            tqdm.write(f"[{name}] done earlier ({done[name]['seconds']:.0f}s), skipped")
            return done[name].get("result")
        tqdm.write(f"[{name}]")
        t = time.time()
        result = fn()
        done[name] = {"seconds": round(time.time() - t, 1), "result": result}
        save_json(self.state, self.file)
        return result

    def replace(self, name: str, result) -> None:
        self.state["phases"][name]["result"] = result
        save_json(self.state, self.file)

    @property
    def seconds(self) -> dict:
        return {k: v["seconds"] for k, v in self.state["phases"].items()}


@dataclasses.dataclass
class _Data:
    """The demo's files by `{split}_{task}_{kind}` and what each phase reads."""

    files: dict
    sizes: list[tuple[int, int]]  # the held-out other sizes
    extra: list[str]  # the extra training canvases' splits

    def __getitem__(self, key: tuple[str, str, str]) -> str:
        """The file of (split, task, kind)."""
        return self.files[split_key(*key)]

    def extra_shapes(self, kind: str) -> list[str]:
        """The extra training canvases' shapes files."""
        return [self[split, "shapes", kind] for split in self.extra]

    def shapes(self, kind: str) -> list[str]:
        return [self["train", "shapes", kind]] + self.extra_shapes(kind)

    def qa(self, split: str, task: str = "shapes") -> str:
        return self[split, task, "qa"]


def run(cfg: DemoConfig) -> dict:
    t0 = time.time()
    out = Path(cfg.out)
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    phase = _Phases(out)
    save_json({"demo": dataclasses.asdict(cfg)}, out / "demo_config.json")
    data = _make_data(cfg, out, phase)
    model_cfg = _backbones(cfg, out, data, phase)
    store = _cache(cfg, out, model_cfg, data, phase)
    _train(cfg, out, model_cfg, data, store, phase)
    model, engine = _final_model(out, phase)
    scores = phase("eval", lambda: _evaluate(model, engine, data, out))
    samples = _samples(model, engine, data)
    summary = _summary(time.time() - t0, phase, scores, samples)
    save_json(summary, out / "summary.json")
    page = _page(out, summary, model.history)
    print(_format_summary(cfg, out, data, summary, page))
    return summary


def _make_data(cfg: DemoConfig, out: Path, phase: _Phases) -> _Data:
    """The synthetic splits: training (shapes, text, extra canvases), held out (test, other sizes)."""
    from tqdm import tqdm

    from vlmforge.data.synthetic import synth_splits

    d = out / "data"
    sizes = [_size(s) for s in cfg.other_sizes]
    canvases = [_size(s) for s in cfg.train_sizes]
    n_each = cfg.n_shapes_other // max(len(canvases), 1)
    # held-out seeds: test seed + 1, other sizes seed + 3…; extra training canvases seed + 100…
    splits = (
        [
            ("train", cfg.n_shapes, cfg.n_text, cfg.seed),
            ("test", cfg.n_test, cfg.n_test, cfg.seed + 1),
            ("pretrain", cfg.n_pretrain, 0, cfg.seed + 2),
        ]
        + [(f"other_{w}x{h}", cfg.n_other, 0, cfg.seed + 3 + i, w, h) for i, (w, h) in enumerate(sizes)]
        + [(f"train_{w}x{h}", n_each, 0, cfg.seed + 100 + i, w, h) for i, (w, h) in enumerate(canvases)]
    )
    files = phase("data", lambda: synth_splits(d, splits))
    if any(split_key(split, "shapes", "qa") not in files for split, n, *_ in splits if n):  # a folder of other settings
        tqdm.write("[data] the settings changed since it was made: made again")
        files = synth_splits(d, splits)
        phase.replace("data", files)
    return _Data(files, sizes, [f"train_{w}x{h}" for w, h in canvases if n_each])


def _backbones(cfg: DemoConfig, out: Path, data: _Data, phase: _Phases):
    """The tokenizer, the encoder (taught to read) and the LM, pretrained; the model config on them."""
    from vlmforge.recipes.tiny import pretrain

    train_files = [data["train", t, k] for t in ("shapes", "text") for k in ("captions", "sft")]
    train_files += [data[split, "shapes", k] for split in data.extra for k in ("captions", "sft")]
    # the text images are read (a CTC objective), not captioned, when the encoder learns to read
    captions = [data["train", "shapes", "captions"]] + ([] if cfg.read else [data["train", "text", "captions"]])
    captions += data.extra_shapes("captions")
    if split_key("pretrain", "shapes", "captions") in data.files:
        captions.append(data["pretrain", "shapes", "captions"])

    def make():
        spec = dataclasses.replace(cfg.spec, lm_steps=0) if cfg.lm else cfg.spec  # its LM stands aside
        reading = [data["train", "text", "sft"]] if cfg.read and cfg.n_text else None
        paths = pretrain(train_files, out / "backbones", spec, cfg.seed, captions=captions, reading=reading)
        return {k: str(v) for k, v in paths.items()}

    phase("backbones", make)
    bb = out / "backbones"
    lm, tok = (cfg.lm, None) if cfg.lm else (str(bb / "lm"), str(bb / "lm"))
    return dataclasses.replace(cfg.model, vision=str(bb / "vision"), lm=lm, tokenizer=tok)


def _stage_data(data: _Data) -> tuple[list[str], list[str]]:
    """(align data, sft data): captions, then questions, of shapes and text."""
    align = [data["train", "shapes", "captions"], data["train", "text", "captions"]] + data.extra_shapes("captions")
    sft = [data["train", "shapes", "sft"], data["train", "text", "sft"]] + data.extra_shapes("sft")
    return align, sft


def _cache(cfg: DemoConfig, out: Path, model_cfg, data: _Data, phase: _Phases) -> str | None:
    """Every training image encoded once into the feature store both stages read."""
    if not cfg.cache:
        return None
    from vlmforge.cache.build import build_for

    store = str(out / "cache")
    align, sft = _stage_data(data)

    def make():
        stats = build_for(store, model_cfg, align + sft, cfg.cache_dtype)
        return {k: stats[k] for k in ("namespace", "unique", "encoded", "images_per_s")}

    phase("cache", make)
    return store


def _train(cfg: DemoConfig, out: Path, model_cfg, data: _Data, store: str | None, phase: _Phases) -> None:
    """align, then sft on the shapes alone (`warm`), then on shapes and text."""
    from vlmforge.recipes.pipeline import align_then_sft

    align, sft = _stage_data(data)
    align_then_sft(
        model_cfg,
        cfg.align,
        cfg.sft,
        out,
        align,
        sft,
        phase,
        warm_data=data.shapes("sft"),
        warm_steps=cfg.sft_warm,
        seed=cfg.seed,
        cache=store,
        cache_dtype=cfg.cache_dtype if store else None,
    )


def _final_model(out: Path, phase: _Phases):
    """The trained model copied to `out/model`, loaded, with one engine for every question asked."""
    from vlmforge.infer.engine import Engine
    from vlmforge.model.vlm import VLM

    def finalize():
        final = out / "model"
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(out / "sft" / "model", final)
        return str(final)

    phase("model", finalize)
    model = VLM.from_pretrained(out / "model")
    return model, Engine(model)


def _evaluate(model, engine, data: _Data, out: Path) -> dict:
    """Held-out accuracy per task and question type (recorded in the model's folder)."""
    from vlmforge.eval.benchmarks import QAFile
    from vlmforge.eval.harness import LocalGenerator, evaluate_benchmarks
    from vlmforge.model import folder

    tasks = [QAFile(data.qa("test", task), task) for task in ("shapes", "text")]
    tasks += [QAFile(data.qa(f"other_{w}x{h}"), f"shapes_{w}x{h}") for w, h in data.sizes]
    gen = LocalGenerator(model, str(out / "model"), max_new_tokens=16, engine=engine)
    report = evaluate_benchmarks(tasks, gen, None, out / "eval", batch_size=64)
    benchmarks = report["benchmarks"]
    res = {
        name: {"accuracy": b["score"], "n": b["n"], "per_type": {k: v["score"] for k, v in b["breakdown"].items()}}
        for name, b in benchmarks.items()
    }
    records = [
        {"task": k, "metric": b["metric"], "score": round(b["score"], 4), "n": b["n"]} for k, b in benchmarks.items()
    ]
    folder.record_evals(out / "model", records)
    other = [res[f"shapes_{w}x{h}"] for w, h in data.sizes]
    if other:  # every other size together, each question once
        n = sum(r["n"] for r in other)
        res["shapes_other_sizes"] = {"accuracy": sum(r["accuracy"] * r["n"] for r in other) / n, "n": n}
    return res


def _samples(model, engine, data: _Data) -> list[dict]:
    """Three shapes questions of different types, then one text question, answered."""
    from vlmforge.data.formats import load_records
    from vlmforge.data.images import load_image
    from vlmforge.infer.engine import answer

    picks = []
    for r in load_records(data.qa("test")):
        if len(picks) < 3 and r.id.rsplit("_", 1)[-1] not in {p.id.rsplit("_", 1)[-1] for p in picks}:
            picks.append(r)
    picks.append(load_records(data.qa("test", "text"))[0])
    questions = [r.messages[0]["content"].replace("<image>", "").strip() for r in picks]
    answers = answer(model, questions, [[load_image(r.images[0])] for r in picks], engine=engine)
    return [
        {
            "task": "text" if r is picks[-1] else "shapes",
            "image": str(r.images[0]),
            "question": q,
            "answer": a,
            "reference": r.messages[1]["content"],
            "right": a == r.messages[1]["content"],
        }
        for r, q, a in zip(picks, questions, answers)
    ]


def _summary(wall: float, phase: _Phases, scores: dict, samples: list[dict]) -> dict:
    """The timings, this machine's matmul rate, the scores and samples, and which targets are met."""
    from vlmforge import runtime

    matmul = runtime.matmul_peak(2, sizes=(2048,), repeats=3)[0] / 1e9  # the machine's speed, beside its time
    shapes = scores["shapes"]
    other = scores.get("shapes_other_sizes")
    met = {
        "wall_time": (wall <= TARGETS["wall_time_s"]) if not phase.resumed else None,  # unknown when continued
        "text": scores["text"]["accuracy"] >= TARGETS["text"],
        "shapes_overall": shapes["accuracy"] >= TARGETS["shapes_overall"],
        "shapes_per_type": all(v >= TARGETS["shapes_per_type"] for v in shapes["per_type"].values()),
        "shapes_other_sizes": other["accuracy"] >= TARGETS["shapes_other_sizes"] if other else None,
        "sample_answers": all(s["right"] for s in samples),
    }
    return {
        "wall_time_s": round(wall, 1),
        "phase_seconds": phase.seconds,
        "phases_total_s": round(sum(phase.seconds.values()), 1),
        "phases_done_earlier": phase.resumed,
        "setup_s": _setup_seconds(),
        "matmul_gflops": round(matmul, 1),
        "scores": scores,
        "samples": samples,
        "targets": TARGETS,
        "targets_met": met,
    }


def _format_summary(cfg: DemoConfig, out: Path, data: _Data, summary: dict, page: Path) -> str:
    scores, shapes, wall = summary["scores"], summary["scores"]["shapes"], summary["wall_time_s"]
    resumed = summary["phases_done_earlier"]
    lines = ["", "=" * 64, "vlmforge demo summary", "-" * 64]
    lines += [f"  {k:<10} {v:7.1f}s" for k, v in summary["phase_seconds"].items()]
    lines.append(
        f"  demo wall time {wall:.1f}s (target <= {TARGETS['wall_time_s']}s)"
        + (f"  [continued run: {', '.join(resumed)} done earlier, not in this time]" if resumed else "")
    )
    lines.append(
        f"  machine: 2048x2048 fp32 matmul at {summary['matmul_gflops']:.0f} GFLOP/s on 2 threads (the time target "
        f"is set for a machine of ~{SLOW_MACHINE_GFLOPS} GFLOP/s; faster ones should take far less)"
    )
    setup = summary["setup_s"]
    lines.append(f"  setup (make setup, separate): {f'{setup:.0f}s' if setup is not None else 'not measured'}")
    lines.append(
        f"  shapes accuracy {100 * shapes['accuracy']:.1f}% (target >= {TARGETS['shapes_overall']:.0%}); per type: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shapes["per_type"].items())
        + f" (target >= {TARGETS['shapes_per_type']:.0%} each)"
    )
    if "shapes_other_sizes" in scores:
        each = ", ".join(
            f"{w}x{h} {100 * scores[f'shapes_{w}x{h}']['accuracy']:.1f}%"
            for w, h in data.sizes
            if f"shapes_{w}x{h}" in scores
        )
        lines.append(
            f"  shapes at other sizes (seed {cfg.seed + 3}+) {100 * scores['shapes_other_sizes']['accuracy']:.1f}% "
            f"(target >= {TARGETS['shapes_other_sizes']:.0%}): {each}"
        )
    lines.append(
        f"  text accuracy {100 * scores['text']['accuracy']:.1f}% (target >= {TARGETS['text']:.0%}; "
        "random 3-6 letters, exact match)"
    )
    lines.append("  sample answers:")
    for s in summary["samples"]:
        mark = "right" if s["right"] else "WRONG"
        lines.append(f"    {s['image']}: {s['question']} -> {s['answer']!r} (reference {s['reference']!r}: {mark})")
    lines.append(f"  targets met: {summary['targets_met']}")
    lines.append(f"  report: {page}   (every held-out answer with its image, the loss curves, the timings)")
    chat = f'vlmforge chat --model {out / "model"} --image IMG "What shape is it?"'
    lines.append(f"  model: {out / 'model'}   (try: {chat})")
    lines.append("=" * 64)
    return "\n".join(lines)


def _page(out: Path, summary: dict, history: list[dict]) -> Path:
    """OUT/report.html: the targets, the phase timings, each stage's loss curve, the model card (its
    training history) and every held-out answer with its image."""
    from vlmforge.eval.html import eval_sections, loss_svg, table, write_page

    parts = ["<h2>Targets</h2>", table(summary["targets_met"], ("target", "met"))]
    parts += [
        "<h2>Phase timings</h2>",
        table({k: f"{v:.1f} s" for k, v in summary["phase_seconds"].items()}, ("phase", "seconds")),
    ]
    parts.append("<h2>Training</h2>")
    parts += [
        loss_svg(out / stage / "metrics.jsonl", stage)
        for stage in ("align", "warm", "sft")
        if (out / stage / "metrics.jsonl").is_file()
    ]
    for h in history:
        parts.append(table(h, ("model card: stage " + str(h.get("stage")), "")))
    report = json.loads((out / "eval" / "report.json").read_text())
    parts += eval_sections(report, out / "eval")
    return write_page(out / "report.html", "vlmforge demo", parts)
