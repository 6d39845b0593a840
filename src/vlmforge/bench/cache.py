"""`vlmforge bench cache`: what the feature store buys, measured side by side in one run.

For each model preset, three stage-1 (`align`) step times on the same data and model:

* `reencode`: images read from disk, decoded (DataLoader worker) and encoded every step;
* `cached`: features read from the store, the encoder not in memory;
* `lm_only`: batches already collated in memory with their features: the bound the cache can reach.

Each runs in its own process, so the peak resident memory of each is its own. Then `cache
build` throughput against the encoder's pure forward on pre-decoded tensors, with 1 process and
with 2 (torchrun, gloo), for the tiny preset's ViT and the demo's ResNet tower; for both towers,
the step time of training the tower's top block (with the connector) from the store's states
below it against from pixels; disk bytes per image per stored dtype; and, with `--accuracy
true`, the demo's training from an fp32, fp16 and bf16 store, scored on held-out data.

Presets: `tiny` is the demo's model; `llama3v_shape` scales Llama3-V (SigLIP-so400m, 729 tokens per
image, beside Llama-3-8B) down to CPU size, keeping the encoder's share of the step's FLOPs.
Weights are random (timing does not depend on them).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlmforge import runtime
from vlmforge.bench.common import SPECS, in_process, machine, setup
from vlmforge.config import TinySpec, TrainConfig, check_choice

# Records per align step: the larger preset's steps are 6x longer, so it takes smaller batches.
PRESET_BATCH = {"tiny": 64, "llama3v_shape": 16}
# The towers whose cache build and top-block training are measured: the tiny preset's ViT and the
# demo's ResNet (`TinySpec`'s defaults).
TOWERS = {
    "tiny": {"spec": SPECS["tiny"], "what": "the tiny preset's ViT"},
    "demo": {"spec": TinySpec(), "what": "the demo's ResNet"},
}
# Llama3-V at full size, for the FLOP share printed beside the presets'.
LLAMA3V = {"enc_params": 0.40e9, "enc_tokens": 729, "lm_params": 7.5e9, "lm_tokens": 729 + 40}


def flop_share(enc_params: float, enc_tokens: int, lm_params: float, lm_tokens: float) -> float:
    """The encoder's share of an align step's FLOPs: encoder forward (2·N·T) against the frozen LM's
    forward plus its backward to the inputs (about another forward)."""
    enc = 2 * enc_params * enc_tokens
    return enc / (enc + 2 * (2 * lm_params * lm_tokens))


VARIANTS = ("reencode", "cached", "lm_only")


def _align_setup(args: dict, release: bool):
    """(model, optimizer, {variant: batch stream}) for align steps on the bench data."""
    import torch

    from vlmforge.cache.store import FeatureStore
    from vlmforge.config import ModelConfig
    from vlmforge.data.collate import VQADataset
    from vlmforge.data.formats import load_records
    from vlmforge.model.vlm import VLM
    from vlmforge.train.batches import micro_batches
    from vlmforge.train.stages import apply_stage

    cfg = TrainConfig(stage="align", batch_size=args["batch_size"], num_workers=args["num_workers"], seed=0)
    model = VLM.from_backbones(ModelConfig(vision=args["vision"], lm=args["lm"], connector="mlp"))
    records = load_records(args["data"])
    reader = FeatureStore(args["store"]).reader(model.vision, model.processor)
    if reader.ns is None or not all(reader.has(p) for r in records for p in r.images):
        raise RuntimeError(f"{args['store']}: features missing for the bench data")
    if release:
        model.vision.release()
    model.train()
    opt = torch.optim.AdamW(apply_stage(model, cfg))
    pad, n = model.tokenizer.pad_token_id, args["warmup"] + args["steps"]

    def stream(features):
        return micro_batches(VQADataset(records, model.prompts, model.processor, features=features), cfg, pad, 0)

    streams = {"reencode": stream(None), "cached": stream(reader)}
    if args.get("lm_only", True):  # every batch collated with its features, in memory before timing
        first = stream(reader)
        streams["lm_only"] = iter(enumerate([next(first)[1] for _ in range(n)]))
    return model, opt, streams


def _step(model, opt, stream) -> float:
    """Seconds of one training step on the stream's next batch (its reading included)."""
    from vlmforge.train.step import step

    t = time.perf_counter()
    step(model, opt, next(stream)[1])
    return time.perf_counter() - t


