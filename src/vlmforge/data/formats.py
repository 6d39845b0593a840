"""Loading and validating conversation data: LLaVA JSON files and Hugging Face datasets.

A record is `{"id", "image", "conversations": [{"from": "human"|"gpt", "value": "<image>\\n…"}]}`;
`image` (a path relative to the JSON file, or a list of them) is optional. Files may be a JSON
list or JSON lines. Every record is validated when the file is read, so malformed records fail
before any training starts, with one error naming the file and each bad record.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vlmforge.io import atomic_write_bytes

IMAGE_MARKER = "<image>"
SHOWN_ERRORS = 20  # malformed records named in one error; the rest are counted
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """Malformed data; the message names the file and the record."""


@dataclass
class Record:
    id: str
    images: list[Path]
    messages: list[dict]  # [{"role": "user"|"assistant"|"system", "content": str}]
    where: str = ""  # "file.json record 12 (id=...)" for error messages
    extra: dict = field(default_factory=dict)


def read_jsonl(path: str | Path) -> list:
    """One JSON value per non-blank line; a bad line raises `DataError` naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: malformed JSON line ({e.msg})") from e
    return rows


def _read(path: Path) -> list:
    datasets_marks = ("dataset_info.json", "dataset_dict.json", "state.json")
    if path.is_dir() and (
        any((path / m).is_file() for m in datasets_marks) or any(path.glob("*.parquet")) or any(path.glob("*.arrow"))
    ):
        raise DataError(
            f"{path}: a Hugging Face datasets folder (save_to_disk, or parquet / arrow files), "
            f"not a data file: give it as hf:{path}"
        )
    if path.is_file() and path.suffix in (".parquet", ".arrow"):
        raise DataError(f"{path}: a {path.suffix[1:]} file is read through datasets: give it as hf:{path}")
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a data file (a LLaVA .json / .jsonl file, or hf:FOLDER)")
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg})") from e
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    return rows


def parse_record(row: object, index: int, path: Path, image_root: Path) -> Record:
    rid = row.get("id") if isinstance(row, dict) else None
    where = f"{path} record {index}" + (f" (id={rid})" if rid is not None else "")
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    messages = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise DataError(
                f"{where}: turn {t} must be {{'from': 'human'|'gpt'|'system', 'value': str}}, got {turn!r:.80}"
            )
        messages.append({"role": ROLES[turn["from"]], "content": turn["value"]})
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if not roles or roles[0] != "user" or any(a == b for a, b in zip(roles, roles[1:])):
        raise DataError(f"{where}: turns must alternate human/gpt starting with human, got {roles}")
    image = row.get("image")
    names = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{where}: 'image' must be a path or a list of paths")
    markers = sum(m["content"].count(IMAGE_MARKER) for m in messages)
    if names and markers == 0:  # LLaVA convention: the image goes before the first question
        first = next(m for m in messages if m["role"] == "user")
        first["content"] = IMAGE_MARKER * len(names) + "\n" + first["content"]
    elif markers != len(names):
        raise DataError(f"{where}: {markers} '<image>' markers in the text but {len(names)} images")
    if any(IMAGE_MARKER in m["content"] for m in messages if m["role"] != "user"):
        raise DataError(f"{where}: '<image>' markers are only allowed in human turns")
    extra = {k: v for k, v in row.items() if k not in ("id", "image", "conversations")}
    return Record(str(rid if rid is not None else index), [image_root / n for n in names], messages, where, extra)


def parse_records(
    rows: list[tuple[int, object]], path: Path, image_root: Path, errors: list[str] | None = None
) -> list[Record]:
    """Validate the (index, row) pairs of one source. Every malformed record (and each of
    `errors`, found earlier) is named in one `DataError`: the first `SHOWN_ERRORS`, then how many
    more; the well-formed records whose image is missing or cannot be decoded are named in the same
    error, so that one pass shows everything to fix."""
    records, errors = [], list(errors or [])
    for i, row in rows:
        try:
            records.append(parse_record(row, i, path, image_root))
        except DataError as e:
            errors.append(str(e))
    if not errors:
        return records
    bad_images = _unreadable_images(records)
    problems = errors + bad_images
    if len(problems) == 1:
        raise DataError(problems[0])
    more = f"\n  … and {len(problems) - SHOWN_ERRORS} more" if len(problems) > SHOWN_ERRORS else ""
    shown = "\n  ".join(problems[:SHOWN_ERRORS])
    images = f" and {len(bad_images)} with an unreadable image" if bad_images else ""
    raise DataError(
        f"{path}: {len(errors)} malformed records{images} of {len(records) + len(errors)}:\n  {shown}{more}"
    )


def _unreadable_images(records: list[Record]) -> list[str]:
    """'record …: image error' for each record whose image is missing or cannot be decoded."""
    from vlmforge.data.images import ImageError, load_image

    out = []
    for r in records:
        for p in r.images:
            try:
                load_image(p)
            except ImageError as e:
                out.append(f"{r.where}: {e}")
                break
    return out


def load_records(path: str | Path, image_root: str | Path | None = None) -> list[Record]:
    """Read and validate a LLaVA JSON/JSONL file, or a Hugging Face dataset written
    `hf:WHERE[:SUBSET][@SPLIT]` (below); image paths are relative to `image_root` (default:
    the file's folder). Every malformed record is named in one error, not only the first."""
    if is_source(path):
        return load_hf_records(str(path))
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    return parse_records(list(enumerate(_read(path))), path, root)


