"""Turning records into padded batches.

`VQADataset` encodes a record (prompt, labels, pixels). An unreadable image or an over-long record
is, by policy, either skipped (the item comes back as a `skipped` marker that the training loop
counts and reports) or fatal (a `DataError` naming the record and the file).
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
    ):
        if bad_images not in ("skip", "fail"):
            raise ValueError(f"bad_images must be 'skip' or 'fail', got {bad_images!r}")
        self.records, self.prompts, self.processor = records, prompts, processor
        self.max_len, self.bad_images, self.max_image_pixels = max_len, bad_images, max_image_pixels

    def __len__(self) -> int:
        return len(self.records)

    def _bad(self, rec: Record, reason: str) -> dict:
        if self.bad_images == "fail":
            raise DataError(f"{rec.where}: {reason}")
        return {"skipped": f"{rec.where}: {reason}"}

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        try:
            pixels = [self.processor(load_image(p, self.max_image_pixels)) for p in rec.images]
        except ImageError as e:
            return self._bad(rec, str(e))
        ids, labels = self.prompts.encode(rec.messages)
        if len(ids) > self.max_len:
            return self._bad(rec, f"{len(ids)} tokens > max_len {self.max_len}")
        item = {"input_ids": ids, "labels": labels, "id": rec.id}
        item["pixel_values"] = torch.stack(pixels) if pixels else None
        return item


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
    pix = [it["pixel_values"] for it in good if it["pixel_values"] is not None]
    batch["pixel_values"] = torch.cat(pix) if pix else None
    batch["ids"] = [it["id"] for it in good]
    return batch
