"""Micro-batches for training: the shuffled order of an epoch (a function of the seed and the epoch
alone, so a resumed run sees the same batches), each rank's share, records grouped by image,
streamed windows, and moving a batch to the device."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.utils.data import DataLoader

from vlmforge.config import TrainConfig
from vlmforge.data.collate import collate


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, groups: list[list[int]] | None = None
) -> list[list[int]]:
    """The shuffled micro-batches of one epoch; a function of (seed, epoch) alone, so a resumed run
    sees exactly the batches it would have seen. `groups` (lists of record indices covering 0..n-1)
    are shuffled as units, so that each group's records are batched together."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if groups is None:
        perm = torch.randperm(n, generator=g).tolist()
    else:
        perm = [i for k in torch.randperm(len(groups), generator=g).tolist() for i in groups[k]]
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def image_groups(records: list) -> list[list[int]]:
    """Record indices grouped by the images they show (records without images alone), in order."""
    groups: dict = {}
    for i, r in enumerate(records):
        groups.setdefault(tuple(r.images) or ("", i), []).append(i)
    return list(groups.values())


def micro_batches(ds, cfg: TrainConfig, pad_id: int, start: int, rank: int = 0, world: int = 1, image_tokens=None):
    """Yield (micro-batch index, batch) forever from global micro-batch index `start`. With several
    ranks, each optimizer step takes `grad_accum x world` consecutive micro-batches and this rank
    reads only its `grad_accum` of them (the `rank`-th chunk), so no image is loaded twice. With
    `cfg.group_by_image`, the records of an image are batched together and share its tokens
    (`image_tokens`: the ids of the image block); with `cfg.packing`, a batch's records are packed
    several to a sequence (see `data.collate`)."""
    per_epoch = math.ceil(len(ds) / cfg.batch_size)
    mine = lambda i: (i - start) // cfg.grad_accum % world == rank  # noqa: E731
    groups = image_groups(ds.records) if cfg.group_by_image else None
    share = tuple(image_tokens) if cfg.group_by_image else None
    pack = cfg.max_len if cfg.packing else None
    index = start
    while True:
        epoch, offset = divmod(index, per_epoch)
        batches = epoch_batches(len(ds), cfg.batch_size, cfg.seed, epoch, groups)[offset:]
        indices = [index + k for k in range(len(batches)) if mine(index + k)]
        loader = DataLoader(
            ds,
            batch_sampler=[batches[i - index] for i in indices],
            num_workers=cfg.num_workers,
            collate_fn=partial(collate, pad_id=pad_id, share_images=share, pack=pack),
        )
        yield from zip(indices, loader)
        index += len(batches)


def stream_batches(stream, make_ds, cfg: TrainConfig, pad_id: int, start: dict | None = None, image_tokens=None):
    """Yield (position after the batch, batch) for ever from a `data.stream.RecordStream`, from
    position `start` (`{"at": a window's start, "taken": its micro-batches already used}`). Each
    window's records are shuffled as a function of (seed, epoch, window) alone (an image's records
    as one unit with `cfg.group_by_image`) and read as micro-batches: read again from a saved
    position, the stream gives the same batches."""
    share = tuple(image_tokens) if cfg.group_by_image else None
    pack = cfg.max_len if cfg.packing else None
    size = math.ceil(cfg.stream_window / cfg.batch_size) * cfg.batch_size
    skip = start["taken"] if start else 0
    for at, records in stream.windows(size, start["at"] if start else None):
        groups = image_groups(records) if cfg.group_by_image else None
        batches = epoch_batches(len(records), cfg.batch_size, cfg.seed * 1_000_003 + at["epoch"], at["window"], groups)
        loader = DataLoader(
            make_ds(records),
            batch_sampler=batches[skip:],
            num_workers=cfg.num_workers,
            collate_fn=partial(collate, pad_id=pad_id, share_images=share, pack=pack),
        )
        for taken, batch in enumerate(loader, skip + 1):
            yield {"at": at, "taken": taken}, batch
        skip = 0


def to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return batch
    move = lambda v: v.to(device, non_blocking=True)  # noqa: E731
    return {
        k: move(v) if torch.is_tensor(v) else [move(x) for x in v] if k == "image_features" and v else v
        for k, v in batch.items()
    }


def empty_batch(pad_id: int) -> dict:
    """Two padding tokens and no label: a forward and backward that add nothing to the gradients."""
    ids = torch.full((1, 2), pad_id)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.full_like(ids, -100),
        "n": 0,
        "skipped": [],
        "tokens": 2,
    }
