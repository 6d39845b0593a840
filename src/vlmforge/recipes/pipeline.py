"""What the recipes share: the two training stages in a row (align, when there is caption data,
then sft from the aligned model, both in one run folder), which the demo, ablate's cells and the
cache bench's accuracy runs train; and the synthetic data and tiny backbones that ablate and the
cache bench make once and share."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from vlmforge.config import ModelConfig, TinySpec, TrainConfig


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


def synthetic_setup(out: str | Path, n_shapes: int, n_text: int, n_test: int, spec: TinySpec,
                    large: TinySpec | None = None, data: dict | None = None) -> dict:  # fmt: skip
    """The synthetic train and test data (seeds 0 and 1) and the tiny backbones made from them, in
    `out`, made once (`out/shared.json` records them; a second call reads it): what ablate's cells
    and the cache bench's accuracy runs share. `large`: also an LM of that spec beside the small
    one (same tokenizer and encoder). `data`: `{"align": [...], "sft": [...]}`, training files of
    the caller's own, trained on instead of the synthetic ones (and in the tokenizer)."""
    import shutil

    from vlmforge.config import save_json
    from vlmforge.data.synthetic import synth_splits
    from vlmforge.recipes.tiny import pretrain

    out = Path(out)
    done = out / "shared.json"
    if done.exists():
        return json.loads(done.read_text())
    paths = synth_splits(out / "data", [("train", n_shapes, n_text, 0), ("test", n_test, n_test, 1)])
    synthetic = [paths[f"train_{t}_{k}"] for t in ("shapes", "text") for k in ("captions", "sft")]
    if data:
        paths["align_data"], paths["sft_data"] = data.get("align", []), data["sft"]
    else:
        paths["align_data"], paths["sft_data"] = synthetic[0::2], synthetic[1::2]
    # the tiny backbones stand in for pretrained checkpoints: made from the synthetic corpus plus
    # the caller's own data (so that the tokenizer covers its words)
    train_files = list(dict.fromkeys(synthetic + paths["align_data"] + paths["sft_data"]))
    # SigLIP learns from captions only: the sft files hold one-question records that look like caption pairs
    captions = list(dict.fromkeys(synthetic[0::2] + paths["align_data"]))
    small = pretrain(train_files, out / "backbones" / "small", spec, 0, captions=captions)
    paths["small"] = {k: str(v) for k, v in small.items()}
    if large is not None:
        large_dir = out / "backbones" / "large"
        for part in ("tokenizer", "vision"):
            if not (large_dir / part).exists():
                shutil.copytree(small[part], large_dir / part)
        paths["large"] = {k: str(v) for k, v in pretrain(train_files, large_dir, large, 0).items()}
    save_json(paths, done)
    return paths
