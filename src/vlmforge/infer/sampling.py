"""Picking the next token: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, p) -> torch.Tensor:
    """`logits` [V] scaled by the temperature, with the tokens top-k / top-p exclude at -inf."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list, generators: list, greedy: list[int] | None = None) -> list[int]:
    """One token per row of `logits` [B, V]: the argmax where the temperature is 0 (`greedy`, where
    the step computed them already), else drawn with that row's generator (None: torch's global one)."""
    out = logits.argmax(-1).tolist() if greedy is None else list(greedy)
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.temperature > 0:
            out[i] = int(torch.multinomial(filter_logits(logits[i], p).softmax(-1), 1, generator=g))
    return out
