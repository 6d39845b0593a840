"""`vlmforge train`: one stage from a preset, backbones or a model folder, on one process or
relaunched under torchrun on several."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from vlmforge import runtime
from vlmforge.config import ModelConfig, TrainConfig


def train(
    train: TrainConfig = TrainConfig(),  # noqa: B008
    model: ModelConfig = ModelConfig(),  # noqa: B008
    init: str | None = None,
    resume: bool = False,
    nproc: int = 1,
    preset: str | None = None,
) -> None:
    """Train one stage (align or sft) and save the model to OUT/model.

    Several processes: `--nproc N` (or `torchrun --nproc_per_node N -m vlmforge train …`, also with
    --nnodes / --rdzv-endpoint for several machines): data parallel, gradients summed over ranks; a
    step takes grad_accum x ranks micro-batches, so the same global batch gives the same run.

    Args:
        train: the stage: data, what trains, schedule, checkpoints.
        model: backbones and connector, when starting from backbones (not --init).
        init: a vlmforge model folder to start from (e.g. the align stage's output).
        resume: continue from OUT/checkpoint (on any number of processes).
        nproc: processes on this machine, launched with torchrun (gloo on CPU, NCCL on GPUs).
        preset: start from a preset's backbones and connector (`vlmforge presets`); --model.*
            flags given with a non-default value override it.
    """
    if nproc > 1 and "RANK" not in os.environ:  # every process gets this call's resolved arguments
        from vlmforge.io import write_json

        launch = Path(train.out) / "launch.json"
        write_json(
            launch,
            {
                "train": dataclasses.asdict(train),
                "model": dataclasses.asdict(model),
                "init": init,
                "resume": resume,
                "preset": preset,
            },
        )
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "vlmforge",
            "train",
            "--config",
            str(launch),
        ]
        sys.exit(subprocess.call(cmd))
    from vlmforge.presets import with_preset
    from vlmforge.train.loop import train as run

    if preset:
        if init:
            raise ValueError("--preset and --init both choose the model: pass one")
        model = with_preset(preset, model)
    path = run(train, None if init else model, init, resume)
    if runtime.world()[0] == 0:
        print(path)
