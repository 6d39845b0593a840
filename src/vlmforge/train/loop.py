"""The training loop: one function for every stage, in three phases: `prepare` (checks, the model
built and placed, parallelism, data, optimizer, resume), `fit` (the optimizer steps) and `finish`
(the final checkpoint, the model, the summary).

AdamW with per-module learning rates, linear warm-up then cosine decay, gradient accumulation
with the loss normalised over all label tokens of the accumulated batch, gradient clipping. Writes
`metrics.jsonl`, `loss.png`, an atomic `checkpoint/` (safetensors + JSON: nothing that runs code
when read) every `save_every` steps (and on Ctrl-C or a fatal data error, so no finished step is
lost), and the final model to `out/model`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from vlmforge import runtime
from vlmforge.config import ModelConfig, TrainConfig, save_json
from vlmforge.data.collate import VQADataset, merge_image_inputs
from vlmforge.data.formats import load_records
from vlmforge.data.stream import RecordStream
from vlmforge.model.vlm import VLM
from vlmforge.train.batches import empty_batch, micro_batches, stream_batches, to_device
from vlmforge.train.checkpoint import checkpoint_path, found, load_checkpoint, save_checkpoint
from vlmforge.train.distributed import Parallel
from vlmforge.train.metrics import MetricsLog
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


def compile_layers(model, backend: str = "inductor") -> None:
    """`torch.compile` the repeated blocks (LM decoder layers, vision encoder layers) in place:
    the layers of one kind share a compiled graph, so compiling costs one layer's time."""
    for layer in model.causal_lm.get_decoder().layers:
        layer.compile(dynamic=True, backend=backend)
    if not model.vision.released:
        for layer in model.vision.layers:
            layer.compile(dynamic=True, backend=backend)


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


@dataclasses.dataclass
class Run:
    """What `prepare` sets up and `fit` and `finish` use: one stage's state on this rank."""

    cfg: TrainConfig
    d: object  # train.distributed's process group view
    out: Path
    model: VLM
    records: list | None
    par: Parallel
    device: torch.device
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    params: list
    total: int
    progress: dict
    batches: Iterator
    metrics: MetricsLog | None  # rank 0's
    skipped_seen: list = dataclasses.field(default_factory=list)

    @property
    def ckpt_path(self) -> Path:
        return checkpoint_path(self.out)

    def checkpoint(self) -> None:
        """Under FSDP every rank gathers its shards (a collective); rank 0 writes."""
        if self.d.main or self.par.sharded:
            save_checkpoint(self.ckpt_path, self.model, self.opt, self.sched, self.progress, write=self.d.main)


def _train(cfg: TrainConfig, model_cfg: ModelConfig | None, init: str | None, resume: bool, d) -> Path:
    run = prepare(cfg, model_cfg, init, resume, d)
    fit(run)
    return finish(run)


