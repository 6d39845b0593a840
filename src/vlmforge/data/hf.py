"""Hugging Face `datasets` as a source of records, beside LLaVA JSON.

A source is written `hf:WHERE[:SUBSET][@SPLIT]` wherever a data file is accepted (`--train.data`,
`cache build --data`, `eval --data`, an ablation grid's `data:`). WHERE is a folder written by
`Dataset.save_to_disk` (a `DatasetDict` too: SPLIT picks one, default `train` or its only split),
a `.parquet` / `.arrow` file or a folder of them, or a Hub id with its subset (read through
`datasets.load_dataset`, so offline from the local cache when `HF_DATASETS_OFFLINE=1`).

Layouts, told apart by their columns:
- the_cauldron: `images` (a list of images) and `texts` (a list of `{user, assistant}` turns);
- TRL / mlx-vlm: `messages` (`{role, content}`, content a string or parts `{"type": "image"}` /
  `{"type": "text", "text": ...}`) and `images`;
- LLaVA: `conversations` and `image` (an image cell or a path).

Image cells (`datasets.Image`: bytes, or a path) are not decoded here: their bytes are written
once to a folder keyed by their content hash (`VLMFORGE_IMAGE_DIR`, default
`~/.cache/vlmforge/images`), so that every image then goes through the same checks as an image
file (a corrupt one is named with its record) and the feature store keys it as a file. Each row
becomes a LLaVA record validated as a file's are: every malformed row is named in one error.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from vlmforge.data.formats import DataError, Record, parse_records

PREFIX = "hf:"
ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


def is_source(data: str | Path) -> bool:
    return str(data).startswith(PREFIX)


def parse_source(source: str) -> tuple[str, str | None, str | None]:
    """`hf:WHERE[:SUBSET][@SPLIT]` -> (WHERE, SUBSET, SPLIT)."""
    rest = source[len(PREFIX) :]
    rest, _, split = rest.partition("@")
    where, _, subset = rest.partition(":")
    if not where:
        raise DataError(f"{source}: no dataset named (write hf:FOLDER, hf:FILE.parquet or hf:HUB_ID[:SUBSET][@SPLIT])")
    return where, subset or None, split or None


def open_dataset(source: str):
    """The `datasets.Dataset` a source names (rows not decoded)."""
    import datasets

    where, subset, split = parse_source(source)
    path = Path(where).expanduser()
    try:
        saved = ("dataset_info.json", "dataset_dict.json", "state.json")  # what save_to_disk writes
        if path.is_dir() and any((path / f).is_file() for f in saved):
            ds = datasets.load_from_disk(str(path))
        elif path.exists():
            files = [path] if path.is_file() else sorted(path.rglob("*.parquet")) or sorted(path.rglob("*.arrow"))
            if not files:
                raise DataError(f"{source}: {path} holds no dataset (save_to_disk folder, parquet or arrow files)")
            kind = "arrow" if files[0].suffix == ".arrow" else "parquet"
            ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split=split or "train")
        else:
            ds = datasets.load_dataset(where, subset, split=split or "train")
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds; name the source and the first line
        first = (str(e).splitlines() or [""])[0][:300]
        raise DataError(f"{source}: cannot open the dataset ({type(e).__name__}: {first})") from e
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        pick = split or ("train" if "train" in ds else names[0] if len(names) == 1 else None)
        if pick not in ds:
            raise DataError(f"{source}: pick a split with @SPLIT (it has {', '.join(names)})")
        ds = ds[pick]
    return ds


def image_dir() -> Path:
    return Path(os.environ.get("VLMFORGE_IMAGE_DIR") or Path.home() / ".cache" / "vlmforge" / "images")


def _image_path(cell, where: str, base: Path) -> str:
    """An image cell as a file path: its bytes written once under `image_dir()` by content hash,
    or its own path (relative to the dataset's folder) when it has no bytes."""
    if isinstance(cell, str):
        return str(base / cell)
    if isinstance(cell, dict) and cell.get("bytes"):
        data = bytes(cell["bytes"])
        folder = image_dir()
        path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}{Path(cell.get('path') or '').suffix or '.img'}"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return str(path)
    if isinstance(cell, dict) and cell.get("path"):
        return str(base / cell["path"])
    raise DataError(f"{where}: an image cell with neither bytes nor a path")


def _content(content, where: str) -> str:
    """A message's content (a string, or a list of image / text parts) as text with `<image>` markers."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"{where}: a message's content must be a string or a list of parts")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            out.append("<image>")
        elif kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        else:
            raise DataError(f"{where}: a content part must be {{'type': 'image'}} or {{'type': 'text', 'text': str}}")
    return "\n".join(out)


def to_llava(row: dict, where: str, base: Path) -> dict:
    """One dataset row as a LLaVA record (`conversations`, `image` as paths)."""
    if "conversations" in row:
        images = row.get("image")
        images = [] if images is None else images if isinstance(images, list) else [images]
        conversations = row["conversations"]
    elif "texts" in row:
        turns = row.get("texts")
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise DataError(f"{where}: 'texts' must be a list of {{user, assistant}} turns")
        pairs = (("human", "user"), ("gpt", "assistant"))
        conversations = [{"from": f, "value": t.get(k)} for t in turns for f, k in pairs]
        images = row.get("images") or []
    elif "messages" in row:
        messages = row.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}}")
        conversations = [{"from": ROLES.get(m.get("role"), m.get("role")), "value": _content(m.get("content"), where)}
                         for m in messages]  # fmt: skip
        images = row.get("images") or []
    else:
        raise DataError(f"{where}: no known layout (columns {sorted(row)}: expected texts + images, messages + images, "
                        "or conversations + image)")  # fmt: skip
    rid = row.get("id", row.get("question_id"))
    return {"id": rid, "image": [_image_path(c, where, base) for c in images], "conversations": conversations}


def load_hf_records(source: str) -> list[Record]:
    """The records of a `hf:` source (see the module's doc)."""
    ds = open_dataset(source)
    where, _, _ = parse_source(source)
    base = Path(where).expanduser().resolve()
    base = base if base.is_dir() else base.parent
    rows, failed = [], []
    for i, row in enumerate(r for batch in ds.with_format("arrow").iter(batch_size=256) for r in batch.to_pylist()):
        try:
            rows.append((i, to_llava(row, f"{source} row {i}", base)))
        except DataError as e:
            failed.append(str(e))
    return parse_records(rows, Path(source), Path("/"), failed)
