"""One sequence's decode step as one compiled graph (`Engine(compile=True)`, CPUs, float32).

At one token a step, a decode step reads every weight once and does little else, so its speed is
the rate at which it streams the weights. Eager PyTorch loses twice there: its one-row matmul reads
float32 weights at 12-20 GB/s on an AVX2 CPU that sums a buffer at ~30, and the ~15 small operations of
each layer cost their dispatch. Here every layer is written as reductions that Inductor turns into
C++ loops of its own: each projection `(W * x).sum(-1)` over the weight's rows as stored (no copy),
the norms, the rotation and the attention fused around them, and the step's wrapper in C++
(`cpp_wrapper`), so nothing runs in Python between the layers. The keys and values are only read
inside the graph (a write to an input would copy the whole buffer): attention covers the cached
positions and the new token apart, and the step returns the new keys and values for the caller to
write. The LM head is the graph's last reduction.

Which way of multiplying by the weights streams them faster depends on the machine, so `pick`
measures it when the step is built: "mm" is torch's one-row matmul on the lean forward's transposed
copies (`decoder.Weight`; Inductor calls the same kernel from its C++ wrapper), "rows" the
reductions above, which read at 70-80% of the machine's read rate (a sum over one buffer) on the
machines measured. Where the matmul reads the weights at `MM_SHARE` of that rate or more (an Intel
AVX-512 machine) it is used; elsewhere (an AVX2 machine, an AMD AVX-512 one, where it reads at a
third to a half of it) the reductions are. docs/engine.md has the figures of each.

Built by `Decoder` where `eligible` says so; used for a step of one sequence and one new token.
The first call compiles (about 3 minutes for SmolLM2's 30 layers on a 2-core machine; Inductor
keeps the result in its cache directory, so a later process starts in seconds); sequences of any length
share the graph (the cache's length is a dynamic dimension), whatever batches ran between them (one
slot's keys are laid out alike at any number of slots: `kv_cache.SlotCache`).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmforge import runtime
from vlmforge.config import check_choice

PROJECTIONS = ("auto", "rows", "mm")
# the share of the machine's read rate from which the step multiplies by the matmul ("mm")
MM_SHARE = 0.85


def eligible(layers, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the compiled step cannot run these `decoder._Layer`s (None: it can)."""
    if device.type != "cpu" or dtype != torch.float32:
        return f"{device.type} {dtype} (the compiled step is for float32 on CPUs)"
    for layer in layers:
        if layer.xattn is not None or layer.q_norm is not None:
            return "cross-attention or per-head q/k norms"
        if not all(type(m) is nn.Linear for m in layer.linears):
            return "adapted or quantized projections"
        if None in (layer.w_qkv, layer.w_o, layer.w_gu, layer.w_down):
            return "projections not fused"
    return None


def _weights(decoder, limit: int = 1 << 30) -> list[torch.Tensor]:
    """The [in, out] matrices the "mm" step reads: per layer [q k v], o, [gate up], down; then the
    head; the layers only up to `limit` bytes (enough to measure by, beyond any cache)."""
    out, nbytes = [], 0
    for L in decoder.layers:
        out += [L.w_qkv.w[:, : L.qk + L.kv], L.w_o.w, L.w_gu.w, L.w_down.w]
        nbytes += sum(w.numel() * w.element_size() for w in out[-4:])
        if nbytes >= limit:
            return out
    return out + [decoder.head_w.w]


def read_rates(weights: list[torch.Tensor], repeats: int = 5) -> tuple[float, float]:
    """(bytes/s, bytes/s): how fast one row times each of `weights` (torch's matmul) reads them, and
    how fast this machine reads a buffer of their size (`runtime.read_rate`); best of `repeats`."""
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    rows = {w.shape[0]: torch.ones(1, w.shape[0], dtype=w.dtype, device=w.device) for w in weights}

    def once() -> None:
        for w in weights:
            rows[w.shape[0]] @ w

    with torch.no_grad():
        return nbytes / runtime.best_seconds(once, repeats), runtime.read_rate(nbytes, repeats)


def pick(decoder, projections: str = "auto") -> tuple[str, str]:
    """("rows" or "mm", why): `projections` itself, or for "auto" the matmul where it reads the
    weights at `MM_SHARE` of this machine's read rate or more (both measured now, on up to 1 GB of
    them: ~0.5 s for SmolLM2)."""
    check_choice("projections", projections, PROJECTIONS)
    if projections != "auto":
        return projections, "as asked"
    mm, total = read_rates(_weights(decoder))
    kind = "mm" if mm >= MM_SHARE * total else "rows"
    return kind, f"the one-row matmul read the weights at {mm / 1e9:.1f} GB/s, this machine reads {total / 1e9:.1f}"


def _project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x [1, in] @ w[out, in]^T as a reduction over w's rows (read once, as stored)."""
    y = (w * x).sum(-1)[None]
    return y if b is None else y + b


def _mm(x: torch.Tensor, w, n: int | None = None) -> torch.Tensor:
    """x [1, in] @ the `decoder.Weight` `w` (its first `n` outputs), torch's matmul on its [in, out] copy."""
    y = x @ (w.w if n is None else w.w[:, :n])
    b = w.b if n is None or w.b is None else w.b[:n]
    return y if b is None else y + b


