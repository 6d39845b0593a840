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
features made in memory (the encoder's cost is the same in both modes). Streaming a corpus larger
than memory is not built, so not measured.
"""

from __future__ import annotations

import random
import statistics
import time
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
        conv = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"].replace("<image>\n", "")}
                for m in turns[: 2 * k]]  # fmt: skip
        rows.append({"id": f"tail_{i}", "image": img, "conversations": conv})
    return rows


def run(out: str | None = None, work: str = "runs/bench-data", n_images: int = 96, batch_size: int = 32,
        steps: int = 8, warmup: int = 2, threads: int = 1) -> dict:  # fmt: skip
    """Packing against padding: step time and label tokens/s, on the demo's mix and on a long tail.

    Args:
        out: write the figures to this JSON file.
        work: folder for the bench's data and backbones.
        n_images: synthetic images behind both sets.
        batch_size: records per step.
        steps: timed steps per mode and set.
        warmup: untimed steps first.
        threads: torch CPU threads.
    """
    import torch

    from vlmforge.config import ModelConfig
    from vlmforge.data.collate import VQADataset, collate
    from vlmforge.data.formats import load_records, parse_records
    from vlmforge.data.synthetic import synth
    from vlmforge.model.vlm import VLM
    from vlmforge.train.step import step

    work_dir = Path(work)
    s = setup(work_dir, "tiny", n_images)
    data = Path(s["data"]).parent
    if not (data / "text_sft.json").exists():
        synth(data, "text", n_images // 4, 0, s["spec"].image_size, s["spec"].image_size)
    mix = load_records(data / "shapes_sft.json") + load_records(data / "text_sft.json")
    tail = parse_records(list(enumerate(_long_tail(mix, 0, len(mix)))), data / "long-tail", Path("/"))
    result: dict = {"machine": machine(), "threads": threads, "batch_size": batch_size, "steps": steps, "sets": {}}
    with runtime.threads(threads), runtime.seeded(0):
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
            batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
            times: dict[str, list[float]] = {"padded": [], "packed": []}
            seen: dict[str, dict] = {}
            for k in range(warmup + steps):
                batch = [items[i] for i in batches[k % len(batches)]]
                budget = max(len(it["input_ids"]) for it in batch)
                for mode in ("padded", "packed") if k % 2 == 0 else ("packed", "padded"):
                    b = collate(batch, pad, pack=budget if mode == "packed" else None)
                    t = time.perf_counter()
                    step(model, opt, b)
                    if k >= warmup:
                        times[mode].append(time.perf_counter() - t)
                        row = seen.setdefault(mode, {"labels": [], "tokens": [], "computed": []})
                        row["labels"].append(int((b["labels"][:, 1:] != -100).sum()))
                        row["tokens"].append(b["tokens"])
                        row["computed"].append(b["input_ids"].numel())
            res = {}
            for mode, ts in times.items():
                med = statistics.median(ts)
                labels = statistics.fmean(seen[mode]["labels"])
                res[mode] = {"step_s": round(med, 4), "label_tokens_per_step": labels,
                             "label_tokens_per_s": round(labels / med, 1),
                             "tokens_per_step": statistics.fmean(seen[mode]["tokens"]),
                             "computed_per_step": statistics.fmean(seen[mode]["computed"])}  # fmt: skip
            rate = {mode: res[mode]["label_tokens_per_s"] for mode in times}
            res["packed_vs_padded"] = round(rate["packed"] / rate["padded"], 3)
            result["sets"][name] = res
    result["streaming"] = "not measured: streaming is not built"
    return publish(result, format_table(result), out)


def format_table(r: dict) -> str:
    lines = [f"packing vs padding, batch {r['batch_size']}, {r['threads']} thread(s), medians of {r['steps']} steps",
             "| set | mode | step s | label tokens / step | label tokens/s | tokens computed / step (padding incl.) |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, res in r["sets"].items():
        for mode in ("padded", "packed"):
            m = res[mode]
            lines.append(f"| {name} | {mode} | {m['step_s']:.3f} | {m['label_tokens_per_step']:.0f} | "
                         f"{m['label_tokens_per_s']:.0f} | {m['computed_per_step']:.0f} |")  # fmt: skip
        lines.append(f"| {name} | packed / padded | | | {res['packed_vs_padded']:.2f}x | |")
    lines.append(f"streaming: {r['streaming']}")
    return "\n".join(lines)
