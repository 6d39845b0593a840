"""Turning records into padded batches.

`VQADataset` encodes a record (prompt, labels, and per image either its cached features or its
pixels). An unreadable image or an over-long record is, by policy, either skipped (the item comes
back as a `skipped` marker that the training loop counts and reports) or fatal (a `DataError`
naming the record and the file).

With `share_images`, records of one image in a batch become one sequence: their common prefix
(the chat header and the image block) once, then each record's own tokens, each attending only
to the prefix and to itself (a block mask [B, 1, L, L]) at the positions it would have alone.
With `pack`, several records (or such groups) share a sequence up to a token budget, each
attending only to its own tokens (block-diagonal). Either way the loss and its gradients are
those of the records apart, and a record is never split.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from vlmforge.data.formats import DataError, Record
from vlmforge.data.images import ImageError, ImageProcessor, load_image
from vlmforge.data.prompts import IGNORE, PromptBuilder


class VQADataset(Dataset):
    def __init__(
        self,
        records: list[Record],
        prompts: PromptBuilder,
        processor: ImageProcessor,
        max_len: int = 512,
        bad_images: str = "skip",
        max_image_pixels: int = 64_000_000,
        features=None,
        require_features: bool = False,
    ):
        if bad_images not in ("skip", "fail"):
            raise ValueError(f"bad_images must be 'skip' or 'fail', got {bad_images!r}")
        self.records, self.prompts, self.processor = records, prompts, processor
        self.max_len, self.bad_images, self.max_image_pixels = max_len, bad_images, max_image_pixels
        self.features = features  # a FeatureReader, or None to always decode pixels
        self.require_features = require_features  # a missing feature is an error (the encoder is gone)
        self._encoded: dict[int, tuple[list[int], list[int]]] = {}  # tokenized once per record

    def __len__(self) -> int:
        return len(self.records)

    def _bad(self, rec: Record, reason: str) -> dict:
        if self.bad_images == "fail":
            raise DataError(f"{rec.where}: {reason}")
        return {"skipped": f"{rec.where}: {reason}"}

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        try:  # the images first: with adaptive slicing or native resolution their sizes shape the prompt
            views, sizes = zip(*[self._image(p) for p in rec.images]) if rec.images else ((), ())
        except ImageError as e:
            return self._bad(rec, str(e))
        if i not in self._encoded:
            self._encoded[i] = self.prompts.encode(rec.messages, list(sizes))
        ids, labels = self._encoded[i]
        if len(ids) > self.max_len:
            return self._bad(rec, f"{len(ids)} tokens > max_len {self.max_len}")
        return {"input_ids": ids, "labels": labels, "id": rec.id, "views": list(views), "images": tuple(rec.images)}

    def _image(self, path) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """(cached features [V, P, D] when the store has them, else pixels [V, 3, H, W]; the
        image's (width, height))."""
        if self.features is not None:
            try:
                key = self.features.key(path)  # the file's content hash: read once for both lookups
            except FileNotFoundError as e:
                raise ImageError(str(e)) from None
            feats = self.features.by_key(key)
            if feats is not None:
                return feats, self.features.image_size(key)
            if self.require_features:
                raise DataError(
                    f"{path}: the feature store has no features of this image (build them with `vlmforge "
                    "cache build`, or train with --train.cache_missing encode)"
                )
        img = load_image(path, self.max_image_pixels)
        return self.processor.views(img), img.size


def collate(
    items: list[dict], pad_id: int, share_images: tuple[int, ...] | None = None, pack: int | None = None
) -> dict:
    """Right-pad a list of items; skipped items are dropped and listed under `skipped`.
    `share_images`: the ids of the image block's tokens (`VLM.image_token_ids`), to put the records
    of one image in one sequence; `pack`: a token budget, to put several records (or images'
    groups of records) in one sequence up to it (see the module's doc). `tokens` counts the tokens
    computed."""
    good = [it for it in items if "skipped" not in it]
    batch = {"skipped": [it["skipped"] for it in items if "skipped" in it], "n": len(good)}
    if not good:
        return batch
    groups = _groups(good, share_images) if share_images is not None else [(0, [it]) for it in good]
    rows = _pack(groups, pack) if pack else [[g] for g in groups]
    seqs = [_row(row) for row in rows]
    width = max(len(s["ids"]) for s in seqs)
    pad = lambda xs, value: xs + [value] * (width - len(xs))  # noqa: E731
    batch["input_ids"] = torch.tensor([pad(s["ids"], pad_id) for s in seqs])
    batch["labels"] = torch.tensor([pad(s["labels"], IGNORE) for s in seqs])
    batch["tokens"] = sum(len(s["ids"]) for s in seqs)
    if all(len(row) == 1 and row[0][0] == 0 for row in rows):  # one record per row: a plain padding mask
        batch["attention_mask"] = torch.tensor([pad([1] * len(s["ids"]), 0) for s in seqs])
    else:
        batch["attention_mask"] = torch.stack([_block_mask(s["group"], s["seg"], width) for s in seqs]).unsqueeze(1)
        batch["position_ids"] = torch.tensor([pad(s["pos"], 0) for s in seqs])
    ordered = [its for row in rows for _, its in row]
    batch["ids"] = [it["id"] for its in ordered for it in its]
    batch.update(image_batch([v for its in ordered for v in its[0]["views"]]))
    return batch


def _groups(items: list[dict], image_tokens: tuple[int, ...]) -> list[tuple[int, list[dict]]]:
    """(shared prefix length, items) per group: the items of one image, in order of first
    appearance, share their longest common prefix when it holds every image token and no
    label (nor the label of the token after it: that one is predicted from the prefix); others
    and lone items are groups of one (prefix 0)."""
    by_image: dict[tuple, list[dict]] = {}
    for it in items:
        by_image.setdefault(it["images"] or (id(it),), []).append(it)
    groups = []
    for its in by_image.values():
        if len(its) < 2:
            groups.append((0, its))
            continue
        first = its[0]["input_ids"]
        p = min(len(it["input_ids"]) - 1 for it in its)
        for it in its:
            ids, labels = it["input_ids"], it["labels"]
            p = min(p, next((i for i, x in enumerate(labels) if x != IGNORE), len(labels)) - 1)
            p = min(p, next((i for i, (a, b) in enumerate(zip(first, ids)) if a != b), len(ids)))
        if p > 0 and not any(t in image_tokens for it in its for t in it["input_ids"][p:]):
            groups.append((p, its))
        else:
            groups += [(0, [it]) for it in its]
    return groups


def _length(group: tuple[int, list[dict]]) -> int:
    prefix, items = group
    return prefix + sum(len(it["input_ids"]) - prefix for it in items)


def _pack(groups: list, budget: int) -> list[list]:
    """Groups into rows of at most `budget` tokens, first fit in order (a group longer than the
    budget gets a row of its own; a record is never split, nor its image's tokens)."""
    rows: list[list] = []
    room: list[int] = []
    for g in groups:
        n = _length(g)
        r = next((r for r, left in enumerate(room) if left >= n), None)
        if r is None:
            rows.append([g])
            room.append(budget - n)
        else:
            rows[r].append(g)
            room[r] -= n
    return rows


def _row(groups: list[tuple[int, list[dict]]]) -> dict:
    """A sequence's ids and labels, and per token its group in the row, its segment (0 the
    group's shared prefix, k its k-th item's own tokens) and its position as if its record were
    alone (the prefix's, then each item's from the prefix's end)."""
    seq = {"ids": [], "labels": [], "group": [], "seg": [], "pos": []}
    for g, (prefix, items) in enumerate(groups):
        for k, it in enumerate(items):
            lo = 0 if k == 0 else prefix  # the first item brings the prefix
            n = len(it["input_ids"]) - lo
            seq["ids"] += it["input_ids"][lo:]
            seq["labels"] += it["labels"][lo:]
            seq["group"] += [g] * n
            seq["seg"] += [0] * (prefix - lo) + [k + 1] * (len(it["input_ids"]) - prefix)
            seq["pos"] += list(range(lo, len(it["input_ids"])))
    return seq


def _block_mask(group: list[int], seg: list[int], width: int) -> torch.Tensor:
    """[L, L] bool, True where a query may attend to a key: causal, within its own group, to the
    group's prefix or its own segment; a padding position attends to itself only (no row is empty)."""
    g = torch.tensor(group + [-1] * (width - len(group)))
    s = torch.tensor(seg + [-1] * (width - len(seg)))
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (g[:, None] == g[None, :]) & ((s[:, None] == s[None, :]) | (s[None, :] == 0))
    return (causal & same & (g[:, None] >= 0)) | torch.eye(width, dtype=torch.bool)


def image_batch(views: list[torch.Tensor]) -> dict:
    """Stack per-image tensors: pixels [V, 3, S, S] into `pixel_values`, features [V, P, D] into
    `image_features`. When both occur, `image_features` has zero rows where pixels are to be
    encoded and `encode_rows` says which (see `merge_image_inputs`). Images whose views differ in
    shape (native resolution) stay a list, per image, in `image_features`: the model encodes
    each shape apart (`VLM.image_tokens`)."""
    if len({v.shape[1:] for v in views if v.dim() == 4}) > 1 or len({v.shape[1:] for v in views if v.dim() == 3}) > 1:
        return {"pixel_values": None, "image_features": list(views)}
    pix = [v for v in views if v.dim() == 4]
    feats = [v for v in views if v.dim() == 3]
    if not feats:
        return {"pixel_values": torch.cat(pix) if pix else None, "image_features": None}
    if not pix:
        return {"pixel_values": None, "image_features": torch.cat(feats)}
    shape = feats[0].shape[1:]
    rows, parts, at = [], [], 0
    for v in views:
        n = v.shape[0]
        if v.dim() == 4:
            rows += range(at, at + n)
            parts.append(torch.zeros(n, *shape))
        else:
            parts.append(v.float())
        at += n
    return {"pixel_values": torch.cat(pix), "image_features": torch.cat(parts), "encode_rows": torch.tensor(rows)}


def merge_image_inputs(model, batch: dict) -> dict:
    """The model's image inputs for a batch: pixels, cached features, or cached features with the
    missing ones encoded now."""
    pix, feats = batch.get("pixel_values"), batch.get("image_features")
    if pix is None or feats is None or isinstance(feats, list):
        return {"pixel_values": pix, "image_features": feats}
    feats = feats.clone()
    feats[batch["encode_rows"]] = model.stored_features(pix).to(feats.dtype)
    return {"pixel_values": None, "image_features": feats}
