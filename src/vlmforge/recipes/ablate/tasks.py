"""What every run of an ablation is scored on: a `Task` is one of three kinds, each a type of its
own: the synthetic held-out questions, a QA file, or a registered benchmark."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

SYNTHETIC_TASKS = ("shapes", "text")  # the default tasks
WORDS_TASKS = ("words", "letters", "count")  # the words task's question kinds (a budget with n_words makes them)


@dataclass(frozen=True)
class SyntheticTask:
    """The held-out questions of a synthetic task the ablation made (`shapes`, `text`, `words`…)."""

    synthetic: str


@dataclass(frozen=True)
class FileTask:
    """A QA file (LLaVA JSON/JSONL), scored by normalised exact match as `vlmforge eval --data`."""

    file: str
    limit: int | None = None


@dataclass(frozen=True)
class BenchTask:
    """A benchmark of `vlmforge eval --bench`, read from `root`, scored by its community metric."""

    bench: str
    root: str
    split: str | None = None
    limit: int | None = None
    max_new_tokens: int = 32


Task = SyntheticTask | FileTask | BenchTask


def to_dict(task: Task) -> dict:
    """The task as results.json and a grid YAML write it: what differs from the defaults."""
    required = {"synthetic", "file", "bench", "root"}
    defaults = {f.name: f.default for f in dataclasses.fields(task)}
    return {k: v for k, v in dataclasses.asdict(task).items() if k in required or v != defaults[k]}


def from_dict(spec: dict, where: str) -> Task:
    for kind in (SyntheticTask, FileTask, BenchTask):
        key = dataclasses.fields(kind)[0].name
        if key in spec:
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(spec) - names
            if unknown:
                raise ValueError(f"eval task {where!r}: unknown keys {sorted(unknown)} for a `{key}:` task")
            return kind(**spec)
    raise ValueError(f"eval task {where!r}: give `file:` or `bench:` ({spec})")


def parse_tasks(items, base: Path | None = None, data_root: str | None = None, limit: int | None = None) -> dict:
    """Eval tasks from `--eval` words or a grid's `eval:` → {name: Task}.

    A word is `shapes` / `text` (synthetic), a registered benchmark name (read from `data_root`),
    or a QA file path; `NAME=WORD` names the column. A YAML mapping may also give
    `{bench: NAME, root: DIR, split: S, limit: N}` or `{file: PATH, limit: N}`.
    """
    from vlmforge.eval.benchmarks import BENCHMARKS

    if not items:
        return {t: SyntheticTask(t) for t in SYNTHETIC_TASKS}
    if isinstance(items, str):
        items = [items]
    pairs = (
        list(items.items())
        if isinstance(items, dict)
        else [tuple(w.split("=", 1)) if "=" in w else (None, w) for w in map(str, items)]
    )
    tasks: dict[str, Task] = {}
    for name, spec in pairs:
        if isinstance(spec, (SyntheticTask, FileTask, BenchTask)):
            spec = to_dict(spec)
        if isinstance(spec, dict):
            spec = dict(spec)
        elif spec in SYNTHETIC_TASKS + WORDS_TASKS:
            spec = {"synthetic": spec}
        elif spec.lower() in BENCHMARKS:
            spec = {"bench": spec.lower()}
        else:
            spec = {"file": spec}
        if "file" in spec:
            path = Path(spec["file"])
            spec["file"] = str(path.absolute() if base is None else base / path)
        if "bench" in spec:
            spec.setdefault("root", data_root)
            if spec["root"] is None:
                raise ValueError(f"eval task {spec['bench']!r} is a benchmark: give --data-root (or `root:`)")
            root = Path(spec["root"])
            spec["root"] = str(root.absolute() if base is None else base / root)
        if limit is not None and "synthetic" not in spec:
            spec.setdefault("limit", limit)
        task = from_dict(spec, name or str(spec))
        name = name or spec.get("synthetic") or spec.get("bench") or Path(spec["file"]).stem
        if name in tasks:
            raise ValueError(f"eval task {name!r} is given twice")
        tasks[name] = task
    return tasks


def check_tasks(tasks: dict[str, Task]) -> None:
    """Fail before any training when an eval task cannot be read."""
    from vlmforge.data.formats import load_records
    from vlmforge.eval.benchmarks import get_benchmark

    for name, task in tasks.items():
        if isinstance(task, FileTask):
            if not Path(task.file).is_file():
                raise FileNotFoundError(f"eval task {name!r}: no file {task.file}")
            load_records(task.file)  # validates every record, naming the file and the row
        elif isinstance(task, BenchTask):
            get_benchmark(task.bench).rows(task.root, task.split)


def describe(task: Task) -> str:
    if isinstance(task, SyntheticTask):
        return "held-out synthetic questions, exact match"
    limit = f", first {task.limit}" if task.limit else ""
    if isinstance(task, FileTask):
        return f"{task.file}, normalised exact match{limit}"
    from vlmforge.eval.benchmarks import get_benchmark

    return f"benchmark {task.bench} from {task.root}, {get_benchmark(task.bench).metric}{limit}"
