"""Atomic training checkpoints: trainable weights, optimizer, scheduler, step, data position and
RNG states in one file written to a temp name and renamed, so `--resume` continues the same run."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from vlmforge.io import atomic_save


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def gather_state(model, optimizer) -> tuple[dict, dict]:
    """The full (unsharded) trainable weights and optimizer state, keyed by parameter name, on CPU.
    A collective under FSDP (every rank calls it; rank 0 gets the result)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights, optim = get_state_dict(model, optimizer, options=opts)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in weights.items() if k in trainable}, optim  # buffers (a frozen BatchNorm's) are not


def save_checkpoint(path: str | Path, model, optimizer, scheduler, progress: dict, write=True) -> None:
    """Write the checkpoint. Under FSDP every rank calls this (gathering the shards is collective)
    and only rank 0 passes `write`."""
    weights, optim = gather_state(model, optimizer)
    if not write:
        return
    blob = {
        "format": 2,
        "weights": weights,
        "optim": optim,
        "scheduler": scheduler.state_dict(),
        "progress": progress,
        "rng": rng_state(),
    }
    atomic_save(path, lambda tmp: torch.save(blob, tmp))


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> dict:
    """Restore a checkpoint written on any number of ranks, with any strategy (every rank reads it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    blob = torch.load(path, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    if "weights" not in blob:  # format 1: named trainable tensors + the optimizer's own state dict
        return _load_v1(path, blob, params, optimizer, scheduler)
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(blob["weights"]) != trainable:
        extra, lacking = sorted(set(blob["weights"]) - trainable), sorted(trainable - set(blob["weights"]))
        raise ValueError(
            f"{path}: the checkpoint's trainable weights differ from this run's (different stage or model?): "
            f"only in the checkpoint {extra[:3]}, only in the run {lacking[:3]}"
        )
    _copy_weights(params, blob["weights"])
    # the weights are copied above, in place: torch's own loader assigns new parameter objects when
    # any parameter is on the meta device (a released encoder), orphaning those the optimizer holds
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_state_dict(model, optimizer, model_state_dict={}, optim_state_dict=blob["optim"], options=opts)
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return blob["progress"]


@torch.no_grad()
def _copy_weights(params: dict, weights: dict) -> None:
    """Copy full tensors into the model's parameters in place (sharded ones get their shard)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, full in weights.items():
        p = params[name]
        if isinstance(p, DTensor):
            p.copy_(distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements))
        else:
            p.copy_(full)


def _load_v1(path, blob: dict, params: dict, optimizer, scheduler) -> dict:
    missing = [n for n in blob["trainable"] if n not in params]
    if missing:
        raise ValueError(f"{path}: checkpoint has weights the model lacks (different stage or model?): {missing[:3]}")
    with torch.no_grad():
        for n, t in blob["trainable"].items():
            params[n].copy_(t)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return blob["progress"]
