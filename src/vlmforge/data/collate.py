"""Turning records into padded batches.

`VQADataset` encodes a record (prompt, labels, and per image either its cached features or its
pixels). An unreadable image or an over-long record is, by policy, either skipped (the item comes
back as a `skipped` marker that the training loop counts and reports) or fatal (a `DataError`
naming the record and the file).

With `share_images`, records of one image in a batch become one sequence: their common prefix
(the chat header and the image block) once, then each record's own tokens, each attending only
to the prefix and to itself (a block mask [B, 1, L, L]) at the positions it would have alone.
The loss and its gradients are those of the records apart; the image's tokens are computed once
instead of once per record.
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
    ):
        if bad_images not in ("skip", "fail"):
            raise ValueError(f"bad_images must be 'skip' or 'fail', got {bad_images!r}")
        self.records, self.prompts, self.processor = records, prompts, processor
        self.max_len, self.bad_images, self.max_image_pixels = max_len, bad_images, max_image_pixels
        self.features = features  # a FeatureReader, or None to always decode pixels
        self._encoded: dict[int, tuple[list[int], list[int]]] = {}  # tokenized once per record

    def __len__(self) -> int:
        return len(self.records)

    def _bad(self, rec: Record, reason: str) -> dict:
        if self.bad_images == "fail":
            raise DataError(f"{rec.where}: {reason}")
        return {"skipped": f"{rec.where}: {reason}"}

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        if i not in self._encoded:
            self._encoded[i] = self.prompts.encode(rec.messages)
        ids, labels = self._encoded[i]
        if len(ids) > self.max_len:
            return self._bad(rec, f"{len(ids)} tokens > max_len {self.max_len}")
        try:
            views = [self._image(p) for p in rec.images]
        except ImageError as e:
            return self._bad(rec, str(e))
        return {"input_ids": ids, "labels": labels, "id": rec.id, "views": views, "images": tuple(rec.images)}

    def _image(self, path) -> torch.Tensor:
        """Cached features [V, P, D] when the store has them, else pixels [V, 3, S, S]."""
        if self.features is not None:
            try:
                feats = self.features.get(path)
            except FileNotFoundError as e:
                raise ImageError(str(e)) from None
            if feats is not None:
                return feats
        return self.processor.views(load_image(path, self.max_image_pixels))


def collate(items: list[dict], pad_id: int, share_images: tuple[int, ...] | None = None) -> dict:
    """Right-pad a list of items; skipped items are dropped and listed under `skipped`.
    `share_images`: the ids of the image block's tokens (`VLM.image_token_ids`), to put the records
    of one image in one sequence (see the module's doc); `tokens` counts the tokens computed."""
    good = [it for it in items if "skipped" not in it]
    batch = {"skipped": [it["skipped"] for it in items if "skipped" in it], "n": len(good)}
    if not good:
        return batch
    rows = _shared_rows(good, share_images) if share_images is not None else [(0, [it]) for it in good]
    seqs = [_row(p, its) for p, its in rows]
    width = max(len(ids) for ids, _, _ in seqs)
    batch["input_ids"] = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _, _ in seqs])
    batch["labels"] = torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels, _ in seqs])
    batch["tokens"] = sum(len(ids) for ids, _, _ in seqs)
    if all(p == 0 for p, _ in rows):
        batch["attention_mask"] = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in seqs])
    else:
        batch["attention_mask"] = torch.stack([_block_mask(segs, width) for _, _, segs in seqs]).unsqueeze(1)
        batch["position_ids"] = torch.stack([_positions(segs, width) for _, _, segs in seqs])
    batch["ids"] = [it["id"] for _, its in rows for it in its]
    batch.update(image_batch([v for _, its in rows for v in its[0]["views"]]))
    return batch


def _shared_rows(items: list[dict], image_tokens: tuple[int, ...]) -> list[tuple[int, list[dict]]]:
    """(shared prefix length, items) per sequence: the items of one image, in order of first
    appearance, share their longest common prefix when it holds every image token and no
    label (nor the label of the token after it: that one is predicted from the prefix); others
    and lone items get a row each (prefix 0)."""
    by_image: dict[tuple, list[dict]] = {}
    for it in items:
        by_image.setdefault(it["images"] or (id(it),), []).append(it)
    rows = []
    for its in by_image.values():
        if len(its) < 2:
            rows.append((0, its))
            continue
        first = its[0]["input_ids"]
        p = min(len(it["input_ids"]) - 1 for it in its)
        for it in its:
            ids, labels = it["input_ids"], it["labels"]
            p = min(p, next((i for i, x in enumerate(labels) if x != IGNORE), len(labels)) - 1)
            p = min(p, next((i for i, (a, b) in enumerate(zip(first, ids)) if a != b), len(ids)))
        if p > 0 and not any(t in image_tokens for it in its for t in it["input_ids"][p:]):
            rows.append((p, its))
        else:
            rows += [(0, [it]) for it in its]
    return rows


def _row(prefix: int, items: list[dict]) -> tuple[list[int], list[int], list[int]]:
    """A sequence's ids, labels and segments (0 the shared prefix, k the k-th item's own tokens)."""
    ids, labels, segs = list(items[0]["input_ids"][:prefix]), list(items[0]["labels"][:prefix]), [0] * prefix
    for k, it in enumerate(items, 1):
        ids += it["input_ids"][prefix:]
        labels += it["labels"][prefix:]
        segs += [k] * (len(it["input_ids"]) - prefix)
    return ids, labels, segs


def _block_mask(segs: list[int], width: int) -> torch.Tensor:
    """[L, L] bool, True where a query may attend to a key: causal, within its own segment or the
    prefix; a padding position attends to itself only (no row is empty)."""
    s = torch.tensor(segs + [-1] * (width - len(segs)))
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (s[:, None] == s[None, :]) | (s[None, :] == 0)
    return (causal & same & (s[:, None] >= 0)) | torch.eye(width, dtype=torch.bool)


def _positions(segs: list[int], width: int) -> torch.Tensor:
    """Each token's position as if its record were alone: the prefix's, then each segment's from
    the prefix's end."""
    prefix = segs.count(0)
    out, seen = [], {}
    for s in segs:
        if s == 0:
            out.append(len(out))
        else:
            seen[s] = seen.get(s, prefix - 1) + 1
            out.append(seen[s])
    return torch.tensor(out + [0] * (width - len(segs)))


def image_batch(views: list[torch.Tensor]) -> dict:
    """Stack per-image tensors: pixels [V, 3, S, S] into `pixel_values`, features [V, P, D] into
    `image_features`. When both occur, `image_features` has zero rows where pixels are to be
    encoded and `encode_rows` says which (see `merge_image_inputs`)."""
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
    if pix is None or feats is None:
        return {"pixel_values": pix, "image_features": feats}
    feats = feats.clone()
    feats[batch["encode_rows"]] = model.encode_images(pix).to(feats.dtype)
    return {"pixel_values": None, "image_features": feats}