def _step_times(args: dict) -> dict:
    """Align step times of the three variants, interleaved step by step in one process so that
    drift of the machine's speed hits all three alike: median and mean per variant."""
    model, opt, streams = _align_setup(args, release=False)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(args["warmup"] + args["steps"]):
        for v in VARIANTS[i % 3 :] + VARIANTS[: i % 3]:
            dt = _step(model, opt, streams[v])
            if i >= args["warmup"]:
                times[v].append(dt)
    return {v: {"step_s": statistics.median(t), "step_s_mean": statistics.fmean(t)} for v, t in times.items()}


def _peak_memory(args: dict) -> dict:
    """Peak resident memory of a process training with one variant (the encoder released unless
    it re-encodes)."""
    from vlmforge.bench.common import memory_mb

    variant = args["variant"]
    model, opt, streams = _align_setup({**args, "lm_only": variant == "lm_only"}, release=variant != "reencode")
    for _ in range(args["warmup"]):
        _step(model, opt, streams[variant])
    resident = sum(p.numel() for p in model.vision.parameters() if p.device.type != "meta")
    return {
        "peak_rss_mb": memory_mb(),
        "encoder_params_resident": resident,
    }


def _top_setup(args: dict, from_store: bool):
    """(model, optimizer, batch stream) for align steps that train the tower's top `top` blocks,
    reading pixels or the store's states below them."""
    import torch

    from vlmforge.cache.store import FeatureStore
    from vlmforge.config import ModelConfig
    from vlmforge.data.collate import VQADataset
    from vlmforge.data.formats import load_records
    from vlmforge.model.vlm import VLM
    from vlmforge.train.batches import micro_batches
    from vlmforge.train.stages import apply_stage

    cfg = TrainConfig(
        stage="align",
        batch_size=args["batch_size"],
        num_workers=args["num_workers"],
        seed=0,
        vision_mode="top",
        vision_top=args["top"],
    )
    torch.manual_seed(0)
    model = VLM.from_backbones(ModelConfig(vision=args["vision"], lm=args["lm"], connector="mlp"))
    features = None
    if from_store:
        features = FeatureStore(args["store"]).reader(model.vision, model.processor, top=args["top"])
        model.vision.from_states = args["top"]
    opt = torch.optim.AdamW(apply_stage(model, cfg))
    model.train()
    records = load_records(args["data"])
    ds = VQADataset(records, model.prompts, model.processor, features=features)
    return model, opt, micro_batches(ds, cfg, model.tokenizer.pad_token_id, 0)


def _top_step_times(args: dict) -> dict:
    """Step times of training the top blocks from pixels and from the store's states, interleaved
    step by step in one process: median per variant."""
    runs = {v: _top_setup(args, v == "states") for v in ("pixels", "states")}
    times: dict[str, list[float]] = {v: [] for v in runs}
    for i in range(args["warmup"] + args["steps"]):
        for v in list(runs)[i % 2 :] + list(runs)[: i % 2]:
            dt = _step(*runs[v])
            if i >= args["warmup"]:
                times[v].append(dt)
    return {f"{v}_step_s": statistics.median(t) for v, t in times.items()}


def _encoder_bound(vision_path: str, data: str, batch_size: int, threads: int, repeats: int = 2) -> float:
    """Images/s of the encoder's forward alone, on pre-decoded tensors in memory."""
    import torch

    from vlmforge.cache.build import encoder_for, images_of
    from vlmforge.data.images import load_image

    vision, proc, _ = encoder_for(encoder=vision_path)
    pixels = torch.cat([proc.views(load_image(p)) for p in images_of([data])])
    best = float("inf")
    with runtime.threads(threads), torch.no_grad():
        vision(pixels[:batch_size])
        for _ in range(repeats):
            t = time.perf_counter()
            for i in range(0, len(pixels), batch_size):
                vision(pixels[i : i + batch_size])
            best = min(best, time.perf_counter() - t)
    return len(pixels) / best


def _build_rate(
    vision_path: str, data: str, store: Path, dtype: str, batch_size: int, threads: int, workers: int, top: int = 0
):
    import shutil

    from vlmforge.cache.build import build, encoder_for, images_of

    shutil.rmtree(store, ignore_errors=True)
    vision, proc, src = encoder_for(encoder=vision_path)
    with runtime.threads(threads):
        return build(
            store,
            vision,
            proc,
            images_of([data]),
            dtype,
            batch_size,
            num_workers=workers,
            source=src,
            progress=False,
            top=top,
        )


