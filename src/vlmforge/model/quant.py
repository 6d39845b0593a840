"""Weight-only quantized LM weights, for serving (`serve`, `chat`, `eval` with `--dtype`).

* `bfloat16`: the LM cast to bfloat16 (the vision tower and the connector stay as they are).
* `int8`: every plain `nn.Linear` of the LM (the decoder layers' projections and the LM head)
  becomes an `Int8Linear`: int8 weights with one scale per output row (symmetric, max-abs / 127),
  multiplied by torch's own CPU kernel (`aten._weight_int8pack_mm`, activations in bfloat16, as
  torchao's int8 weight-only mode does) up to `KERNEL_ROWS` rows; a prefill's many rows take the
  bfloat16 or the float32 matmul, whichever is faster on this CPU (`prefill_dtype`), on the weight
  cast for the call; on other devices the weight is dequantized per call.
  The input embeddings stay as they are (a decode step reads one row of them).

LoRA adapters are merged into the LM first (the quantized weights are the adapted ones). What is
quantized is a copy made at load time: the model folder on disk is not touched.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmforge import runtime
from vlmforge.config import check_choice

WEIGHT_DTYPES = ("float32", "bfloat16", "int8")


# Up to this many rows torch's int8 kernel is the fastest; beyond (a prefill), the weight is cast for
# the call and multiplied by the bfloat16 or the float32 matmul (`prefill_dtype`).
KERNEL_ROWS = 16
_PREFILL: list[torch.dtype] = []  # `prefill_dtype`'s answer, measured once per process


def prefill_dtype() -> torch.dtype:
    """The dtype in which int8 weights meet a prefill's many rows on the CPU: bfloat16 where torch's
    bfloat16 matmul is faster than its float32 one here (with the CPU's bfloat16 instructions: 1848
    against 271 GFLOP/s on one), else float32 (an Intel AVX-512 CPU without them: 63 against 255);
    measured once, at a prefill's shape (236 x 576 x 1536, taking turns, ~20 ms)."""
    if not _PREFILL:
        a, b = torch.full((236, 576), 0.5), torch.full((576, 1536), 0.25)  # not randn: leave the RNG be
        a16, b16 = a.bfloat16(), b.bfloat16()
        f32, bf16 = runtime.best_seconds_each([lambda: torch.mm(a, b), lambda: torch.mm(a16, b16)], 3)
        _PREFILL.append(torch.bfloat16 if bf16 < f32 else torch.float32)
    return _PREFILL[0]


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] int8 * scales [N])^T -> [M, N] in x's dtype."""
    # (the kernel reads the input dimension in blocks of 16: another width crashes it beyond one row)
    if x.device.type == "cpu" and x.shape[0] <= KERNEL_ROWS and x.shape[1] % 16 == 0:
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), weight, scales).to(x.dtype)
    if x.device.type == "cpu":
        wide = prefill_dtype()
        y = torch.mm(x.to(wide), weight.to(wide).t())
        return (y.float() * scales.float()).to(x.dtype)
    return torch.mm(x, weight.to(x.dtype).t()) * scales.to(x.dtype)


class Int8Linear(nn.Module):
    """An `nn.Linear`'s weight as int8 rows and a bfloat16 scale each (bias kept in float32)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
        q = (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("bias", bias)
        self.out_dtype = linear.weight.dtype

    def dequantized(self) -> torch.Tensor:
        """The float32 weight these int8 rows and scales stand for (the reference they are tested against)."""
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x.reshape(-1, x.shape[-1]), self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize(vlm, dtype: str = "float32"):
    """`vlm` with its LM's weights in `dtype` (one of `WEIGHT_DTYPES`), in place; returns it."""
    check_choice("weights dtype", dtype, WEIGHT_DTYPES)
    if dtype == "float32":
        return vlm
    if hasattr(vlm.lm, "merge_and_unload"):  # LoRA adapters: folded into the weights first
        vlm.merge_lora()
    lm = vlm.causal_lm
    if dtype == "bfloat16":
        lm.to(torch.bfloat16)
        return vlm
    with torch.no_grad():
        for module in list(lm.modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Linear:
                    setattr(module, child_name, Int8Linear(child))
    if next(lm.parameters()).device.type == "cpu":
        prefill_dtype()  # measured now, at load, so that no request's prefill pays for it
    return vlm


def load(path, dtype: str = "float32"):
    """A model folder loaded for inference (eval mode) with its LM's weights in `dtype`; the
    dtype is checked before anything loads."""
    from vlmforge.model.vlm import VLM

    check_choice("weights dtype", dtype, WEIGHT_DTYPES)
    return quantize(VLM.from_pretrained(path).eval(), dtype)
