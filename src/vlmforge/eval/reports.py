"""Reading `vlmforge eval` reports (report.json) back: the scores a model card quotes."""

from __future__ import annotations

import json
from pathlib import Path

from vlmforge.eval.metrics import METRICS_VERSION


def read_evals(paths: list[str]) -> list[dict]:
    """Scores from `vlmforge eval` reports (report.json); a report scored with older rules than
    this vlmforge's says so beside each score."""
    rows = []
    for p in paths:
        try:
            rep = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: not a readable eval report ({e})") from e
        found = _bench_rows(rep)
        if not found:
            raise ValueError(f"{p}: no scores found (expected a `vlmforge eval` report)")
        version = rep.get("metrics_version") if isinstance(rep, dict) else None
        if version is not None and str(version) != METRICS_VERSION:
            old = (
                f"metrics version {version}: other rules than this vlmforge's {METRICS_VERSION}; "
                "run `vlmforge eval` again"
            )
            found = [{**r, "metric": f"{r['metric']} ({old})"} for r in found]
            print(f"{p}: scored with {old}")
        rows += found
    return rows


def _bench_rows(rep) -> list[dict]:
    rows = []
    items = rep.get("benchmarks", rep) if isinstance(rep, dict) else {}
    for name, r in items.items() if isinstance(items, dict) else []:
        if isinstance(r, dict):
            for metric in ("score", "accuracy", "vqa_accuracy", "anls", "f1", "cider"):
                if isinstance(r.get(metric), int | float):
                    label = r.get("metric", metric) if metric == "score" else metric
                    rows.append({"name": name, "metric": label, "score": float(r[metric]), "n": r.get("n")})
                    break
    return rows
