"""The training loop: one function for every stage.

AdamW with per-module learning rates, linear warm-up then cosine decay, gradient accumulation
with the loss normalised over all label tokens of the accumulated batch, gradient clipping. Writes
`metrics.jsonl`, `loss.png`, an atomic `checkpoint/` (safetensors + JSON: nothing that runs code
when read) every `save_every` steps (and on Ctrl-C or a fatal data error, so no finished step is
lost), and the final model to `out/model`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from vlmforge import runtime
from vlmforge.config import ModelConfig, TrainConfig, save_json
from vlmforge.data.collate import VQADataset, collate, merge_image_inputs
from vlmforge.data.formats import load_records
from vlmforge.data.stream import RecordStream
from vlmforge.model.vlm import VLM
from vlmforge.train.checkpoint import checkpoint_path, found, load_checkpoint, save_checkpoint
from vlmforge.train.distributed import Parallel
from vlmforge.train.stages import (
    apply_stage,
    check_vision_mode,
    lm_mode,
    param_groups,
    stored_cut,
    trainable_report,
    vision_lr,
)


def lr_lambda(total: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def schedules(cfg: TrainConfig, total: int, groups: list[dict]) -> list:
    """Each parameter group's warm-up + cosine (the vision tower's with its own warm-up)."""
    base = lr_lambda(total, max(1, int(cfg.warmup * total)), cfg.min_lr_ratio)
    warm = cfg.warmup if cfg.vision_warmup is None else cfg.vision_warmup
    vision = lr_lambda(total, max(1, int(warm * total)), cfg.min_lr_ratio)
    return [vision if g["name"] == "vision" else base for g in groups]


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


def plot_loss(metrics_file: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlmforge.io import atomic_save

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(out.parent.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _truncate_metrics(path: Path, step: int) -> None:
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return batch
    move = lambda v: v.to(device, non_blocking=True)  # noqa: E731
    return {
        k: move(v) if torch.is_tensor(v) else [move(x) for x in v] if k == "image_features" and v else v
        for k, v in batch.items()
    }


def compile_layers(model, backend: str = "inductor") -> None:
    """`torch.compile` the repeated blocks (LM decoder layers, vision encoder layers) in place:
    the layers of one kind share a compiled graph, so compiling costs one layer's time."""
    for layer in model.causal_lm.get_decoder().layers:
        layer.compile(dynamic=True, backend=backend)
    if not model.vision.released:
        for layer in model.vision.layers:
            layer.compile(dynamic=True, backend=backend)


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


def _kept(par, ckpt_path: Path) -> str:
    if par.sharded:  # saving would gather the shards, a collective the other ranks may not reach
        return f"the last periodic checkpoint ({ckpt_path}, if any) stands; continue with --resume"
    return f"checkpoint saved to {ckpt_path}, continue with --resume"


def open_features(cfg: TrainConfig, model: VLM, records: list | None):
    """The feature reader of `cfg.cache` for this model; checks every image before the first step.

    Missing features stop the run here (`cache_missing=fail`) with what to build, or are encoded on
    the fly (`encode`). When nothing is missing the encoder is released: it is not needed. A
    stream's records (`records` None) are looked up as they come: with `fail` the encoder is
    released at once.
    """
    from vlmforge.cache.store import CacheError, FeatureStore, what_is_stored

    store, top = FeatureStore(cfg.cache), stored_cut(cfg)
    reader = store.reader(model.vision, model.processor, cfg.cache_dtype, top=top)
    others = store.other_cuts(model.vision, model.processor, top) if reader.ns is None else []
    if others:
        there = " and ".join(what_is_stored(c) for c in others)
        build = f"vlmforge cache build --model ... --data ...{f' --vision_top {top}' if top else ''}"
        raise CacheError(
            f"feature store {cfg.cache} holds {there} of this encoder, not {what_is_stored(top)} "
            f"that this run reads: build them with `{build}`"
        )
    model.vision.from_states = top  # the store's states go through the top blocks in the model
    if records is None:
        if cfg.cache_missing == "fail" and not top:
            model.vision.release()
        tqdm.write(f"features: from {cfg.cache} as the stream's records come ({len(reader)} images in the store)")
        return reader
    paths = [(r.where, p) for r in records for p in r.images]
    missing = []
    for where, p in tqdm(paths, desc="look up features", unit="img", leave=False):
        try:
            if not reader.has(p):
                missing.append((where, p))
        except FileNotFoundError:
            pass  # a missing image file is a bad image: the bad_images policy deals with it
    if missing and cfg.cache_missing == "fail":
        where, p = missing[0]
        if reader.ns is None:
            why = (
                "the store has no features for this encoder and these settings ("
                + (f"dtype {cfg.cache_dtype}, " if cfg.cache_dtype else "")
                + "see `vlmforge cache info`)"
            )
        else:
            why = f"{len(missing)} of {len(paths)} images have no features in it (e.g. {where}: {p})"
        raise CacheError(
            f"feature store {cfg.cache}: {why}; build them with `vlmforge cache build --model ... --data ...` "
            "or pass --train.cache_missing encode to encode them during training"
        )
    ns = f"namespace {reader.ns.id}, {reader.ns.settings['dtype']}" if reader.ns else "no matching namespace"
    kept = f"; the top {top} blocks run on them" if top else "; encoder released"
    tqdm.write(
        f"features: {len(paths) - len(missing)} of {len(paths)} images from {cfg.cache} ({ns})"
        + (f"; {len(missing)} encoded on the fly" if missing else kept)
    )
    if not missing and not top:
        model.vision.release()
    return reader


