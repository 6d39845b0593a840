"""Loading and validating LLaVA conversation data.

A record is `{"id", "image", "conversations": [{"from": "human"|"gpt", "value": "<image>\\n…"}]}`;
`image` (a path relative to the JSON file, or a list of them) is optional. Files may be a JSON
list or JSON lines. Every record is validated when the file is read, so malformed records fail
before any training starts, with one error naming the file and each bad record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

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


def parse_records(rows: list[tuple[int, object]], path: Path, image_root: Path,
                  errors: list[str] | None = None) -> list[Record]:  # fmt: skip
    """Validate the (index, row) pairs of one source. Every malformed record (and each of
    `errors`, found earlier) is named in one `DataError`: the first `SHOWN_ERRORS`, then how many
    more."""
    records, errors = [], list(errors or [])
    for i, row in rows:
        try:
            records.append(parse_record(row, i, path, image_root))
        except DataError as e:
            errors.append(str(e))
    if len(errors) == 1:
        raise DataError(errors[0])
    if errors:
        more = f"\n  … and {len(errors) - SHOWN_ERRORS} more" if len(errors) > SHOWN_ERRORS else ""
        shown = "\n  ".join(errors[:SHOWN_ERRORS])
        raise DataError(f"{path}: {len(errors)} malformed records of {len(records) + len(errors)}:\n  {shown}{more}")
    return records


def load_records(path: str | Path, image_root: str | Path | None = None) -> list[Record]:
    """Read and validate a LLaVA JSON/JSONL file, or a Hugging Face dataset written
    `hf:WHERE[:SUBSET][@SPLIT]` (`data.hf`); image paths are relative to `image_root` (default:
    the file's folder). Every malformed record is named in one error, not only the first."""
    from vlmforge.data import hf

    if hf.is_source(path):
        return hf.load_hf_records(str(path))
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    return parse_records(list(enumerate(_read(path))), path, root)
