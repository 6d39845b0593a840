"""The two training stages of a recipe in a row: align (when there is caption data) then sft from
the aligned model, both in one run folder; what ablate's cells and the cache bench's accuracy runs
train. (The demo runs them as two phases of its own, so that each is timed and resumed apart.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vlmforge.config import ModelConfig, TrainConfig


def align_then_sft(model_cfg: ModelConfig, align: TrainConfig, sft: TrainConfig, out: str | Path,
                   align_data: list[str], sft_data: list[str], **common) -> Path:  # fmt: skip
    """Train `out/align` then `out/sft` (`common`: TrainConfig fields both stages share, e.g. seed,
    cache); returns the final model folder. Without align data, sft starts from the backbones."""
    from vlmforge.train.loop import train

    out = Path(out)
    sft = dataclasses.replace(sft, data=sft_data, out=str(out / "sft"), **common)
    if not align_data:
        return train(sft, model_cfg, None, resume=True)
    align = dataclasses.replace(align, data=align_data, out=str(out / "align"), **common)
    return train(sft, None, str(train(align, model_cfg, None, resume=True)), resume=True)
