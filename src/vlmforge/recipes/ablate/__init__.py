"""`vlmforge ablate`: the Idefics2 comparisons (Laurençon et al. 2024, "What matters when building
vision-language models?"), re-run with several seeds on the built-in synthetic tasks or on any
eval data: vlmforge/LLaVA QA files and the registered benchmarks of `vlmforge eval --bench`.

A grid is groups of cells; a cell is a set of overrides of the model and of the two training
stages (align, sft) (`grids.py`; the built-in grids are `grids/*.yaml`). Every cell of every
group runs `seeds` times (seed s: same data, different initialisation and order) through the
same align → sft → eval pipeline as `vlmforge demo` (`runner.py`), on
shared data and backbones made once per output folder. After every run `results.json` is written
(atomically), so an interrupted ablation resumes with the runs it has not finished; then
`results.md` (mean ± 95% t-interval per task, parameters, visual tokens per image, train time,
tokens/s) and `results.png` are redrawn from it (`report.py`).

Built-in grid `resolution` (LLaVA-UHD, Idefics2): on the synthetic `words` task (a line of 2-4
words on a 256 x 64 canvas, a word per line on 64 x 192; scored as `words`, which word is k-th,
`letters`, how many letters it has, and `count`, how many words), the whole image padded to a
square vs at its native aspect, and no slicing vs a fixed 2 x 2 grid vs adaptive slicing (at most
4 slices), each with its mean visual tokens per held-out image. Its encoder is first taught to read
the words drawn large (budget `read`: `pretrain --reading` on the words' glyphs).

Built-in grid `idefics2`: (1) fully autoregressive vs cross-attention, each with the LM frozen
and with LoRA; (2) connectors: linear, mlp, attention, perceiver 64 and 16, pixel shuffle;
(3) image splitting off vs on; (4) a smaller vs a larger LM (twice as deep, same tokenizer and
encoder). The base every cell starts from is the demo's model (mlp connector with the pooled
token, images squashed, the LM tuned in full). `--quick true` shortens sft (600 steps instead of
the demo's 1,500), not the data, the grid or the seeds. Every run trains from one feature store,
filled once per encoder setting. `--jobs N` runs N cells at once, each in its own process on one CPU thread.

Tasks (what every run is scored on): `shapes` and `text` (held-out synthetic questions, the
default), a QA file (JSON/JSONL, scored by normalised exact match as `vlmforge eval --data`), or
a benchmark name (`textvqa`, `docvqa`, …, read from `--data-root` and scored by its community
metric as `vlmforge eval --bench`). A grid YAML may name its tasks (`eval:`) and its own training
data (`data: {align: [...], sft: [...]}`); paths in a YAML are relative to the YAML's folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

from vlmforge import runtime
from vlmforge.config import TinySpec, save_json
from vlmforge.recipes.ablate import runner
from vlmforge.recipes.ablate.grids import FULL, PAPER, QUICK, Budget, Cell, Grid, load_grid
from vlmforge.recipes.ablate.report import mean_ci, summarize, write_report
from vlmforge.recipes.ablate.tasks import (
    SYNTHETIC_TASKS,
    WORDS_TASKS,
    BenchTask,
    FileTask,
    SyntheticTask,
    Task,
    check_tasks,
    parse_tasks,
    to_dict,
)

__all__ = [
    "FULL",
    "PAPER",
    "QUICK",
    "BenchTask",
    "Budget",
    "Cell",
    "FileTask",
    "Grid",
    "SyntheticTask",
    "Task",
    "ablate",
    "check_tasks",
    "load_grid",
    "mean_ci",
    "parse_tasks",
    "summarize",
    "write_report",
]


def ablate(
    grid: str = "idefics2",
    out: str = "runs/ablate",
    quick: bool = False,
    seeds: int | None = None,
    jobs: int = 0,
    eval: list[str] | None = None,
    data_root: str | None = None,
    limit: int | None = None,
    groups: list[str] | None = None,
) -> dict:
    """Re-run the Idefics2 design comparisons, several seeds per cell, on the synthetic tasks or any eval data.

    Writes OUT/results.md (mean ± 95% CI per task, parameters, visual tokens, train time,
    tokens/s), OUT/results.png and OUT/results.json; finished runs are not re-run.

    Args:
        grid: a built-in grid (idefics2; resolution: pad vs native aspect, no vs fixed vs adaptive
            slicing, on the words task) or a YAML file (groups of cells of model/align/sft overrides).
        out: output folder.
        quick: small data and budgets (same grid and seeds).
        seeds: seeds per cell (default: the grid's, 3 for idefics2).
        jobs: cells run at once, each in its own process on one CPU thread (0: one per CPU core).
        eval: tasks to score every run on (default: the grid's, else shapes text): `shapes`, `text`,
            `words` / `letters` / `count` (with a grid whose budget makes the words data), a benchmark
            name (textvqa, docvqa, ...; needs --data-root), or a QA file; NAME=... names a column.
        data_root: folder holding one folder per benchmark (as `vlmforge eval --bench`).
        limit: only the first N questions of each file or benchmark task.
        groups: run only these groups of the grid (e.g. `tower`); default all.
    """
    g = load_grid(grid)
    g = g.only(groups) if groups else g
    tasks = parse_tasks(eval or g.eval, None, data_root, limit)
    check_tasks(tasks)
    budget = (QUICK if quick else FULL).merged(g.budget)
    if any(isinstance(t, SyntheticTask) and t.synthetic in WORDS_TASKS for t in tasks.values()) and not budget.n_words:
        raise ValueError(
            "eval tasks words, letters and count need the words data: a grid whose budget sets "
            "n_words (e.g. the built-in grid `resolution`)"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results, res_path = _results(out, g, quick, budget, seeds or g.seeds, tasks)
    plan = runner.Plan(g.base, _shared(out, budget, g), budget, tasks)
    todo, aliases = _todo(g, plan, results, out)
    save_json(results, res_path)
    plan.check([t.cell for t in todo])
    if budget.cache_dtype and todo:
        plan.fill_cache([t.cell for t in todo], out / "cache")
    _run_all(todo, aliases, plan, results, res_path, jobs or os.cpu_count() or 1)
    save_json(results, res_path)
    write_report(results, out)
    print((out / "results.md").read_text())
    return results


def _results(out: Path, g: Grid, quick: bool, budget: Budget, n_seeds: int, tasks: dict) -> tuple[dict, Path]:
    """results.json: the runs so far, for this grid, budget and tasks only."""
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {"runs": {}}
    grid, task_dicts = g.to_dict(), {k: to_dict(t) for k, t in tasks.items()}
    old_tasks = results.get("tasks", {t: {"synthetic": t} for t in SYNTHETIC_TASKS})
    if (
        results.get("grid", grid) != grid
        or results.get("quick", quick) != quick
        or (results["runs"] and old_tasks != task_dicts)
    ):
        raise ValueError(f"{res_path} holds results of another grid, budget or eval tasks; use a new --out")
    results.update(grid=grid, quick=quick, budget=dataclasses.asdict(budget), seeds=n_seeds, tasks=task_dicts)
    return results, res_path


def _shared(out: Path, budget: Budget, g: Grid):
    """The synthetic data and tiny backbones every cell shares (made once; reused on resume)."""
    from vlmforge.recipes.pipeline import synthetic_setup

    spec = dataclasses.replace(TinySpec(), **budget.spec)
    need_large = any(cell.lm == "large" for _, cell in g.cells)
    large = dataclasses.replace(spec, **budget.large_spec) if need_large else None
    return synthetic_setup(
        out, budget.n_shapes, budget.n_text, budget.n_test, spec, large, g.data, budget.n_words, budget.read
    )


class _Pending(NamedTuple):
    """A run still to do: its key in results.json, its cell and seed, the configuration's
    fingerprint and the folder it trains in."""

    key: str
    group: str
    cell: Cell
    seed: int
    config: str
    run_dir: Path


def _todo(g: Grid, plan: runner.Plan, results: dict, out: Path) -> tuple[list[_Pending], dict]:
    """The runs still to do, and for each the
    keys of the other cells that resolve to the same configuration (`aliases`): those share its run."""
    n_seeds = results["seeds"]
    done_by_config = {(r.get("config"), r["seed"]): k for k, r in results["runs"].items()}
    todo, aliases = [], {}
    for group, cell in g.cells:
        fp = plan.fingerprint(cell)
        for seed in range(n_seeds):
            key = f"{group}/{cell.name}/seed{seed}"
            if key in results["runs"]:
                continue
            first = done_by_config.get((fp, seed))
            if first in results["runs"]:  # the same configuration already ran for another cell
                results["runs"][key] = {**results["runs"][first], "group": group, "cell": cell.name, "same_as": first}
                continue
            if first is not None:
                aliases[first].append((key, group, cell))
                continue
            done_by_config[(fp, seed)] = key
            aliases[key] = []
            safe = cell.name.replace(" ", "_").replace("/", "_")
            todo.append(_Pending(key, group, cell, seed, fp, out / "runs" / group / safe / f"seed{seed}"))
    return todo, aliases


def _run_all(todo: list[_Pending], aliases: dict, plan: runner.Plan, results: dict, res_path: Path, jobs: int) -> None:
    """Every run of `todo`, `jobs` at a time; results.json written after each, so that an
    interrupted ablation resumes with what it has not finished."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="ablate", unit="run")

    def record(key, group, cell, seed, fp, run_dir, result):
        results["runs"][key] = {"group": group, "cell": cell.name, "seed": seed, "config": fp, **result}
        for other, other_group, other_cell in aliases[key]:
            same = {"group": other_group, "cell": other_cell.name, "same_as": key}
            results["runs"][other] = {**results["runs"][key], **same}
        save_json(results, res_path)
        shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints and models of finished runs are not kept
        bar.update(1)
        bar.set_postfix_str(key)

    if jobs <= 1:
        for key, group, cell, seed, fp, run_dir in todo:
            record(key, group, cell, seed, fp, run_dir, runner.run(plan, cell, seed, run_dir))
    else:
        ctx = multiprocessing.get_context("spawn")
        with runtime.progress_bars(False):  # inherited by the workers: one progress bar, the parent's
            with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=runtime.die_with_parent) as pool:
                running = {pool.submit(runner.run_one_thread, plan, t.cell, t.seed, t.run_dir): t for t in todo}
                try:
                    while running:
                        finished, _ = wait(running, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            record(*running.pop(fut), fut.result())  # a failed run raises here
                except BaseException:  # finished runs are saved; queued ones are not started
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    bar.close()