def prepare(cfg: TrainConfig, model_cfg: ModelConfig | None, init: str | None, resume: bool, d) -> Run:
    """Everything before the first step: the records, the model (placed, staged, compiled,
    parallel), the optimizer and schedule, the checkpoint resumed, the micro-batches."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.data:
        raise ValueError("no training data: pass --train.data FILE.json [FILE2.json …]")
    records = None if cfg.streaming else [r for f in cfg.data for r in load_records(f)]
    stream = RecordStream(cfg.data, d.rank, d.world) if cfg.streaming else None
    model = _build_model(cfg, model_cfg, init, out, d)
    features = open_features(cfg, model, records) if cfg.cache else None
    apply_stage(model, cfg)
    device = _place(cfg, model)
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
        require_features=bool(cfg.cache and cfg.streaming and cfg.cache_missing == "fail"),
    )
    ds = None if stream else make_ds(records)
    total = cfg.max_steps if stream else _steps(cfg, len(ds), d.world)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedules(cfg, total, groups))
    progress = {"step": 0, "micro_batch": 0, "skipped": 0, "samples": 0, "tokens": 0, "elapsed": 0.0}
    ckpt_path = checkpoint_path(out)
    resumed = resume and found(ckpt_path)
    if resumed:
        progress = load_checkpoint(ckpt_path, model, opt, sched)
        if d.main:
            tqdm.write(f"resumed from {ckpt_path} at step {progress['step']}")
    metrics = MetricsLog(out, cfg.report_to, progress["step"] if resumed else None, not resume) if d.main else None
    d.barrier()

    pad_id = model.tokenizer.pad_token_id
    if stream:
        at = progress.get("data")
        if at is not None and len(at) != d.world:
            raise ValueError(f"{ckpt_path}: this streamed run was saved on {len(at)} ranks; resume it on {len(at)}")
        batches = stream_batches(stream, make_ds, cfg, pad_id, at[d.rank] if at else None, model.image_token_ids)
    else:
        batches = micro_batches(ds, cfg, pad_id, progress["micro_batch"], d.rank, d.world, model.image_token_ids)
    params = [p for g in groups for p in g["params"]]
    return Run(cfg, d, out, model, records, par, device, opt, sched, params, total, progress, batches, metrics)


def _build_model(cfg: TrainConfig, model_cfg: ModelConfig | None, init: str | None, out: Path, d) -> VLM:
    """The model to train (from a vlmforge folder or from backbones), its run config written, and
    the checks that need the model."""
    if init:
        model = VLM.from_pretrained(init)
    elif model_cfg is not None:
        model = VLM.from_backbones(model_cfg)
    else:
        raise ValueError("pass --init MODEL_DIR (a vlmforge model) or --model.vision and --model.lm")
    if d.main:
        run_config = {
            "train": dataclasses.asdict(cfg),
            "model": dataclasses.asdict(model.config),
            "init": init,
            "world_size": d.world,
        }
        save_json(run_config, out / "run_config.json")
    check_vision_mode(cfg, model.vision)  # before the store is opened: a trained tower reads pixels
    if cfg.packing and model.cross_attention:
        raise ValueError(
            "--train.packing does not work with the cross-attention architecture: its layers would let "
            "a text token see every image of its sequence (group_by_image does)"
        )
    return model


def _place(cfg: TrainConfig, model: VLM) -> torch.device:
    """The model on this process's device, activation checkpointing and compilation as asked."""
    device = torch.device(runtime.device())
    if model.config.device_map is None and device.type != "cpu":
        for part in (model.connector, model.lm) + (() if model.vision.released else (model.vision,)):
            part.to(device)  # a released vision tower has no weights to move
    if cfg.activation_checkpointing:
        model.causal_lm.activation_checkpointing_enable({"use_reentrant": False})
    if cfg.compile:
        compile_layers(model, cfg.compile_backend)
    return device


def _steps(cfg: TrainConfig, n_records: int, world: int) -> int:
    """Optimizer steps of a stage over `n_records` (its epochs, capped by max_steps)."""
    total = max(1, math.ceil(cfg.epochs * math.ceil(n_records / (cfg.batch_size * cfg.grad_accum * world))))
    return min(total, cfg.max_steps or total)


