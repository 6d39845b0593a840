"""`vlmforge bench data`: packing against padding, side by side in one run.

Two sets of records: the demo's mix (one-question shapes records and text records: lengths close
to each other) and a long tail (conversations of 1 to 10 turns of one image, the number of turns
drawn from a Zipf law, so that a few records are many times the length of most). For each, the
same micro-batches of records are collated padded (a row per record, padded to the longest) and
packed (`--train.packing`: records several to a row up to the longest record, block-diagonal
attention), and a training step (forward, backward, AdamW) is timed on each, the two modes
interleaved step by step so that this machine's drift hits both alike. Reported: the median step
time, the label tokens of a step (the same in both modes), label tokens/s, and the tokens the
model computed (padding included).

The model is the `tiny` bench preset with random weights (timing does not depend on them), from
features made in memory (the encoder's cost is the same in both modes).

Streaming against loading: corpora of 1x, 4x and 20x a memory cap (`--cap_mb`: the text a process
may hold) as parquet shards written with `datasets` (LLaVA layout, ten-turn conversations about
the synthetic images, ~1 KB of text per record), each read by a fresh process the way training
reads it (`load_records` + micro-batches, or `--train.streaming`'s windows) for the same number
of micro-batches (records tokenized, images decoded and preprocessed, batches collated; no model
step, whose cost does not depend on where the records come from). Reported per corpus and mode:
seconds to the first batch, samples/s after it, peak resident memory of the process, and the
resident memory the data added (peak minus the process's size before reading).
"""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlmforge import runtime
from vlmforge.bench import publish
from vlmforge.bench.common import machine, setup


