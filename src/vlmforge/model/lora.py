"""`vlmforge merge-lora`: a model's LoRA adapters folded into its LM weights, saved as a plain model."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmforge.model import folder


def merge_lora(model: str, out: str) -> tuple[int, float]:
    """Fold a model's LoRA adapters into its LM weights and save the result as a plain model.

    The merged model computes the same function (checked on a probe prompt before saving; nothing
    is written when the logits differ) and needs no peft at load time; `vlmforge export` and other
    tools read it as a plain LM. Returns (layers merged, largest logit difference).

    Args:
        model: vlmforge model folder with `lm_adapter/`.
        out: folder for the merged model (must differ from --model).
    """
    from vlmforge.model.vlm import VLM

    if Path(out).resolve() == Path(model).resolve():
        raise ValueError("--out must differ from --model (the adapter model is kept)")
    vlm = VLM.from_pretrained(model)
    probe = torch.tensor([vlm.prompts.encode_prompt([{"role": "user", "content": "Describe the picture."}])])
    with torch.no_grad():
        before = vlm(probe).logits
        n = vlm.merge_lora()
        after = vlm(probe).logits
    diff = float((after - before).abs().max())
    scale = float(before.abs().max())
    if diff > 1e-3 * max(scale, 1.0):
        raise RuntimeError(f"merged logits differ by {diff:.3g} (max |logit| {scale:.3g}): not saved")
    extra = {**folder.extra_meta(model), "merged_from": str(Path(model).resolve()), "merged_lora_layers": n}
    vlm.save_pretrained(out, extra)
    print(f"merged {n} LoRA layers into the LM (max logit difference {diff:.2e}); saved to {out}")
    return n, diff
