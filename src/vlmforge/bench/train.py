"""`vlmforge bench train`: training throughput on 1 and 2 processes, and MFU, in one run.

* Peak: this machine's own fp32 matmul rate, measured here (square `torch.mm`, the best of a few
  sizes) with the same number of torch threads as the measured training.
* MFU: the FLOPs of one real training step (forward and backward of the model as `vlmforge train`
  runs it, counted by `torch.utils.flop_counter.FlopCounterMode`: matmuls and attention) divided
  by the median step time (forward, backward, clipping-free AdamW step, batches collated in
  memory beforehand) and by the peak.
* Processes: `vlmforge train` itself on 1 process and on 2 (`--nproc 2`, gloo; DDP, then FSDP),
  one torch thread each, the same global batch (1 x grad_accum 2 vs 2 x 1); samples/s and
  tokens/s from the runs' own `summary.json` (their training time, not the start-up).

The model is a preset with random weights (timing does not depend on them); the data the
bench's synthetic images.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vlmforge import runtime


def step_mfu(
    vision: str,
    lm: str,
    data: str,
    stage: str,
    batch_size: int,
    threads: int,
    steps: int,
    peak_n: int,
    compile: bool = False,
) -> dict:
    """MFU of a training step. This machine's speed drifts (a shared VM: the matmul rate moved by
    1.7x within minutes), so every timed step is paired with a matmul of the peak's size run just
    before it, and the MFU is the median over steps of step FLOP/s over that matmul's FLOP/s."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vlmforge.config import ModelConfig, TrainConfig
    from vlmforge.data.collate import VQADataset
    from vlmforge.data.formats import load_records
    from vlmforge.model.vlm import VLM
    from vlmforge.train.batches import micro_batches
    from vlmforge.train.loop import compile_layers
    from vlmforge.train.stages import apply_stage
    from vlmforge.train.step import step as train_step

    cfg = TrainConfig(stage=stage, batch_size=batch_size, seed=0)
    with runtime.seeded(0):  # the same connector weights for every stage
        model = VLM.from_backbones(ModelConfig(vision=vision, lm=lm, connector="mlp"))
    records = load_records(data)
    opt = torch.optim.AdamW(apply_stage(model, cfg))
    model.train()
    stream = micro_batches(VQADataset(records, model.prompts, model.processor), cfg, model.tokenizer.pad_token_id, 0)
    batches = [next(stream)[1] for _ in range(steps + 3)]

    def step(b):  # a plain step (no accumulation, clipping or schedule), as the cache bench times it
        train_step(model, opt, b)

    with FlopCounterMode(display=False) as counter:
        step(batches[0])
    flops = counter.get_total_flops()
    if compile:
        compile_layers(model)
    t = time.perf_counter()
    step(batches[1])  # warm-up (and compilation)
    step(batches[2])
    warmup = time.perf_counter() - t
    a, b = torch.randn(peak_n, peak_n), torch.randn(peak_n, peak_n)
    times, ratios, peaks = [], [], []
    for batch in batches[3:]:
        ref = runtime.matmul_flops(peak_n, a, b)
        t = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t)
        peaks.append(ref)
        ratios.append(flops / times[-1] / ref)
    if compile:
        import torch._dynamo

        torch._dynamo.reset()
    s = statistics.median(times)
    tokens = statistics.fmean(b["tokens"] for b in batches[3:])
    return {
        "stage": stage,
        "compiled": compile,
        "batch_size": batch_size,
        "threads": threads,
        "flops_per_step": flops,
        "step_s": round(s, 4),
        "achieved_flops": flops / s,
        "paired_peak_flops": statistics.median(peaks),
        "mfu": statistics.median(ratios),
        "warmup_s": round(warmup, 2),
        "tokens_per_s": round(tokens / s, 1),
        "samples_per_s": round(batch_size / s, 2),
    }


def process_run(
    vision: str, lm: str, data: str, out: Path, nproc: int, batch_size: int, steps: int, strategy: str = "ddp"
) -> dict:
    accum = 2 // nproc
    # epochs without end: --train.max_steps alone decides the length, whatever the data's size
    cmd = [
        sys.executable,
        "-m",
        "vlmforge",
        "train",
        "--train.stage",
        "align",
        "--train.data",
        data,
        "--train.batch_size",
        str(batch_size),
        "--train.grad_accum",
        str(accum),
        "--train.epochs",
        "1000",
        "--train.max_steps",
        str(steps),
        "--train.threads",
        "1",
        "--train.save_every",
        "100000",
        "--train.out",
        str(out),
        "--model.vision",
        vision,
        "--model.lm",
        lm,
        "--nproc",
        str(nproc),
        "--train.strategy",
        strategy,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"training on {nproc} process(es) failed: {(r.stdout + r.stderr)[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {
        "processes": nproc,
        "strategy": strategy if nproc > 1 else "-",
        "grad_accum": accum,
        "steps": s["step"],
        "seconds": round(s["elapsed"], 2),
        "samples_per_s": round(s["samples"] / s["elapsed"], 2),
        "tokens_per_s": round(s["tokens"] / s["elapsed"], 1),
    }