def _long_tail(records: list, seed: int, n: int) -> list[dict]:
    """LLaVA rows of 1..10 turns of one image's questions, the number of turns Zipf-distributed."""
    rng = random.Random(seed)
    by_image: dict = {}
    for r in records:
        by_image.setdefault(str(r.images[0]), []).append(r)
    images = sorted(by_image)
    weights = [1 / k**1.5 for k in range(1, 11)]
    rows = []
    for i in range(n):
        img = str(Path(images[i % len(images)]).resolve())
        turns = [m for r in by_image[images[i % len(images)]] for m in r.messages]
        k = min(rng.choices(range(1, 11), weights)[0], len(turns) // 2)
        conv = [
            {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"].replace("<image>\n", "")}
            for m in turns[: 2 * k]
        ]
        rows.append({"id": f"tail_{i}", "image": img, "conversations": conv})
    return rows


@dataclass
class DataBench:
    """Packing against padding, and streaming against loading, side by side.

    Packing: step time and label tokens/s, on the demo's mix and on a long tail. Streaming:
    samples/s and memory as the corpus grows.
    """

    out: str | None = None
    """write the figures to this JSON file."""
    work: str = "runs/bench-data"
    """folder for the bench's data and backbones."""
    n_images: int = 96
    """synthetic images behind both sets."""
    batch_size: int = 32
    """records per step."""
    steps: int = 8
    """timed steps per mode and set."""
    warmup: int = 2
    """untimed steps first."""
    threads: int = 1
    """torch CPU threads."""
    cap_mb: float = 32.0
    """the memory cap the streaming corpora are measured against (megabytes of text)."""
    multiples: list[float] = field(default_factory=lambda: [1, 4, 20])
    """corpus sizes in caps."""
    stream_batches: int = 100
    """micro-batches each reading process reads."""


def run(cfg: DataBench) -> dict:
    """`vlmforge bench data`: both measurements, printed as a table (and written to `cfg.out`)."""
    import torch

    from vlmforge.config import ModelConfig
    from vlmforge.data.collate import VQADataset, collate
    from vlmforge.data.formats import load_records, parse_records
    from vlmforge.data.synthetic import synth
    from vlmforge.model.vlm import VLM
    from vlmforge.train.step import step

    work_dir = Path(cfg.work)
    s = setup(work_dir, "tiny", cfg.n_images)
    data = Path(s["data"]).parent
    if not (data / "text_sft.json").exists():
        synth(data, "text", cfg.n_images // 4, 0, s["spec"].image_size, s["spec"].image_size)
    mix = load_records(data / "shapes_sft.json") + load_records(data / "text_sft.json")
    tail = parse_records(list(enumerate(_long_tail(mix, 0, len(mix)))), data / "long-tail", Path("/"))
    result: dict = {
        "machine": machine(),
        "threads": cfg.threads,
        "batch_size": cfg.batch_size,
        "steps": cfg.steps,
        "sets": {},
    }
    with runtime.threads(cfg.threads), runtime.seeded(0):
        model = VLM.from_backbones(ModelConfig(vision=s["vision"], lm=s["lm"], connector="mlp"))
        model.lm_mode = "full"
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        pad = model.tokenizer.pad_token_id
        for name, records in (("demo mix", mix), ("long tail", tail)):
            ds = VQADataset(records, model.prompts, model.processor)
            items, feats = [], {}  # every record encoded, every image's features computed, once
            for i, r in enumerate(records):
                key = str(r.images[0])
                it = ds[i]
                if key not in feats:
                    with torch.no_grad():
                        feats[key] = model.encode_images(it["views"][0])
                items.append({**it, "views": [feats[key]]})
            order = random.Random(1).sample(range(len(records)), len(records))
            batches = [order[i : i + cfg.batch_size] for i in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size)]
            times: dict[str, list[float]] = {"padded": [], "packed": []}
            seen: dict[str, dict] = {}
            for k in range(cfg.warmup + cfg.steps):
                batch = [items[i] for i in batches[k % len(batches)]]
                budget = max(len(it["input_ids"]) for it in batch)
                for mode in ("padded", "packed") if k % 2 == 0 else ("packed", "padded"):
                    b = collate(batch, pad, pack=budget if mode == "packed" else None)
                    t = time.perf_counter()
                    step(model, opt, b)
                    if k >= cfg.warmup:
                        times[mode].append(time.perf_counter() - t)
                        row = seen.setdefault(mode, {"labels": [], "tokens": [], "computed": []})
                        row["labels"].append(int((b["labels"][:, 1:] != -100).sum()))
                        row["tokens"].append(b["tokens"])
                        row["computed"].append(b["input_ids"].numel())
            res = {}
            for mode, ts in times.items():
                med = statistics.median(ts)
                labels = statistics.fmean(seen[mode]["labels"])
                res[mode] = {
                    "step_s": round(med, 4),
                    "label_tokens_per_step": labels,
                    "label_tokens_per_s": round(labels / med, 1),
                    "tokens_per_step": statistics.fmean(seen[mode]["tokens"]),
                    "computed_per_step": statistics.fmean(seen[mode]["computed"]),
                }
            rate = {mode: res[mode]["label_tokens_per_s"] for mode in times}
            res["packed_vs_padded"] = round(rate["packed"] / rate["padded"], 3)
            result["sets"][name] = res
    result["streaming"] = streaming(work_dir, s, cfg.cap_mb, cfg.multiples, cfg.stream_batches, cfg.batch_size)
    return publish(result, format_table(result), cfg.out)


def _corpus(folder: Path, images: list[str], n: int, seed: int = 0) -> float:
    """`n` LLaVA-layout records of ten turns about the pool's images as parquet shards of 4,096
    rows (written once); returns the text's megabytes."""
    import datasets

    done = folder / "text_mb.txt"
    if done.exists():
        return float(done.read_text())
    rng = random.Random(seed)
    words = "red green blue circle square triangle left right above below small large how many what color".split()
    text_bytes = 0
    for k, lo in enumerate(range(0, n, 4096)):
        rows = []
        for i in range(lo, min(n, lo + 4096)):
            conv = [
                {"from": f, "value": " ".join(rng.choices(words, k=8)) + ("?" if f == "human" else ".")}
                for _ in range(10)
                for f in ("human", "gpt")
            ]
            conv[0]["value"] = "<image>\n" + conv[0]["value"]
            text_bytes += sum(len(t["value"]) for t in conv)
            rows.append({"id": f"r{i}", "image": images[i % len(images)], "conversations": conv})
        datasets.Dataset.from_list(rows).to_parquet(str(folder / f"part-{k:05d}.parquet"))
    mb = text_bytes / 1e6
    done.write_text(str(mb))
    return mb


def _read(args: dict) -> dict:
    """In a fresh process: read `args["batches"]` micro-batches of the corpus as training does."""
    from vlmforge.bench.common import memory_mb
    from vlmforge.config import ModelConfig, TrainConfig
    from vlmforge.data.collate import VQADataset
    from vlmforge.data.formats import load_records
    from vlmforge.data.stream import RecordStream
    from vlmforge.model.vlm import VLM
    from vlmforge.train.batches import micro_batches, stream_batches

    os.environ["HF_DATASETS_CACHE"] = args["hf_cache"]  # the in-memory path's arrow copy stays in the bench folder
    model = VLM.from_backbones(ModelConfig(vision=args["vision"], lm=args["lm"], connector="mlp"))
    streamed = args["variant"] == "streamed"
    cfg = TrainConfig(batch_size=args["batch_size"], max_len=4096, streaming=streamed, max_steps=args["batches"])
    make = lambda recs: VQADataset(recs, model.prompts, model.processor, cfg.max_len)  # noqa: E731
    pad, before = model.tokenizer.pad_token_id, memory_mb("VmRSS")
    t0 = time.perf_counter()
    if cfg.streaming:
        batches = stream_batches(RecordStream([args["source"]]), make, cfg, pad)
    else:
        batches = micro_batches(make(load_records(args["source"])), cfg, pad, 0)
    n = next(batches)[1]["n"]
    first = time.perf_counter() - t0
    for _ in range(args["batches"] - 1):
        n += next(batches)[1]["n"]
    rest = time.perf_counter() - t0 - first
    peak = memory_mb()
    return {
        "first_batch_s": round(first, 2),
        "samples_per_s": round((n - args["batch_size"]) / rest, 1),
        "peak_rss_mb": round(peak),
        "data_rss_mb": round(peak - before),
    }


def streaming(work: Path, s: dict, cap_mb: float, multiples: list[float], batches: int, batch_size: int) -> dict:
    """Streamed against loaded, on corpora of `multiples` x `cap_mb` megabytes of text."""
    from vlmforge.bench.common import in_process
    from vlmforge.data.formats import load_records

    pool = [str(p) for r in load_records(s["data"]) for p in r.images]
    per_record = 10 * 2 * 8 * 7 / 1e6  # ten turns of two lines of eight words of ~7 bytes
    rows = {}
    for m in multiples:
        n = max(batch_size * batches, int(cap_mb * m / per_record))
        folder = work / f"corpus-{n}"
        folder.mkdir(parents=True, exist_ok=True)
        mb = _corpus(folder, [os.path.relpath(p, folder) for p in pool], n)
        args = {
            "vision": s["vision"],
            "lm": s["lm"],
            "source": f"hf:{folder}",
            "batches": batches,
            "threads": 1,
            "batch_size": batch_size,
            "hf_cache": str(work / "hf-cache"),
        }
        row = {"records": n, "text_mb": round(mb, 3), "x_cap": m}
        for variant in ("streamed", "loaded"):
            row[variant] = in_process(_read, {**args, "variant": variant})
        rows[f"{m:g}x"] = row
    flat = [r["streamed"]["data_rss_mb"] for r in rows.values()]
    return {"cap_mb": cap_mb, "batches": batches, "corpora": rows, "streamed_data_rss_growth_mb": max(flat) - min(flat)}


def format_table(r: dict) -> str:
    lines = [
        f"packing vs padding, batch {r['batch_size']}, {r['threads']} thread(s), medians of {r['steps']} steps",
        "| set | mode | step s | label tokens / step | label tokens/s | tokens computed / step (padding incl.) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, res in r["sets"].items():
        for mode in ("padded", "packed"):
            m = res[mode]
            lines.append(
                f"| {name} | {mode} | {m['step_s']:.3f} | {m['label_tokens_per_step']:.0f} | "
                f"{m['label_tokens_per_s']:.0f} | {m['computed_per_step']:.0f} |"
            )
        lines.append(f"| {name} | packed / padded | | | {res['packed_vs_padded']:.2f}x | |")
    st = r["streaming"]
    lines += [
        "",
        f"streamed vs loaded, {st['batches']} micro-batches of {r['batch_size']} read by a fresh process, "
        f"memory cap {st['cap_mb']:g} MB of text",
        "| corpus | records | text MB | mode | first batch s | samples/s | peak RSS MB | data RSS MB |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for name, c in st["corpora"].items():
        for mode in ("streamed", "loaded"):
            m = c[mode]
            lines.append(
                f"| {name} cap | {c['records']} | {c['text_mb']:.1f} | {mode} | {m['first_batch_s']:.2f} | "
                f"{m['samples_per_s']:.0f} | {m['peak_rss_mb']} | {m['data_rss_mb']} |"
            )
    lines.append(f"streamed: the data's RSS varies by {st['streamed_data_rss_growth_mb']} MB across the corpora")
    return "\n".join(lines)