def train(
    cfg: TrainConfig, model_cfg: ModelConfig | None = None, init: str | None = None, resume: bool = False
) -> Path:
    """Run one stage; return the folder of the trained model (`cfg.out/model`). Under torchrun,
    every rank runs this (see `train.distributed`); only rank 0 writes."""
    from vlmforge.train.distributed import setup, teardown

    d = setup(cfg.dist_timeout)
    try:
        with runtime.threads(cfg.threads), runtime.seeded(cfg.seed):
            model_dir = _train(cfg, model_cfg, init, resume, d)
    except BaseException as e:  # an error or Ctrl-C: leave the group at once
        if d.enabled and isinstance(e, Exception):  # name the rank: torchrun stops the others
            tqdm.write(f"rank {d.rank} of {d.world} failed: {type(e).__name__}: {e}")
        teardown(d, clean=False)
        raise
    teardown(d)
    return model_dir


def _train(cfg: TrainConfig, model_cfg: ModelConfig | None, init: str | None, resume: bool, d) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = checkpoint_path(out), out / "metrics.jsonl"
    if not cfg.data:
        raise ValueError("no training data: pass --train.data FILE.json [FILE2.json …]")
    if cfg.streaming and cfg.max_steps is None:
        raise ValueError("--train.streaming needs --train.max_steps (a stream has no length to count epochs by)")
    records = None if cfg.streaming else [r for f in cfg.data for r in load_records(f)]
    stream = RecordStream(cfg.data, d.rank, d.world) if cfg.streaming else None

    if init:
        model = VLM.from_pretrained(init)
    elif model_cfg is not None:
        model = VLM.from_backbones(model_cfg)
    else:
        raise ValueError("pass --init MODEL_DIR (a vlmforge model) or --model.vision and --model.lm")
    if d.main:
        save_json(
            {
                "train": dataclasses.asdict(cfg),
                "model": dataclasses.asdict(model.config),
                "init": init,
                "world_size": d.world,
            },
            out / "run_config.json",
        )
    check_vision_mode(cfg, model.vision)  # before the store is opened: a trained tower reads pixels
    if cfg.packing and model.cross_attention:
        raise ValueError(
            "--train.packing does not work with the cross-attention architecture: its layers would let "
            "a text token see every image of its sequence (group_by_image does)"
        )
    features = open_features(cfg, model, records) if cfg.cache else None
    need_features = bool(cfg.cache and cfg.streaming and cfg.cache_missing == "fail")
    apply_stage(model, cfg)
    device = torch.device(runtime.device())
    if model.config.device_map is None and device.type != "cpu":
        for part in (model.connector, model.lm) + (() if model.vision.released else (model.vision,)):
            part.to(device)  # a released vision tower has no weights to move
    if cfg.activation_checkpointing:
        model.causal_lm.activation_checkpointing_enable({"use_reentrant": False})
    if cfg.compile:
        compile_layers(model, cfg.compile_backend)
    par = Parallel(model, cfg.strategy, cfg.precision, d)
    groups = param_groups(model, cfg)  # after sharding: FSDP replaced the parameters by shards
    model.train()
    if d.main:
        ranks = f", {d.world} ranks ({par.strategy}) x {cfg.grad_accum} x {cfg.batch_size}" if d.enabled else ""
        n = "records streamed" if stream else f"{len(records)} records"
        tqdm.write(f"stage {cfg.stage} (lm: {lm_mode(cfg)}), {n}{ranks}\n{trainable_report(model)}")

    make_ds = partial(
        VQADataset,
        prompts=model.prompts,
        processor=model.processor,
        max_len=cfg.max_len,
        bad_images=cfg.bad_images,
        max_image_pixels=cfg.max_image_pixels,
        features=features,
        require_features=need_features,
    )
    if stream:
        total = cfg.max_steps
    else:
        ds = make_ds(records)
        total = max(1, math.ceil(cfg.epochs * math.ceil(len(ds) / (cfg.batch_size * cfg.grad_accum * d.world))))
        total = min(total, cfg.max_steps or total)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedules(cfg, total, groups))
    progress = {"step": 0, "micro_batch": 0, "skipped": 0, "samples": 0, "tokens": 0, "elapsed": 0.0}
    if resume and found(ckpt_path):
        progress = load_checkpoint(ckpt_path, model, opt, sched)
        if d.main:
            _truncate_metrics(metrics_path, progress["step"])
            tqdm.write(f"resumed from {ckpt_path} at step {progress['step']}")
    elif not resume and metrics_path.exists() and d.main:
        metrics_path.unlink()
    d.barrier()

    params = [p for g in groups for p in g["params"]]

    def checkpoint() -> None:  # under FSDP every rank gathers its shards (a collective); rank 0 writes
        if d.main or par.sharded:
            save_checkpoint(ckpt_path, model, opt, sched, progress, write=d.main)

    pad_id = model.tokenizer.pad_token_id
    if stream:
        at = progress.get("data")
        if at is not None and len(at) != d.world:
            raise ValueError(f"{ckpt_path}: this streamed run was saved on {len(at)} ranks; resume it on {len(at)}")
        batches = stream_batches(stream, make_ds, cfg, pad_id, at[d.rank] if at else None, model.image_token_ids)
    else:
        batches = micro_batches(ds, cfg, pad_id, progress["micro_batch"], d.rank, d.world, model.image_token_ids)
    quiet = {} if d.main else {"disable": True}  # one progress bar: rank 0's
    bar = tqdm(total=total, initial=progress["step"], desc=f"train {cfg.stage}", unit="step", **quiet)
    t_start, elapsed0 = time.time(), progress["elapsed"]
    last_log, skipped_seen, last_tokens = time.time(), [], progress["tokens"]
    board = None
    if d.main and "tensorboard" in cfg.report_to:  # events after a resumed step are dropped: no doubles
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(str(out / "tensorboard"), purge_step=progress["step"] + 1 if progress["step"] else None)
    try:
        while progress["step"] < total:
            if cfg.time_budget and elapsed0 + time.time() - t_start > cfg.time_budget:
                tqdm.write(f"time budget of {cfg.time_budget:.0f}s reached at step {progress['step']}")
                break
            if cfg.stop_at is not None and progress["step"] >= cfg.stop_at:
                tqdm.write(f"stopping at step {cfg.stop_at} of {total}; continue with --resume")
                break
            group = [next(batches) for _ in range(cfg.grad_accum)]
            local_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for _, b in group if b["n"])
            n_tok = int(d.sum([local_tok])[0])  # label tokens of the global batch
            loss_sum, samples, tokens, skipped = 0.0, 0, 0, 0
            for i, (_, b) in enumerate(group):
                for msg in b["skipped"]:
                    skipped_seen.append(msg)
                    tqdm.write(f"skipped {msg}")
                skipped += len(b["skipped"])
                if not n_tok:
                    continue
                if not b["n"]:  # all its records skipped
                    if par.strategy == "single":
                        continue
                    b = empty_batch(pad_id)  # every rank runs every backward: the collectives pair up
                b = to_device(b, device)
                with par.micro_batch(last=i == len(group) - 1):
                    images = merge_image_inputs(model, b)
                    o = par(
                        b["input_ids"],
                        b["attention_mask"],
                        b["labels"],
                        **images,
                        all_params=par.sharded,
                        position_ids=b.get("position_ids"),
                    )
                    (o.loss_sum * (par.loss_scale / n_tok)).backward()
                if b["n"]:
                    loss_sum += o.loss_sum.item()
                    samples += b["n"]
                    tokens += b["tokens"]
            loss_sum, samples, tokens, skipped = d.sum([loss_sum, samples, tokens, skipped])
            progress["samples"] += int(samples)
            progress["tokens"] += int(tokens)
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
            if hasattr(gnorm, "full_tensor"):  # a DTensor under FSDP
                gnorm = gnorm.full_tensor()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            progress["step"] += 1
            progress["micro_batch"] += cfg.grad_accum * d.world
            if stream:  # every rank's place in its stream
                progress["data"] = d.gather(group[-1][0])
            progress["skipped"] += int(skipped)
            progress["elapsed"] = elapsed0 + time.time() - t_start
            loss = loss_sum / max(n_tok, 1)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", skipped=progress["skipped"])
            if d.main and (progress["step"] % cfg.log_every == 0 or progress["step"] == total):
                dt = max(time.time() - last_log, 1e-9)
                row = {
                    "step": progress["step"],
                    "loss": loss,
                    "lr": sched.get_last_lr()[0],
                    "grad_norm": float(gnorm),
                    "elapsed": round(progress["elapsed"], 2),
                    "samples": progress["samples"],
                    "tokens": progress["tokens"],
                    "skipped": progress["skipped"],
                    "seconds_since_last": round(dt, 3),
                }
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                if board is not None:
                    for key in ("loss", "lr", "grad_norm"):
                        board.add_scalar(f"train/{key}", row[key], row["step"])
                    board.add_scalar("train/tokens_per_s", (row["tokens"] - last_tokens) / dt, row["step"])
                    board.flush()
                last_log, last_tokens = time.time(), row["tokens"]
            if progress["step"] % cfg.save_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        if d.main and not par.sharded:
            save_checkpoint(ckpt_path, model, opt, sched, progress)
        bar.close()
        tqdm.write(f"interrupted at step {progress['step']}; " + _kept(par, ckpt_path))
        raise
    except Exception:
        if progress["step"] > 0 and d.main:
            if not par.sharded:
                save_checkpoint(ckpt_path, model, opt, sched, progress)
            tqdm.write(f"stopped by an error at step {progress['step']}; " + _kept(par, ckpt_path))
        raise
    finally:
        if board is not None:
            board.close()
    bar.close()
    model.eval()
    checkpoint()
    full = None
    if par.sharded:  # the whole model for rank 0 to write, gathered from every rank's shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        if metrics_path.exists():
            plot_loss(metrics_path, out / "loss.png")
        summary = {k: progress[k] for k in ("step", "samples", "tokens", "skipped", "elapsed")}
        summary["skipped_records"] = skipped_seen[:100]
        model.history.append(
            {
                "stage": cfg.stage,
                "data": [Path(f).name for f in cfg.data],
                "records": len(records or []) or None,
                "lm_mode": lm_mode(cfg),
                "vision_mode": model.vision.mode + (f" {cfg.vision_top}" if cfg.vision_mode == "top" else ""),
                "epochs": cfg.epochs,
                "lr": cfg.lr,
                "lm_lr": cfg.lm_lr,
                **({"vision_lr": vision_lr(cfg)} if cfg.vision_mode != "frozen" else {}),
                "global_batch": cfg.batch_size * cfg.grad_accum * d.world,
                "feature_cache": bool(cfg.cache),
                **{k: summary[k] for k in ("step", "samples", "tokens", "elapsed")},
            }
        )
        model.save_pretrained(out / "model", extra={"trained": {"stage": cfg.stage, **summary}}, state_dict=full)
        save_json(summary, out / "summary.json")
        if progress["skipped"]:
            tqdm.write(f"{progress['skipped']} records skipped (bad images or too long); see {out / 'summary.json'}")
    d.barrier()  # the other ranks return once the model is on disk
    return out / "model"
