"""Files in and out. Writing is atomic: every artefact is written to a temp name and renamed into
place, so an interrupted job never leaves a half-written file where a complete one is expected.
Reading JSON names the file and what it should have held when it is corrupt."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(path: str | Path, save: Callable[[str], None]) -> None:
    """Call `save(tmp_path)` and rename the result to `path` (for writers that take a path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temp folder beside `path`; on success it replaces `path` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | Path, what: str, error: type[Exception] = ValueError):
    """The JSON in `path`; a corrupt file raises `error` naming the file and `what` it holds."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: corrupt {what} ({e.msg} at line {e.lineno})") from e


def write_json(path: str | Path, obj, indent: int = 1) -> None:
    """`obj` as indented JSON with sorted keys, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def unusable(path, what: str, reason) -> ValueError:
    """The one-line error of a checkpoint vlmforge cannot use: its path, what it was to be, and the
    first line of why (libraries' messages run to paragraphs)."""
    text = str(reason).strip().splitlines()
    return ValueError(f"cannot load {what} from {str(path)!r}: {text[0] if text else type(reason).__name__}")
