"""Connectors: map patch features [N, P, Dv] to visual tokens [N, T, D] in the LM's space.

A registry from names to builders, so a connector is chosen by a string in the config:

* `mlp` (LLaVA-1.5, Liu et al. 2023 "Improved Baselines with Visual Instruction Tuning"): two
  linear layers with a GELU; one visual token per patch.
* `attention` (Llama3-V): two pre-norm self-attention blocks over the patch features, then a
  linear projection to the LM width; one visual token per patch.
* `linear` (LLaVA-1, Liu et al. 2023 "Visual Instruction Tuning"): one linear layer; one visual
  token per patch.
* `perceiver` (Idefics2, Laurençon et al. 2024 "What matters when building vision-language
  models?"): a SwiGLU MLP to the LM width, then a perceiver resampler: N learned latents (default
  64) that, layer after layer, attend to the patch tokens and to themselves; N visual tokens per
  image (or crop), whatever the number of patches.
* `pixel_shuffle` (Idefics3 / SmolVLM / nanoVLM): space-to-depth on the patch grid by a factor r
  (r x r neighbouring patches concatenated into one token), then a linear projection; P / r^2
  visual tokens.

Each connector tells the model how many visual tokens it emits for P patch tokens (`num_tokens`),
and whether that is one per patch (`per_patch`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

CONNECTORS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(cls):
        CONNECTORS[name] = cls
        return cls

    return deco


def build_connector(name: str, vision_dim: int, lm_dim: int, **kwargs) -> nn.Module:
    """A connector by registry name; `kwargs` a connector does not use are ignored."""
    if name not in CONNECTORS:
        raise ValueError(f"unknown connector {name!r}; available: {', '.join(sorted(CONNECTORS))}")
    return CONNECTORS[name](vision_dim, lm_dim, **kwargs)


@register("mlp")
class MLPConnector(nn.Module):
    per_patch = True

    def __init__(self, vision_dim: int, lm_dim: int, hidden: int | None = None, **_):
        super().__init__()
        hidden = hidden or lm_dim
        self.net = nn.Sequential(nn.Linear(vision_dim, hidden), nn.GELU(), nn.Linear(hidden, lm_dim))

    def num_tokens(self, num_patches: int) -> int:
        return num_patches

    def linears(self) -> tuple[nn.Linear, nn.Linear]:
        """The two linear layers (a GELU between them): LLaVA's projector."""
        return self.net[0], self.net[2]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # [N, P, Dv] -> [N, P, D]
        return self.net(feats)


@register("attention")
class AttentionConnector(nn.Module):
    per_patch = True

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


@register("linear")
class LinearConnector(nn.Module):
    per_patch = True

    def __init__(self, vision_dim: int, lm_dim: int, **_):
        super().__init__()
        self.proj = nn.Linear(vision_dim, lm_dim)

    def num_tokens(self, num_patches: int) -> int:
        return num_patches

    def linears(self) -> tuple[nn.Linear]:
        return (self.proj,)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # [N, P, Dv] -> [N, P, D]
        return self.proj(feats)


class SwiGLU(nn.Module):
    """Idefics2's MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.gate = nn.Linear(dim_in, hidden, bias=False)
        self.up = nn.Linear(dim_in, hidden, bias=False)
        self.down = nn.Linear(hidden, dim_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class PerceiverLayer(nn.Module):
    """One Idefics2 resampler layer: latents attend to [context; latents] (pre-norm, residual),
    then a SwiGLU MLP (pre-norm, residual)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"perceiver connector: width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm_latents, self.norm_context, self.norm_mlp = nn.RMSNorm(dim), nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.mlp = SwiGLU(dim, 4 * dim, dim)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, t, d = latents.shape  # latents [N, T, D], context [N, P, D]
        lat = self.norm_latents(latents)
        kv_in = torch.cat([self.norm_context(context), lat], dim=1)  # [N, P + T, D]
        split = lambda x: x.view(n, x.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        k, v = self.kv(kv_in).chunk(2, dim=-1)
        attn = F.scaled_dot_product_attention(split(self.q(lat)), split(k), split(v))  # [N, H, T, D/H]
        latents = latents + self.o(attn.transpose(1, 2).reshape(n, t, d))
        return latents + self.mlp(self.norm_mlp(latents))


@register("perceiver")
class PerceiverConnector(nn.Module):
    per_patch = False

    def __init__(
        self,
        vision_dim: int,
        lm_dim: int,
        latents: int = 64,
        layers: int = 3,
        heads: int = 4,
        hidden: int | None = None,
        **_,
    ):
        super().__init__()
        if latents < 1:
            raise ValueError(f"perceiver connector: latents must be >= 1, got {latents}")
        self.projection = SwiGLU(vision_dim, hidden or 4 * lm_dim, lm_dim)
        self.latents = nn.Parameter(torch.randn(latents, lm_dim) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(lm_dim, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(lm_dim)

    def num_tokens(self, num_patches: int) -> int:
        return self.latents.shape[0]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # [N, P, Dv] -> [N, latents, D]
        context = self.projection(feats)
        x = self.latents.unsqueeze(0).expand(feats.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, context)
        return self.norm(x)


@register("pixel_shuffle")
class PixelShuffleConnector(nn.Module):
    per_patch = False

    def __init__(self, vision_dim: int, lm_dim: int, factor: int = 2, **_):
        super().__init__()
        if factor < 1:
            raise ValueError(f"pixel_shuffle connector: factor must be >= 1, got {factor}")
        self.factor = factor
        self.proj = nn.Linear(vision_dim * factor * factor, lm_dim, bias=False)

    def grid(self, num_patches: int) -> int:
        side = math.isqrt(num_patches)
        if side * side != num_patches or side % self.factor:
            raise ValueError(
                f"pixel_shuffle connector: {num_patches} patch tokens are not a square grid whose side is "
                f"divisible by the factor {self.factor} (a pooled/CLS token cannot be shuffled: drop it)"
            )
        return side

    def num_tokens(self, num_patches: int) -> int:
        self.grid(num_patches)
        return num_patches // self.factor**2

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # [N, P, Dv] -> [N, P / r^2, D]
        n, p, d = feats.shape
        side, r = self.grid(p), self.factor
        x = feats.reshape(n, side // r, r, side // r, r, d)  # rows: (block, within); cols likewise
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(n, (side // r) ** 2, r * r * d)  # each r x r block -> one token
        return self.proj(x)
