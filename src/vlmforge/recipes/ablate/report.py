"""The report of an ablation, redrawn from results.json after every run: `results.md` (mean ± 95%
t-interval per task, parameters, visual tokens per image, train time, tokens/s, the paper's figure
beside each group), `results.png` and `results.html` (the tables and the plot in one page)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from vlmforge.recipes.ablate.grids import PAPER
from vlmforge.recipes.ablate.tasks import SYNTHETIC_TASKS, describe, parse_tasks

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval (0 for a single value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    t = T975.get(len(values) - 1, 1.96)
    return m, t * statistics.stdev(values) / math.sqrt(len(values))


def task_names(results: dict) -> list[str]:
    return list(results.get("tasks") or SYNTHETIC_TASKS)


def summarize(results: dict) -> dict:
    """{group: [{cell, n, scores: {task: (mean, ci)}, …}]} in grid order, scores x100."""
    table = {}
    for group, cells in results["grid"]["groups"].items():
        rows = []
        for cell in cells:
            runs = [r for r in results["runs"].values() if r["group"] == group and r["cell"] == cell["name"]]
            if not runs:
                continue
            row = {"cell": cell["name"], "n": len(runs)}
            row["scores"] = {t: mean_ci([100 * r["scores"][t] for r in runs]) for t in task_names(results)}
            for k in ("trainable_params", "total_params", "visual_tokens_per_image"):
                row[k] = runs[0][k]
            row["train_seconds"] = statistics.fmean(r["train_seconds"] for r in runs)
            row["tokens_per_s"] = statistics.fmean(r["tokens_per_s"] for r in runs)
            rows.append(row)
        table[group] = rows
    return table


def write_report(results: dict, out: Path) -> None:
    from vlmforge.io import atomic_write_text

    table = summarize(results)
    names = task_names(results)
    tasks = parse_tasks(results.get("tasks"))
    lines = [
        f"# vlmforge ablate: {results['grid'].get('name', 'grid')}{' (quick)' if results['quick'] else ''}",
        "",
        f"Scores (x100), mean ± 95% t-interval over {results['seeds']} seeds, on: "
        + "; ".join(f"`{t}` ({describe(s)})" for t, s in tasks.items())
        + f". Budget {json.dumps(results['budget'])}.",
        "",
    ]
    for group, rows in table.items():
        lines += [f"## {group}", ""]
        if group in PAPER:
            lines += [f"Paper: {PAPER[group]}.", ""]
        head = ["cell", *names, "trainable", "total", "visual tokens/image", "train s", "tokens/s", "seeds"]
        lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for r in rows:
            cols = " | ".join(f"{r['scores'][t][0]:.1f} ± {r['scores'][t][1]:.1f}" for t in names)
            lines.append(
                f"| {r['cell']} | {cols} "
                f"| {r['trainable_params']:,} | {r['total_params']:,} | {r['visual_tokens_per_image']} "
                f"| {r['train_seconds']:.0f} | {r['tokens_per_s']:.0f} | {r['n']} |"
            )
        lines.append("")
    atomic_write_text(out / "results.md", "\n".join(lines))
    _plot(table, out / "results.png")
    from vlmforge.eval.html import from_markdown, image_tag, write_page

    write_page(out / "results.html", lines[0][2:], from_markdown("\n".join(lines)) + [image_tag(out / "results.png")])


def _plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g, rows in table.items() if rows]
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        rows = table[group]
        x = range(len(rows))
        names = list(rows[0]["scores"])
        width = 0.8 / len(names)
        for k, task in enumerate(names):
            off = (k - (len(names) - 1) / 2) * width
            ax.bar(
                [i + off for i in x],
                [r["scores"][task][0] for r in rows],
                width,
                yerr=[r["scores"][task][1] for r in rows],
                label=task,
                capsize=3,
            )
        ax.set_xticks(list(x), [r["cell"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(group)
        ax.set_ylabel("score (x100)")
        ax.set_ylim(0, max(100, *(r["scores"][t][0] + r["scores"][t][1] for r in rows for t in names)))
    axes[0][0].legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