class _Graph(nn.Module):
    """The layers' formula (`decoder.Decoder` holds the same one, eager) on the model's own weights
    ("rows"), or on the lean forward's [in, out] copies of them (`mm`)."""

    def __init__(self, decoder, head: nn.Module, mm: bool):
        super().__init__()
        self.decoder, self.head, self.mm = decoder, head, mm

    def forward(self, x, pos, keys: torch.Tensor, values: torch.Tensor):
        """x [1, D]; pos [1] (the new token's position); keys/values [layers, kv_heads, length, head_dim]
        → (the final norm's output [1, D], its logits [1, V], new keys [layers, kv_heads, head_dim], new values)."""
        d = self.decoder
        hd, nh, nkv = d.head_dim, d.heads, d.kv_heads
        g, half = nh // nkv, hd // 2
        cos, sin = d.cos[pos], d.sin[pos]  # [1, hd]
        earlier = torch.arange(keys.shape[2])[None, None, :] < pos  # [1, 1, length]
        hide = torch.where(earlier, 0.0, float("-inf"))[:, :, None]  # [1, 1, 1, length] over [kv, g, 1, L]
        new_k, new_v = [], []
        for i, L in enumerate(d.layers):
            a, mlp = L.attn, L.mlp
            x1 = L.traced_n1(x)
            if self.mm:
                y = _mm(x1, L.w_qkv, L.qk + L.kv)[0]
                q, k, v = y[: nh * hd].view(nh, hd), y[nh * hd : L.qk].view(nkv, hd), y[L.qk :].view(nkv, hd)
            else:
                q = _project(x1, a.q_proj.weight, a.q_proj.bias).view(nh, hd)
                k = _project(x1, a.k_proj.weight, a.k_proj.bias).view(nkv, hd)
                v = _project(x1, a.v_proj.weight, a.v_proj.bias).view(nkv, hd)
            q = q * cos + torch.cat((-q[:, half:], q[:, :half]), -1) * sin
            k = k * cos + torch.cat((-k[:, half:], k[:, :half]), -1) * sin
            new_k.append(k)
            new_v.append(v)
            qg = (q * L.scale).view(nkv, g, 1, hd)
            s_old = qg @ keys[i][:, None].transpose(-1, -2) + hide[0]  # [kv, g, 1, length]
            s_new = (qg * k[:, None, None]).sum(-1, keepdim=True)  # [kv, g, 1, 1]
            top = torch.maximum(s_old.amax(-1, keepdim=True), s_new)
            p_old, p_new = torch.exp(s_old - top), torch.exp(s_new - top)
            att = (p_old @ values[i][:, None] + p_new * v[:, None, None]) / (p_old.sum(-1, keepdim=True) + p_new)
            if self.mm:
                x = x + _mm(att.reshape(1, nh * hd), L.w_o)
                gu = _mm(L.traced_n2(x), L.w_gu)
                x = x + _mm(L.act(gu[:, : L.inter]) * gu[:, L.inter :], L.w_down)
                continue
            x = x + _project(att.reshape(1, nh * hd), a.o_proj.weight, a.o_proj.bias)
            x2 = L.traced_n2(x)
            gate = _project(x2, mlp.gate_proj.weight, mlp.gate_proj.bias)
            up = _project(x2, mlp.up_proj.weight, mlp.up_proj.bias)
            x = x + _project(L.act(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)
        x = d.traced_norm(x)
        logits = _mm(x, d.head_w) if self.mm else _project(x, self.head.weight, self.head.bias)
        return x, logits, torch.stack(new_k), torch.stack(new_v)


class CompiledStep:
    """`step(embeds [1, 1, D], position, cache)` → the final norm's output [1, 1, D], the new
    token's keys and values written to the cache's slot 0 (where the one running sequence is);
    `logits(hidden)` → the LM head's output, computed in the same graph."""

    def __init__(self, decoder, head: nn.Module, projections: str = "auto"):
        self.projections, self.why = pick(decoder, projections)  # "rows" or "mm", and why
        graph = _Graph(decoder, head, self.projections == "mm")
        self.graph = torch.compile(graph, fullgraph=True, options={"cpp_wrapper": True})
        self.steps = 0  # steps taken through the graph
        self._last = None  # (the last step's output, its logits)

    def __call__(self, embeds: torch.Tensor, position: int, cache) -> torch.Tensor:
        keys, values = cache.slot(0)
        for t in (keys, values):  # one graph for every cache length
            torch._dynamo.maybe_mark_dynamic(t, 2)
        h, logits, new_k, new_v = self.graph(embeds[0], torch.tensor([position]), keys, values)
        cache.put(0, position, new_k, new_v)
        self.steps += 1
        self._last = (h, logits)
        return h[None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The logits [1, V] of the hidden state [1, D] the last step returned (None for any other)."""
        if self._last is None or hidden.data_ptr() != self._last[0].data_ptr():
            return None
        return self._last[1]
