"""The grids of `vlmforge ablate`, typed: a `Grid` holds groups of `Cell`s (overrides of the model and
of the two training stages) and overrides of a `Budget` (data sizes, backbone specs, stage
settings). The built-in grids are YAML files in `grids/`, read by the same path as a user's."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vlmforge.recipes.ablate.tasks import Task, parse_tasks, to_dict

GRID_DIR = Path(__file__).with_name("grids")

# The paper's figures, kept for the report (Idefics2, Tables 2-4 and section 3.3).
PAPER = {
    "architecture": "FA + LoRA 69.5 vs CA + LoRA 67.3 (avg. score, Table 3)",
    "connector": "perceiver 60.3 vs mapping network 51.8 vs linear 44.5 (Table 4: pooling + projection)",
    "splitting": "TextVQA 70.4 -> 73.0, DocVQA 67.3 -> 74.0 with image splitting",
    "lm": "a better LM backbone gives a better VLM (Table 2)",
    "tower": "frozen backbones 60.3 vs LoRA on both 69.5; unfreezing everything diverged (section 3.3)",
}


@dataclass(frozen=True)
class Cell:
    """One configuration: overrides of the model and of the align and sft stages, and which of
    the shared LMs it starts from (`small`, or `large`: twice as deep, same tokenizer and encoder)."""

    name: str
    model: dict = field(default_factory=dict)
    align: dict = field(default_factory=dict)
    sft: dict = field(default_factory=dict)
    lm: str = "small"

    @classmethod
    def from_dict(cls, d: dict, where: str) -> Cell:
        if not isinstance(d, dict) or "name" not in d:
            raise ValueError(f"{where}: every cell needs a name")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{where}: cell {d['name']!r} has unknown keys {sorted(unknown)}")
        if d.get("lm", "small") not in ("small", "large"):
            raise ValueError(f"{where}: cell {d['name']!r}: lm is small or large, not {d['lm']!r}")
        return cls(**{k: v if v is not None else {} for k, v in d.items()})

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v or k == "name"}


@dataclass(frozen=True)
class Budget:
    """Data sizes, backbone specs and stage overrides every cell of a grid shares. Every run trains
    from one feature store of `cache_dtype` (None: the images are encoded again every step)."""

    n_shapes: int = 3000
    n_text: int = 500
    n_test: int = 300
    n_words: int = 0  # the `words` task's images per canvas (the words, letters and count tasks)
    read: bool = False  # the encoder also learns to read (`pretrain --reading`)
    spec: dict = field(default_factory=dict)  # TinySpec overrides of the backbones
    large_spec: dict = field(default_factory=lambda: {"lm_layers": 4})  # and of the larger LM
    batch_size: int | None = None
    align: dict = field(default_factory=dict)
    sft: dict = field(default_factory=dict)
    cache_dtype: str | None = "fp16"

    def merged(self, overrides: dict | None, where: str = "budget") -> Budget:
        unknown = set(overrides or {}) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"{where}: unknown budget keys {sorted(unknown)}")
        return dataclasses.replace(self, **(overrides or {}))


FULL = Budget()  # the demo's stages
# quick: 600 sft steps, an image's questions batched together sharing its tokens (`group_by_image`)
QUICK = Budget(n_test=200, sft={"max_steps": 600, "group_by_image": True})


@dataclass(frozen=True)
class Grid:
    """Groups of cells, the overrides every cell starts from (`base`), the seeds per cell, the
    budget's overrides, the tasks every run is scored on and, optionally, training data of the
    user's own (`data: {align: [...], sft: [...]}`)."""

    name: str
    groups: dict[str, list[Cell]]
    seeds: int = 3
    base: dict = field(default_factory=dict)
    budget: dict = field(default_factory=dict)
    eval: dict[str, Task] | None = None
    data: dict | None = None

    @property
    def cells(self) -> list[tuple[str, Cell]]:
        return [(group, cell) for group, cells in self.groups.items() for cell in cells]

    def only(self, groups: list[str]) -> Grid:
        unknown = sorted(set(groups) - set(self.groups))
        if unknown:
            raise ValueError(
                f"grid {self.name!r} has no group {', '.join(map(repr, unknown))} "
                f"(its groups: {', '.join(self.groups)})"
            )
        return dataclasses.replace(self, groups={k: v for k, v in self.groups.items() if k in groups})

    def to_dict(self) -> dict:
        d = {"name": self.name, "seeds": self.seeds, "base": self.base, "budget": self.budget}
        d["groups"] = {g: [c.to_dict() for c in cells] for g, cells in self.groups.items()}
        if self.eval:
            d["eval"] = {k: to_dict(t) for k, t in self.eval.items()}
        if self.data is not None:
            d["data"] = self.data
        return d


def built_in() -> list[str]:
    return sorted(p.stem for p in GRID_DIR.glob("*.yaml"))


def load_grid(grid: str) -> Grid:
    """A built-in grid by name (`grids/NAME.yaml`) or a YAML file; paths in it are relative to its folder."""
    from vlmforge.data.formats import is_source

    path = GRID_DIR / f"{grid}.yaml" if grid in built_in() else Path(grid)
    if not path.is_file():
        raise FileNotFoundError(f"grid {grid!r}: neither a built-in grid ({', '.join(built_in())}) nor a YAML file")
    try:
        g = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: malformed YAML ({e})") from e
    if not isinstance(g, dict) or not isinstance(g.get("groups"), dict) or not g["groups"]:
        raise ValueError(f"{path}: a grid needs `groups:` mapping group names to lists of cells")
    unknown = set(g) - {f.name for f in dataclasses.fields(Grid)}
    if unknown:
        raise ValueError(f"{path}: unknown grid keys {sorted(unknown)}")
    groups = {
        group: [Cell.from_dict(c, f"{path}, group {group!r}") for c in cells] for group, cells in g["groups"].items()
    }
    base = path.resolve().parent
    FULL.merged(g.get("budget"), f"{path}: budget")  # unknown keys fail here, before anything runs
    data = g.get("data")
    if data is not None:
        if not isinstance(data, dict) or not data.get("sft") or set(data) - {"align", "sft"}:
            raise ValueError(f"{path}: `data:` needs `sft:` (and optionally `align:`) lists of files")
        data = {
            k: [f if is_source(f) else str(base / f) for f in ([v] if isinstance(v, str) else v)]
            for k, v in data.items()
        }
        for f in (f for v in data.values() for f in v):
            if not Path(f).is_file() and not is_source(f):
                raise FileNotFoundError(f"{path}: training data {f} does not exist")
    return Grid(
        name=g.get("name", path.stem),
        groups=groups,
        seeds=int(g.get("seeds", 3)),
        base=g.get("base") or {},
        budget=g.get("budget") or {},
        eval=parse_tasks(g["eval"], base) if g.get("eval") else None,
        data=data,
    )