def _build_rate_2proc(vision_path: str, data: str, store: Path, batch_size: int) -> dict:
    import shutil

    shutil.rmtree(store, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "vlmforge",
        "cache",
        "build",
        "--encoder",
        vision_path,
        "--data",
        data,
        "--out",
        str(store),
        "--dtype",
        "fp16",
        "--batch_size",
        str(batch_size),
        "--num_workers",
        "0",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"2-process cache build failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{") : proc.stdout.rindex("}") + 1])


def _accuracy(work: Path, dtypes: list[str]) -> dict:
    """The demo's model, align and sft (records apart, its 1,500 steps) from a store of each dtype,
    on the synthetic data and backbones of `pipeline.synthetic_setup` (the demo's sizes), scored on
    the held-out questions."""
    import dataclasses

    from vlmforge.cache.build import build_for
    from vlmforge.config import DemoConfig
    from vlmforge.eval.benchmarks import QAFile
    from vlmforge.eval.harness import LocalGenerator, run_benchmark
    from vlmforge.infer.engine import Engine
    from vlmforge.model.vlm import VLM
    from vlmforge.recipes.pipeline import align_then_sft, synthetic_setup

    demo = DemoConfig()
    data = synthetic_setup(work / "accuracy", demo.n_shapes, demo.n_text, demo.n_test, demo.spec)
    bb = data.small
    model_cfg = dataclasses.replace(demo.model, vision=bb["vision"], lm=bb["lm"], tokenizer=bb["lm"])
    align_data, sft_data = data.align_data, data.sft_data
    results = {}
    for dtype in dtypes:
        store, run = work / "accuracy" / "store", work / "accuracy" / dtype
        build_for(store, model_cfg, align_data + sft_data, dtype)
        final = align_then_sft(
            model_cfg, demo.align, demo.sft, run, align_data, sft_data, cache=str(store), cache_dtype=dtype, seed=0
        )
        model = VLM.from_pretrained(final)
        gen = LocalGenerator(model, str(final), 16, Engine(model))
        results[dtype] = {
            task: run_benchmark(QAFile(data.qa(task)), gen, None, None, batch_size=64)["score"]
            for task in ("shapes", "text")
        }
    return results


@dataclass
class CacheBench:
    """Measure the feature store: align step time re-encoding vs cached vs LM-only, peak memory,
    cache build throughput (1 and 2 processes) against the encoder alone, disk per dtype."""

    out: str | None = None
    """write the figures to this JSON file."""
    work: str = "runs/bench-cache"
    """folder for the bench's data, backbones and stores."""
    presets: list[str] = field(default_factory=lambda: list(SPECS))
    """model presets (tiny, llama3v_shape)."""
    n_images: int = 1024
    """images in the step-time data."""
    batch_size: int | None = None
    """records per align step (default per preset: tiny 64, llama3v_shape 16)."""
    steps: int = 20
    """timed steps per variant."""
    warmup: int = 3
    """untimed steps first."""
    build_images: int = 4096
    """images in the cache build measurement."""
    accuracy: bool = False
    """also train the demo's model from fp32, fp16 and bf16 stores and score each (on synthetic data
    and tiny backbones of its own, made first in WORK/accuracy)."""
    threads: int = 1
    """torch CPU threads of each measurement."""
    num_workers: int = 1
    """DataLoader workers decoding images (re-encode variant, cache build)."""

    def __post_init__(self):
        for preset in self.presets:
            check_choice("preset", preset, SPECS)


def run(cfg: CacheBench) -> dict:
    """`vlmforge bench cache`: every measurement, printed as a table (and written to `cfg.out`)."""
    from vlmforge.bench import publish

    work_dir = Path(cfg.work)
    common = {"threads": cfg.threads, "num_workers": cfg.num_workers, "steps": cfg.steps, "warmup": cfg.warmup}
    result: dict = {"machine": machine(), "threads": cfg.threads, "steps": cfg.steps, "presets": {}}
    for preset in cfg.presets:
        result["presets"][preset] = _preset_steps(work_dir, preset, cfg.n_images, cfg.batch_size, common)
    result["llama3v_flop_encoder_share"] = flop_share(**LLAMA3V)
    result["build"], result["top"] = {}, {}
    for name, tower in TOWERS.items():
        result["build"][name] = _build_figures(work_dir, name, tower, cfg.build_images, cfg.threads, cfg.num_workers)
        result["top"][name] = _top_figures(work_dir, name, tower, cfg.n_images, common)
    result["disk"] = _disk_figures(work_dir, cfg.build_images, cfg.threads, cfg.num_workers)
    if cfg.accuracy:
        result["accuracy"] = _accuracy(work_dir, ["fp32", "fp16", "bf16"])
    tiny_rows = result["presets"].get("tiny")
    if tiny_rows:
        for k in ("speedup_vs_reencode", "fraction_of_lm_only_bound"):
            result[k] = tiny_rows[k]
    result["build_fraction_of_encoder_bound"] = min(
        b["build_fraction_of_encoder_bound"] for b in result["build"].values()
    )
    return publish(result, format_table(result), cfg.out)


