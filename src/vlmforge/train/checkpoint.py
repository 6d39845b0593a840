"""Atomic training checkpoints in formats that hold data only: a folder written under a temp name and renamed,
holding `tensors.safetensors` (trainable weights, optimizer state, RNG states) and `state.json`
(format, step and data position, scheduler, optimizer settings, the rest of the RNG states), so
`--resume` continues the same run and reading a checkpoint never runs code from it."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from vlmforge.io import atomic_dir, read_json, write_json

FORMAT = 3
TENSORS, STATE = "tensors.safetensors", "state.json"


def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(mt), "gauss_next": gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def _split(obj, tensors: dict, key: str = "", seen: tuple[dict, set] | None = None):
    """`obj` with every tensor replaced by {"tensor": name}, the tensors collected in `tensors`
    (a tensor met twice, e.g. tied embeddings, is stored once; `seen`: the views met so far and
    their storages)."""
    views, storages = seen = ({}, set()) if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = (obj.device, obj.untyped_storage().data_ptr())
        ident = (storage, obj.storage_offset(), tuple(obj.shape), tuple(obj.stride()), obj.dtype)
        if ident not in views:
            t = obj.detach().cpu()  # another view of a stored storage is copied: safetensors refuses shared memory
            tensors[key] = t.clone() if storage in storages or not t.is_contiguous() else t
            views[ident] = key
            storages.add(storage)
        return {"tensor": views[ident]}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"checkpoint state {key or '/'}: keys must be strings, got {list(obj)[:3]}")
        return {"dict": {k: _split(v, tensors, f"{key}/{k}", seen) for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        return {"list": [_split(v, tensors, f"{key}/{i}", seen) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    kinds = "tensors, numbers, strings, lists and dicts only"
    raise TypeError(f"checkpoint state {key}: cannot store a {type(obj).__name__} ({kinds})")


def _join(obj, tensors: dict):
    ((kind, value),) = obj.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {k: _join(v, tensors) for k, v in value.items()}
    if kind == "list":
        return [_join(v, tensors) for v in value]
    return value


def gather_state(model, optimizer) -> tuple[dict, dict]:
    """The full (unsharded) trainable weights and optimizer state, keyed by parameter name, on CPU.
    A collective under FSDP (every rank calls it; rank 0 gets the result)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights, optim = get_state_dict(model, optimizer, options=opts)
    trained = trained_names(model)
    return {k: v for k, v in weights.items() if k in trained}, optim  # buffers (a frozen BatchNorm's) are not


def trained_names(model) -> set[str]:
    """What training changes, by name: the trainable parameters, and the BatchNorm statistics of a
    vision tower that trains them (`VisionTower.moving_buffers`)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    vision = getattr(model, "vision", None)
    return names | {f"vision.{n}" for n in vision.moving_buffers()} if vision is not None else names


def save_checkpoint(path: str | Path, model, optimizer, scheduler, progress: dict, write=True) -> None:
    """Write the checkpoint folder. Under FSDP every rank calls this (gathering the shards is
    collective) and only rank 0 passes `write`."""
    from safetensors.torch import save_file

    weights, optim = gather_state(model, optimizer)
    if not write:
        return
    tensors: dict = {}
    blob = {
        "weights": weights,
        "optim": optim,
        "scheduler": scheduler.state_dict(),
        "progress": progress,
        "rng": rng_state(),
    }
    state = {"format": FORMAT, "state": _split(blob, tensors)}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        write_json(tmp / STATE, state)


def checkpoint_path(out: str | Path) -> Path:
    """The checkpoint folder of a run folder."""
    return Path(out) / "checkpoint"


def _stored(path: Path) -> Path:
    """The folder to read: `path`, or the previous checkpoint a kill between the two renames of
    its replacement left beside it."""
    old = path.with_name(f".{path.name}.old")
    return old if not path.exists() and old.is_dir() else path


def found(path: str | Path) -> bool:
    """Whether there is a checkpoint to resume from (one of an earlier format counts: resuming it
    then says what to do)."""
    path = Path(path)
    return _stored(path).exists() or path.with_name("checkpoint.pt").exists()


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's contents (weights, optim, scheduler, progress, rng), no code run to read them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _stored(Path(path))
    legacy = path.with_name("checkpoint.pt")
    if not path.exists() and legacy.exists():
        raise ValueError(
            f"{legacy}: a checkpoint of an earlier vlmforge, stored with torch.save, which is not read (loading it "
            f"could run code from the file); run the stage again without --resume, or delete {legacy}"
        )
    if not (path / STATE).is_file() or not (path / TENSORS).is_file():
        raise ValueError(f"{path}: not a vlmforge checkpoint (needs {STATE} and {TENSORS})")
    state = read_json(path / STATE, "checkpoint state")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"{path}: checkpoint format {state.get('format') if isinstance(state, dict) else '?'}, "
            f"this vlmforge reads format {FORMAT}; run the stage again without --resume"
        )
    try:
        tensors = load_file(str(path / TENSORS))
        return _join(state["state"], tensors)
    except (SafetensorError, KeyError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: corrupt checkpoint ({e})") from e


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> dict:
    """Restore a checkpoint written on any number of ranks, with any strategy (every rank reads it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    blob = read_checkpoint(path)
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    trainable = trained_names(model)
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
