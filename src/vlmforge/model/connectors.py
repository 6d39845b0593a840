"""Connectors: map patch features [N, P, Dv] to visual tokens [N, T, D] in the LM's space.

A registry from names to builders, so a connector is chosen by a string in the config:

* `mlp` (LLaVA-1.5, Liu et al. 2023 "Improved Baselines with Visual Instruction Tuning"): two
  linear layers with a GELU; one visual token per patch.
* `attention` (Llama3-V): two pre-norm self-attention blocks over the patch features, then a
  linear projection to the LM width; one visual token per patch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

CONNECTORS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(cls):
        CONNECTORS[name] = cls
        return cls

    return deco


def build_connector(name: str, vision_dim: int, lm_dim: int, **kwargs) -> nn.Module:
    if name not in CONNECTORS:
        raise ValueError(f"unknown connector {name!r}; available: {', '.join(sorted(CONNECTORS))}")
    return CONNECTORS[name](vision_dim, lm_dim, **kwargs)


@register("mlp")
class MLPConnector(nn.Module):
    def __init__(self, vision_dim: int, lm_dim: int, hidden: int | None = None, **_):
        super().__init__()
        hidden = hidden or lm_dim
        self.net = nn.Sequential(nn.Linear(vision_dim, hidden), nn.GELU(), nn.Linear(hidden, lm_dim))

    def num_tokens(self, num_patches: int) -> int:
        return num_patches

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # [N, P, Dv] -> [N, P, D]
        return self.net(feats)


@register("attention")
class AttentionConnector(nn.Module):
    def __init__(self, vision_dim: int, lm_dim: int, layers: int = 2, heads: int = 4, **_):
        super().__init__()
        if vision_dim % heads:
            raise ValueError(f"attention connector: vision width {vision_dim} is not divisible by {heads} heads")
        block = lambda: nn.TransformerEncoderLayer(  # noqa: E731
            vision_dim, heads, 4 * vision_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.ModuleList(block() for _ in range(layers))
        self.norm = nn.LayerNorm(vision_dim)
        self.proj = nn.Linear(vision_dim, lm_dim)

    def num_tokens(self, num_patches: int) -> int:
        return num_patches

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # [N, P, Dv] -> [N, P, D]
        x = feats
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x))