def fit(run: Run) -> None:
    """The optimizer steps, to the end of the schedule (or a time budget, or `stop_at`); a
    checkpoint every `save_every` steps, and on Ctrl-C or an error."""
    cfg, d, progress = run.cfg, run.d, run.progress
    quiet = {} if d.main else {"disable": True}  # one progress bar: rank 0's
    bar = tqdm(total=run.total, initial=progress["step"], desc=f"train {cfg.stage}", unit="step", **quiet)
    t_start, elapsed0 = time.time(), progress["elapsed"]
    if run.metrics is not None:
        run.metrics.start(progress["tokens"])
    try:
        while progress["step"] < run.total:
            if cfg.time_budget and elapsed0 + time.time() - t_start > cfg.time_budget:
                tqdm.write(f"time budget of {cfg.time_budget:.0f}s reached at step {progress['step']}")
                break
            if cfg.stop_at is not None and progress["step"] >= cfg.stop_at:
                tqdm.write(f"stopping at step {cfg.stop_at} of {run.total}; continue with --resume")
                break
            loss, gnorm = _step(run)
            progress["elapsed"] = elapsed0 + time.time() - t_start
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", skipped=progress["skipped"])
            if run.metrics is not None and (progress["step"] % cfg.log_every == 0 or progress["step"] == run.total):
                row = {"step": progress["step"], "loss": loss, "lr": run.sched.get_last_lr()[0], "grad_norm": gnorm}
                row |= {"elapsed": round(progress["elapsed"], 2)}
                row |= {k: progress[k] for k in ("samples", "tokens", "skipped")}
                run.metrics.log(row)
            if progress["step"] % cfg.save_every == 0:
                run.checkpoint()
    except KeyboardInterrupt:
        if d.main and not run.par.sharded:
            save_checkpoint(run.ckpt_path, run.model, run.opt, run.sched, progress)
        bar.close()
        tqdm.write(f"interrupted at step {progress['step']}; " + _kept(run.par, run.ckpt_path))
        raise
    except Exception:
        if progress["step"] > 0 and d.main:
            if not run.par.sharded:
                save_checkpoint(run.ckpt_path, run.model, run.opt, run.sched, progress)
            tqdm.write(f"stopped by an error at step {progress['step']}; " + _kept(run.par, run.ckpt_path))
        raise
    finally:
        if run.metrics is not None:
            run.metrics.close()
    bar.close()


def _step(run: Run) -> tuple[float, float]:
    """One optimizer step over `grad_accum` micro-batches on every rank; returns (loss, grad norm)."""
    cfg, d, par, progress = run.cfg, run.d, run.par, run.progress
    pad_id = run.model.tokenizer.pad_token_id
    group = [next(run.batches) for _ in range(cfg.grad_accum)]
    local_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for _, b in group if b["n"])
    n_tok = int(d.sum([local_tok])[0])  # label tokens of the global batch
    loss_sum, samples, tokens, skipped = 0.0, 0, 0, 0
    for i, (_, b) in enumerate(group):
        for msg in b["skipped"]:
            run.skipped_seen.append(msg)
            tqdm.write(f"skipped {msg}")
        skipped += len(b["skipped"])
        if not n_tok:
            continue
        if not b["n"]:  # all its records skipped
            if par.strategy == "single":
                continue
            b = empty_batch(pad_id)  # every rank runs every backward: the collectives pair up
        b = to_device(b, run.device)
        with par.micro_batch(last=i == len(group) - 1):
            images = merge_image_inputs(run.model, b)
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
    gnorm = torch.nn.utils.clip_grad_norm_(run.params, cfg.clip if cfg.clip > 0 else float("inf"))
    if hasattr(gnorm, "full_tensor"):  # a DTensor under FSDP
        gnorm = gnorm.full_tensor()
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    progress["step"] += 1
    progress["micro_batch"] += cfg.grad_accum * d.world
    if cfg.streaming:  # every rank's place in its stream
        progress["data"] = d.gather(group[-1][0])
    progress["skipped"] += int(skipped)
    return loss_sum / max(n_tok, 1), float(gnorm)


def finish(run: Run) -> Path:
    """The final checkpoint, the whole model (gathered from the shards under FSDP) saved by rank 0
    with its training record, the loss plot and the summary."""
    cfg, d, progress, model = run.cfg, run.d, run.progress, run.model
    model.eval()
    run.checkpoint()
    full = None
    if run.par.sharded:  # the whole model for rank 0 to write, gathered from every rank's shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        run.metrics.plot(run.out / "loss.png")
        summary = {k: progress[k] for k in ("step", "samples", "tokens", "skipped", "elapsed")}
        summary["skipped_records"] = run.skipped_seen[:100]
        model.history.append(
            {
                "stage": cfg.stage,
                "data": [Path(f).name for f in cfg.data],
                "records": len(run.records or []) or None,
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
        model.save_pretrained(run.out / "model", extra={"trained": {"stage": cfg.stage, **summary}}, state_dict=full)
        save_json(summary, run.out / "summary.json")
        if progress["skipped"]:
            tqdm.write(
                f"{progress['skipped']} records skipped (bad images or too long); see {run.out / 'summary.json'}"
            )
    d.barrier()  # the other ranks return once the model is on disk
    return run.out / "model"
