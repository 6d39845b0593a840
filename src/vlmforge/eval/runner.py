"""`vlmforge eval`: greedy answers to the first question of each record, scored against the first
answer after VQA normalisation; overall and per-question-type accuracy.

The question type is inferred from the synthetic templates (`question_type`), so any data made
with them is scored per type; other questions count as `other`.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from vlmforge.data.formats import load_records
from vlmforge.data.images import ImageError, load_image
from vlmforge.eval.metrics import exact_match, normalize_answer
from vlmforge.infer.engine import Engine, answer
from vlmforge.io import atomic_write_text

_TYPES = [
    ("color", re.compile(r"^What color is the \w+\?$")),
    ("shape", re.compile(r"^What shape is the \w+ object\?$")),
    ("count", re.compile(r"^How many shapes are there\?$")),
    ("exist", re.compile(r"^Is there an? \w+ \w+\?$")),
    ("text", re.compile(r"^What does the text say\?$")),
]


def question_type(question: str) -> str:
    q = question.replace("<image>", "").strip()
    return next((name for name, rx in _TYPES if rx.match(q)), "other")


def evaluate(model, data: str | Path, batch_size: int = 32, limit: int | None = None, max_new_tokens: int = 16,
             engine: Engine | None = None) -> dict:  # fmt: skip
    """Answer and score every record of `data`; bad images are reported, not fatal. Pass the
    `engine` of `model` when scoring several files: making one copies the LM head."""
    records = load_records(data)[:limit]
    engine = engine or Engine(model)
    rows, errors = [], []
    t0 = time.time()
    for start in tqdm(range(0, len(records), batch_size), desc=f"eval {Path(data).name}", unit="batch", leave=False):
        chunk = records[start : start + batch_size]
        items = []
        for r in chunk:
            try:
                images = [load_image(p) for p in r.images]
            except ImageError as e:
                errors.append(str(e))
                continue
            question = next(m["content"] for m in r.messages if m["role"] == "user")
            reference = next((m["content"] for m in r.messages if m["role"] == "assistant"), "")
            items.append((r, images, question, reference))
        if not items:
            continue
        preds = answer(model, [q for _, _, q, _ in items], [ims for _, ims, _, _ in items], max_new_tokens, engine)
        for (r, _, q, ref), pred in zip(items, preds):
            rows.append({
                "id": r.id, "type": question_type(q), "question": q.replace("<image>", "").strip(),
                "answer": ref, "prediction": pred, "correct": exact_match(pred, ref),
            })  # fmt: skip
    by_type = defaultdict(list)
    for row in rows:
        by_type[row["type"]].append(row["correct"])
    return {
        "data": str(data),
        "n": len(rows),
        "accuracy": sum(r["correct"] for r in rows) / max(len(rows), 1),
        "per_type": {t: {"n": len(v), "accuracy": sum(v) / len(v)} for t, v in sorted(by_type.items())},
        "image_errors": errors,
        "seconds": round(time.time() - t0, 2),
        "normalization": "vqa (lowercase, punctuation, articles, number words)",
        "decoding": {"greedy": True, "max_new_tokens": max_new_tokens, "engine": "vlmforge"},
        "rows": rows,
    }


def format_report(report: dict) -> str:
    lines = [f"{Path(report['data']).name}: accuracy {100 * report['accuracy']:.1f}% on {report['n']} questions"]
    for t, v in report["per_type"].items():
        lines.append(f"  {t:<8} {100 * v['accuracy']:5.1f}%  (n={v['n']})")
    if report["image_errors"]:
        lines.append(f"  {len(report['image_errors'])} records skipped for bad images")
    return "\n".join(lines)


def save_report(report: dict, out: str | Path) -> None:
    atomic_write_text(out, json.dumps(report, indent=1) + "\n")


__all__ = ["evaluate", "format_report", "save_report", "question_type", "normalize_answer"]
