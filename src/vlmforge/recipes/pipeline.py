"""The two training stages of a recipe in a row: align (when there is caption data) then sft from
the aligned model, both in one run folder; what the demo, ablate's cells and the cache bench's
accuracy runs train."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vlmforge.config import ModelConfig, TrainConfig


def align_then_sft(model_cfg: ModelConfig, align: TrainConfig, sft: TrainConfig, out: str | Path,
                   align_data: list[str], sft_data: list[str], phase=None, **common) -> Path:  # fmt: skip
    """Train `out/align` then `out/sft` (`common`: TrainConfig fields both stages share, e.g. seed,
    cache); returns the final model folder. Without align data, sft starts from the backbones.
    `phase(name, fn)`: runs each stage (the demo's, to time and record it); default: calls fn."""
    from vlmforge.train.loop import train

    phase = phase or (lambda name, fn: fn())
    out = Path(out)
    sft = dataclasses.replace(sft, data=sft_data, out=str(out / "sft"), **common)
    init = None
    if align_data:
        align = dataclasses.replace(align, data=align_data, out=str(out / "align"), **common)
        init = phase("align", lambda: str(train(align, model_cfg, None, resume=True)))
    return Path(phase("sft", lambda: str(train(sft, None if init else model_cfg, init, resume=True))))