def _preset_steps(work_dir: Path, preset: str, n_images: int, batch_size: int | None, common: dict) -> dict:
    """Align step time and peak memory re-encoding, from the store and LM-only, for one preset,
    with the encoder's measured and FLOP shares."""
    s = setup(work_dir, preset, n_images)
    store = work_dir / f"store-{preset}"
    _build_rate(s["vision"], s["data"], store, "fp16", 64, common["threads"], common["num_workers"])
    base = {"vision": s["vision"], "lm": s["lm"], "data": s["data"], "store": str(store)}
    base |= {"batch_size": batch_size or PRESET_BATCH[preset], **common}
    rows = in_process(_step_times, base)
    for v in VARIANTS:
        rows[v].update(in_process(_peak_memory, {**base, "variant": v}))
    spec = s["spec"]
    enc_params = spec.vision_layers * 12 * spec.vision_hidden**2
    lm_params = spec.lm_layers * (4 * spec.lm_hidden**2 + 3 * spec.lm_hidden * spec.lm_intermediate)
    tokens = (spec.image_size // spec.patch_size) ** 2
    rows["speedup_vs_reencode"] = rows["reencode"]["step_s"] / rows["cached"]["step_s"]
    rows["fraction_of_lm_only_bound"] = rows["lm_only"]["step_s"] / rows["cached"]["step_s"]
    rows["measured_encoder_share"] = 1 - rows["lm_only"]["step_s"] / rows["reencode"]["step_s"]
    rows["flop_encoder_share"] = flop_share(enc_params, tokens, lm_params, tokens + 30)
    rows["batch_size"] = base["batch_size"]
    return rows


def _build_figures(work_dir: Path, name: str, tower: dict, build_images: int, threads: int, num_workers: int):
    """Cache build rate on 1 and 2 processes against the encoder's forward alone."""
    b = setup(work_dir, name, build_images, spec=tower["spec"])
    # this machine's speed drifts: the encoder alone and the build alternate, best of 3 each
    enc_rate, one, two = 0.0, None, None
    for _ in range(3):
        enc_rate = max(enc_rate, _encoder_bound(b["vision"], b["data"], 64, threads))
        st = _build_rate(b["vision"], b["data"], work_dir / "store-build", "fp16", 64, threads, num_workers)
        one = st if one is None or st["images_per_s"] > one["images_per_s"] else one
        st = _build_rate_2proc(b["vision"], b["data"], work_dir / "store-build2", 64)
        two = st if two is None or st["images_per_s"] > two["images_per_s"] else two
    return {
        "tower": tower["what"],
        "images": one["encoded"],
        "encoder_forward_images_per_s": enc_rate,
        "build_1proc_images_per_s": one["images_per_s"],
        "build_2proc_images_per_s": two["images_per_s"],
        "build_fraction_of_encoder_bound": one["images_per_s"] / enc_rate,
        "two_vs_one_process": two["images_per_s"] / one["images_per_s"],
    }


def _top_figures(work_dir: Path, name: str, tower: dict, n_images: int, common: dict) -> dict:
    """The top block trained from the states below it (a store of that cut) against from pixels."""
    small = setup(work_dir, name, n_images, spec=tower["spec"])
    cut_store = work_dir / f"store-top-{name}"
    _build_rate(small["vision"], small["data"], cut_store, "fp16", 64, common["threads"], common["num_workers"], top=1)
    args = {"vision": small["vision"], "lm": small["lm"], "data": small["data"], "store": str(cut_store), "top": 1}
    times = in_process(_top_step_times, {**args, "batch_size": PRESET_BATCH["tiny"], **common})
    times["speedup"] = times["pixels_step_s"] / times["states_step_s"]
    return {"tower": tower["what"], "top": 1, **times}


def _disk_figures(work_dir: Path, build_images: int, threads: int, num_workers: int) -> dict:
    """Bytes per image of each stored dtype, and the rounding error of fp16 and bf16 against fp32."""
    from vlmforge.cache.store import FeatureStore

    tiny = setup(work_dir, "tiny", build_images)
    disk = {}
    for dtype in ("fp32", "fp16", "bf16"):
        st = _build_rate(tiny["vision"], tiny["data"], work_dir / f"store-{dtype}", dtype, 64, threads, num_workers)
        info = FeatureStore(work_dir / f"store-{dtype}").info()["namespaces"][0]
        disk[dtype] = {
            "bytes_per_image": info["bytes_per_image"],
            "view_shape": info["view_shape"],
            "images": st["encoded"],
        }
    ref = _all_features(work_dir / "store-fp32")
    for dtype in ("fp16", "bf16"):
        got = _all_features(work_dir / f"store-{dtype}")
        err = [(got[k].float() - ref[k]).norm() / ref[k].norm() for k in ref]
        disk[dtype]["relative_error_vs_fp32"] = float(sum(err) / len(err))
    return disk


def _all_features(store: Path) -> dict:
    from vlmforge.cache.store import FeatureReader, FeatureStore

    ns = FeatureStore(store).namespaces()[0][0]
    reader = FeatureReader(ns)
    return {key: reader.by_key(key) for key in reader.index}


def format_table(r: dict) -> str:
    lines = [
        f"machine: {r['machine']['cpu_count']} cores, 2048x2048 fp32 matmul "
        f"{r['machine'].get('matmul_2048_gflops', '?')} GFLOP/s; torch {r['machine']['torch']}"
    ]
    lines.append(f"align step time, {r['threads']} torch thread(s), median of {r['steps']} interleaved steps")
    lines.append(
        f"{'preset':<18} {'reencode':>10} {'cached':>10} {'lm_only':>10} {'speedup':>8} {'of bound':>9} "
        f"{'enc share':>10} {'enc FLOPs':>10} {'peak MB re/ca/lm':>18}"
    )
    for name, p in r["presets"].items():
        name = f"{name} b{p['batch_size']}"
        peaks = "/".join(f"{p[v]['peak_rss_mb']:.0f}" for v in ("reencode", "cached", "lm_only"))
        lines.append(
            f"{name:<18} {1e3 * p['reencode']['step_s']:>8.1f}ms {1e3 * p['cached']['step_s']:>8.1f}ms "
            f"{1e3 * p['lm_only']['step_s']:>8.1f}ms {p['speedup_vs_reencode']:>7.2f}x "
            f"{p['fraction_of_lm_only_bound']:>9.3f} "
            f"{100 * p['measured_encoder_share']:>9.1f}% {100 * p['flop_encoder_share']:>9.1f}% {peaks:>18}"
        )
    lines.append(
        f"(Llama3-V at full size: encoder {100 * r['llama3v_flop_encoder_share']:.1f}% of an align step's FLOPs)"
    )
    for b in r["build"].values():
        lines.append(
            f"cache build, {b['tower']}, {b['images']} images: {b['build_1proc_images_per_s']:.0f} img/s (1 process), "
            f"{b['build_2proc_images_per_s']:.0f} img/s (2 processes, x{b['two_vs_one_process']:.2f}); encoder "
            f"forward alone {b['encoder_forward_images_per_s']:.0f} img/s -> build at "
            f"{b['build_fraction_of_encoder_bound']:.2f} of it"
        )
    for t in r["top"].values():
        lines.append(
            f"top {t['top']} block(s) of {t['tower']} training, align step: from pixels "
            f"{1e3 * t['pixels_step_s']:.1f} ms, from the store's states below them {1e3 * t['states_step_s']:.1f} ms "
            f"({t['speedup']:.2f}x)"
        )
    lines.append("disk per image: " + ", ".join(f"{k} {v['bytes_per_image']} B" for k, v in r["disk"].items()))
    lines.append(
        "feature error vs fp32 (relative L2, mean over images): "
        + ", ".join(f"{k} {v['relative_error_vs_fp32']:.1e}" for k, v in r["disk"].items() if k != "fp32")
    )
    if "accuracy" in r:
        lines.append(
            "accuracy after the demo's training: "
            + ", ".join(
                f"{k}: shapes {100 * v['shapes']:.1f}% text {100 * v['text']:.1f}%" for k, v in r["accuracy"].items()
            )
        )
    return "\n".join(lines)
