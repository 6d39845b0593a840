"""lmms-eval's own scoring code, imported from the installed package (the version `make setup-test`
pins), for the differential tests: each task's `utils.py` and the metric functions it calls, loaded
as they are, without the package's task registry (`lmms_eval.tasks.__init__` imports datasets,
models and every task). Nothing is copied here: a change in the pinned package shows in the tests."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path

VERSION = "0.7.3"  # the pin in the Makefile


def _root() -> Path:
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("lmms-eval is not installed: `make setup-test` installs it")
    found = importlib.metadata.version("lmms_eval")
    if found != VERSION:
        raise ImportError(f"lmms-eval {found} is installed; the differential tests are written against {VERSION}")
    return Path(spec.submodule_search_locations[0])


def _namespace(name: str, path: Path) -> None:
    """A package module for `name` over `path` whose __init__ is not run."""
    if name not in sys.modules:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(path)]
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module


def load(name: str):
    """`lmms_eval.<name>` (e.g. "tasks.textvqa.utils"), its parent packages' __init__s skipped.
    `api.metrics` registers its functions through `api.registry`, which imports the model API and
    `evaluate`: a registry whose decorators return the function unchanged stands in for it, and
    sacrebleu (used only by the BLEU metrics) is an empty module."""
    root = _root()
    importlib.import_module("lmms_eval")  # its __init__ is empty
    _namespace("lmms_eval.tasks", root / "tasks")
    _namespace("lmms_eval.api", root / "api")
    if name == "api.metrics":
        registry = types.ModuleType("lmms_eval.api.registry")
        registry.register_metric = registry.register_aggregation = lambda *a, **kw: lambda fn: fn
        sys.modules.setdefault("lmms_eval.api.registry", registry)
        sys.modules.setdefault("sacrebleu", types.ModuleType("sacrebleu"))
    return importlib.import_module(f"lmms_eval.{name}")
