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


def save_checkpoint(path: str | Path, model, optimizer, scheduler, progress: dict) -> None:
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    blob = {
        "trainable": trainable,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": progress,
        "rng": rng_state(),
    }
    atomic_save(path, lambda tmp: torch.save(blob, tmp))


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> dict:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
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