# ---- Hugging Face datasets -------------------------------------------------------------------
# A source is written `hf:WHERE[:SUBSET][@SPLIT]` wherever a data file is accepted (`--train.data`,
# `cache build --data`, `eval --data`, an ablation grid's `data:`). WHERE is a folder written by
# `Dataset.save_to_disk` (a `DatasetDict` too: SPLIT picks one, default `train` or its only split),
# a `.parquet` / `.arrow` file or a folder of them, or a Hub id with its subset (read through
# `datasets.load_dataset`, so offline from the local cache when `HF_DATASETS_OFFLINE=1`).
#
# Layouts, told apart by their columns:
# - the_cauldron: `images` (a list of images) and `texts` (a list of `{user, assistant}` turns);
# - TRL / mlx-vlm: `messages` (`{role, content}`, content a string or parts `{"type": "image"}` /
#   `{"type": "text", "text": ...}`) and `images`;
# - LLaVA: `conversations` and `image` (an image cell or a path).
#
# Image cells (`datasets.Image`: bytes, or a path) are not decoded here: their bytes are written
# once to a folder keyed by their content hash (`VLMFORGE_IMAGE_DIR`, default
# `~/.cache/vlmforge/images`), so that every image then goes through the same checks as an image
# file (a corrupt one is named with its record) and the feature store keys it as a file. Each row
# becomes a LLaVA record validated as a file's are: every malformed row is named in one error.

HF_PREFIX = "hf:"
HF_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


def is_source(data: str | Path) -> bool:
    return str(data).startswith(HF_PREFIX)


def parse_source(source: str) -> tuple[str, str | None, str | None]:
    """`hf:WHERE[:SUBSET][@SPLIT]` -> (WHERE, SUBSET, SPLIT)."""
    rest = source[len(HF_PREFIX) :]
    rest, _, split = rest.partition("@")
    where, _, subset = rest.partition(":")
    if not where:
        raise DataError(f"{source}: no dataset named (write hf:FOLDER, hf:FILE.parquet or hf:HUB_ID[:SUBSET][@SPLIT])")
    return where, subset or None, split or None


def open_dataset(source: str, streaming: bool = False):
    """The `datasets.Dataset` a source names (rows not decoded); with `streaming`, an
    `IterableDataset` that reads its files (or the Hub) lazily, holding nothing but the current rows."""
    import datasets

    where, subset, split = parse_source(source)
    path = Path(where).expanduser()
    try:
        saved = ("dataset_info.json", "dataset_dict.json", "state.json")  # what save_to_disk writes
        if path.is_dir() and any((path / f).is_file() for f in saved):
            ds = datasets.load_from_disk(str(path))  # memory-mapped arrow: made iterable below
        elif path.exists():
            files = [path] if path.is_file() else sorted(path.rglob("*.parquet")) or sorted(path.rglob("*.arrow"))
            if not files:
                raise DataError(f"{source}: {path} holds no dataset (save_to_disk folder, parquet or arrow files)")
            ds = load_files(files, split, streaming)
        else:
            ds = datasets.load_dataset(where, subset, split=split or "train", streaming=streaming)
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds; name the source and the first line
        first = (str(e).splitlines() or [""])[0][:300]
        raise DataError(f"{source}: cannot open the dataset ({type(e).__name__}: {first})") from e
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        names = list(ds)
        pick = split or ("train" if "train" in ds else names[0] if len(names) == 1 else None)
        if pick not in ds:
            raise DataError(f"{source}: pick a split with @SPLIT (it has {', '.join(names)})")
        ds = ds[pick]
    if streaming and isinstance(ds, datasets.Dataset):
        ds = ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds))))
    return ds.decode(False) if streaming else ds  # image cells as stored, as `dataset_rows` gives them


def load_files(files: list[Path], split: str | None = None, streaming: bool = False):
    """A `datasets.Dataset` of parquet or arrow files (memory-mapped from datasets' cache), or with
    `streaming` an `IterableDataset` reading them in place (one shard per file)."""
    import datasets

    kind = "arrow" if files[0].suffix == ".arrow" else "parquet"
    return datasets.load_dataset(kind, data_files=[str(f) for f in files], split=split or "train", streaming=streaming)


def dataset_rows(ds) -> Iterator[dict]:
    """The rows of a `datasets.Dataset` as plain dicts, images as their stored cells (not decoded)."""
    for batch in ds.with_format("arrow").iter(batch_size=64):
        yield from batch.to_pylist()


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
            atomic_write_bytes(path, data)
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
        conversations = [
            {"from": HF_ROLES.get(m.get("role"), m.get("role")), "value": _content(m.get("content"), where)}
            for m in messages
        ]
        images = row.get("images") or []
    else:
        raise DataError(
            f"{where}: no known layout (columns {sorted(row)}: expected texts + images, messages + images, "
            "or conversations + image)"
        )
    rid = row.get("id", row.get("question_id"))
    return {"id": rid, "image": [_image_path(c, where, base) for c in images], "conversations": conversations}


def source_folder(source: str) -> Path:
    """The folder a source's relative image paths are read from."""
    base = Path(parse_source(source)[0]).expanduser().resolve()
    return base if base.is_dir() else base.parent


def hf_record(row: dict, index: int, source: str, base: Path) -> Record:
    """One dataset row as a validated `Record` (its image cells as files)."""
    return parse_record(to_llava(row, f"{source} row {index}", base), index, Path(source), Path("/"))


def load_hf_records(source: str) -> list[Record]:
    """The records of a `hf:` source (see the module's doc)."""
    ds = open_dataset(source)
    base = source_folder(source)
    rows, failed = [], []
    for i, row in enumerate(dataset_rows(ds)):
        try:
            rows.append((i, to_llava(row, f"{source} row {i}", base)))
        except DataError as e:
            failed.append(str(e))
    return parse_records(rows, Path(source), Path("/"), failed)
