"""The cross-attention architecture (Flamingo, Alayrac et al. 2022; Idefics1): visual tokens are
not placed in the LM's sequence; instead gated cross-attention layers, inserted before every k-th
decoder layer of the unchanged LM, let the text tokens attend to them.

Each inserted layer is `x + tanh(a) * attn(norm(x), image) ; x + tanh(b) * ffn(norm(x))` with the
gates `a`, `b` initialised to zero, so an untrained model computes exactly the LM's text-only
output. The layers are attached to the decoder layers with forward pre-hooks, so the LM (its
weights, LoRA adapters, KV cache and `generate`) is used as it is; the visual context of the
current batch is set before the LM runs and cleared after.

`CrossAttentionBridge` holds the connector (which maps patch features to LM-width visual tokens,
exactly as in the autoregressive design) and the gated layers, so both train in every stage and
are saved together. Simplification, stated: every text token of a row sees all images of that row
(Flamingo restricts each token to the image before it).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class GatedCrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"cross-attention: LM width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm_attn, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape  # x [B, L, D]; context [B, T, D]; mask [B, T] (True = a real token)
        h = self.heads
        split = lambda t: t.view(b, t.shape[1], h, d // h).transpose(1, 2)  # noqa: E731
        k, v = self.kv(context.to(x.dtype)).chunk(2, dim=-1)
        has = mask.any(dim=1)  # rows with no image attend to nothing: their update is zeroed
        attn_mask = (mask | ~has[:, None])[:, None, None, :]  # [B, 1, 1, T]
        a = F.scaled_dot_product_attention(split(self.q(self.norm_attn(x))), split(k), split(v), attn_mask=attn_mask)
        a = self.o(a.transpose(1, 2).reshape(b, length, d)) * has[:, None, None].to(x.dtype)
        x = x + torch.tanh(self.gate_attn) * a
        return x + torch.tanh(self.gate_ffn) * self.ffn(self.norm_ffn(x))


class CrossAttentionBridge(nn.Module):
    """The connector plus gated cross-attention layers hooked before every `every`-th decoder layer."""

    def __init__(self, connector: nn.Module, decoder_layers: nn.ModuleList, dim: int, heads: int, every: int):
        super().__init__()
        if every < 1:
            raise ValueError(f"cross-attention: xattn_every must be >= 1, got {every}")
        self.proj = connector
        self.at = list(range(0, len(decoder_layers), every))
        self.layers = nn.ModuleList(GatedCrossAttention(dim, heads) for _ in self.at)
        self.context: tuple[torch.Tensor, torch.Tensor] | None = None
        for layer, xattn in zip((decoder_layers[i] for i in self.at), self.layers):
            layer.register_forward_pre_hook(self._hook(xattn), with_kwargs=True)

    def num_tokens(self, num_patches: int) -> int:
        return self.proj.num_tokens(num_patches)

    @property
    def per_patch(self) -> bool:
        return self.proj.per_patch

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # [N, P, Dv] -> [N, T, D]
        return self.proj(feats)

    def _hook(self, xattn: GatedCrossAttention):
        def pre_hook(module, args, kwargs):
            if self.context is None:
                return None
            context, mask = self.context
            if args:
                return (xattn(args[0], context, mask), *args[1:]), kwargs
            kwargs["hidden_states"] = xattn(kwargs["hidden_states"], context, mask)
            return args, kwargs

        return pre_hook

    def set_context(self, vis: torch.Tensor, images_per_row: torch.Tensor, views: int) -> None:
        """Group visual tokens [N_views, T, D] by batch row: row r gets the views of its images
        (`images_per_row[r]` images, `views` views each, in order), padded and masked. [B, V*T, D]"""
        per_view = vis.shape[1]
        counts = (images_per_row * views).tolist()
        if sum(counts) != vis.shape[0]:
            raise ValueError(
                f"the prompts hold {int(images_per_row.sum())} images x {views} views = {sum(counts)} views, "
                f"but {vis.shape[0]} were given"
            )
        width = max(max(counts) * per_view, 1)
        context = vis.new_zeros(len(counts), width, vis.shape[-1])
        mask = torch.zeros(len(counts), width, dtype=torch.bool, device=vis.device)
        start = 0
        for r, c in enumerate(counts):
            if c:
                context[r, : c * per_view] = vis[start : start + c].reshape(-1, vis.shape[-1])
                mask[r, : c * per_view] = True
            start += c
        self.context = (context, mask)

    def clear_context(self) -> None:
        self.context = None

    @contextlib.contextmanager
    def attending(self, context: tuple[torch.Tensor, torch.Tensor] | None):
        """The gated layers attend to `context` (visual tokens and mask, as `set_context` groups
        them) inside the block, and to nothing after it."""
        self.context = context
        try:
            yield
        finally:
            self.context = None
