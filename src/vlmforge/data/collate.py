"""Turning records into padded batches.

`VQADataset` encodes a record (prompt, labels, and per image either its cached features or its
pixels). An unreadable image or an over-long record is, by policy, either skipped (the item comes
back as a `skipped` marker that the training loop counts and reports) or fatal (a `DataError`
naming the record and the file).
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
        return {"input_ids": ids, "labels": labels, "id": rec.id, "views": views}

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


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-pad a list of items; skipped items are dropped and listed under `skipped`."""
    good = [it for it in items if "skipped" not in it]
    batch = {"skipped": [it["skipped"] for it in items if "skipped" in it], "n": len(good)}
    if not good:
        return batch
    width = max(len(it["input_ids"]) for it in good)
    batch["input_ids"] = torch.tensor([it["input_ids"] + [pad_id] * (width - len(it["input_ids"])) for it in good])
    batch["labels"] = torch.tensor([it["labels"] + [IGNORE] * (width - len(it["labels"])) for it in good])
    batch["attention_mask"] = torch.tensor(
        [[1] * len(it["input_ids"]) + [0] * (width - len(it["input_ids"])) for it in good]
    )
    batch["ids"] = [it["id"] for it in good]
    batch.update(image_batch([v for it in good for v in it["views"]]))
    return batch


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