def run(
    out: str | None = None,
    work: str = "runs/bench-train",
    preset: str = "tiny",
    batch_size: int = 16,
    steps: int = 10,
    threads: int = 2,
    process_steps: int = 20,
    compile: bool = True,
) -> dict:
    """Training MFU against this machine's own matmul peak, and `vlmforge train` on 1 vs 2 processes.

    Args:
        out: write the figures to this JSON file.
        work: folder for the bench's data, backbones and runs.
        preset: model preset (tiny, llama3v_shape), random weights.
        batch_size: records per step (the process runs: half per micro-batch, 2 per step).
        steps: timed steps per stage in the MFU part.
        threads: torch threads for the peak and the MFU part.
        process_steps: optimizer steps of each process run.
        compile: also measure the MFU with `--train.compile` (compiled decoder and encoder layers).
    """
    with runtime.threads(threads):
        return _run(out, work, preset, batch_size, steps, threads, process_steps, compile)


def _run(out, work, preset, batch_size, steps, threads, process_steps, compile) -> dict:
    from vlmforge.bench import publish
    from vlmforge.bench.common import machine, setup

    s = setup(Path(work), preset, 256)
    vision, lm, data = s["vision"], s["lm"], s["data"]
    result = {"machine": machine(), "preset": preset, "batch_size": batch_size}
    peak, peak_n = runtime.matmul_peak(threads)
    result["matmul_peak_flops"], result["matmul_peak_size"] = peak, peak_n
    result["threads"] = threads
    result["mfu"] = {
        f"{st}{' compiled' if c else ''}": step_mfu(vision, lm, data, st, batch_size, threads, steps, peak_n, c)
        for st in ("align", "sft")
        for c in ((False, True) if compile else (False,))
    }
    runs = {"1": (1, "ddp"), "2": (2, "ddp"), "2-fsdp": (2, "fsdp")}
    result["processes"] = {
        k: process_run(vision, lm, data, Path(work) / f"run-{k}p", n, batch_size // 2, process_steps, strategy)
        for k, (n, strategy) in runs.items()
    }
    one = result["processes"]["1"]["samples_per_s"]
    result["two_vs_one_process"] = round(result["processes"]["2"]["samples_per_s"] / one, 3)
    result["fsdp_two_vs_one_process"] = round(result["processes"]["2-fsdp"]["samples_per_s"] / one, 3)
    return publish(result, format_table(result), out)


def format_table(r: dict) -> str:
    peak = r["matmul_peak_flops"] / 1e9
    lines = [
        f"preset {r['preset']} (random weights), fp32, {r['threads']} thread(s); matmul peak {peak:.1f} GFLOP/s "
        f"({r['matmul_peak_size']}^2); MFU: each step against a matmul of that size run just before it",
        "",
        "| stage | batch | FLOPs/step | step | achieved | paired peak | MFU | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for st, m in r["mfu"].items():
        achieved = f"{m['achieved_flops'] / 1e9:.1f} GFLOP/s"
        lines.append(
            f"| {st} | {m['batch_size']} | {m['flops_per_step'] / 1e9:.2f} G | {1e3 * m['step_s']:.0f} ms "
            f"| {achieved} | {m['paired_peak_flops'] / 1e9:.0f} GFLOP/s | {100 * m['mfu']:.1f}% "
            f"| {m['tokens_per_s']:.0f} |"
        )
    lines += [
        "",
        "| processes (1 thread each) | strategy | grad_accum | samples/s | tokens/s |",
        "|---:|---|---:|---:|---:|",
    ]
    for p in r["processes"].values():
        lines.append(
            f"| {p['processes']} | {p['strategy']} | {p['grad_accum']} | {p['samples_per_s']:.1f} "
            f"| {p['tokens_per_s']:.0f} |"
        )
    lines.append(f"2 processes vs 1: x{r['two_vs_one_process']:.2f} (DDP), x{r['fsdp_two_vs_one_process']:.2f} (FSDP)")
    return "\n".join(lines)
