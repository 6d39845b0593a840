"""One plain optimisation step on one collated batch (no accumulation, clipping or schedule): what
the benches time. The training loop's step adds those around the same forward."""

from __future__ import annotations

import torch

from vlmforge.data.collate import merge_image_inputs


def step(model, opt: torch.optim.Optimizer, batch: dict) -> torch.Tensor:
    """Forward with the batch's pixels or features, backward, optimizer step; returns the loss
    (a tensor: reading it would wait for the device)."""
    out = model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        **merge_image_inputs(model, batch),
        position_ids=batch.get("position_ids"),
    )
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.detach()
