"""The engine's LM forward pass: a lean loop over a Llama-family decoder's own modules.

A decode step of a small model is mostly per-call overhead (module dispatch, mask building,
output bookkeeping), not arithmetic. For the decoders whose layer is exactly
`x + o(attn(rope(q(n1(x))), rope(k(...)), v(...))); x + down(act(gate(n2(x))) * up(n2(x)))` —
Llama, Mistral, Qwen2, Qwen3 (which adds per-head q/k norms) — this module runs that formula with
the model's own weights: plain `nn.Linear`s as matmuls (on CPUs on fused, transposed copies: q/k/v
and gate/up as one matmul each), LoRA-wrapped ones through their module, a rotary table computed
once by the model's own rotary module, and `scaled_dot_product_attention` on the engine's slot
cache. On CPUs a decode step of Llama's plain float32 layers runs the whole layer stack in one call
of the engine's C kernels (`kernels.Stack`: no Python between operations), and so does a prefill of
up to `PREFILL_ROWS` new tokens (`Stack.prefill`); other steps run the layers operation by
operation, with the engine's kernels where they apply. Every other decoder (or
a rotary scaling that changes with length, or a sliding window shorter than the context) runs
through the Hugging Face forward, with the same cache and mask.
The cross-attention architecture's gated layers are applied before the layers they are attached
to, as their hooks would.
"""

from __future__ import annotations

import contextlib
import functools
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from vlmforge import runtime
from vlmforge.infer import kernels
from vlmforge.infer.compiled import CompiledStep, eligible
from vlmforge.model.quant import Int8Linear, int8_matmul

# Up to this many rows (batch x new tokens) a forward folds the rotation into the projection:
# below it, operations cost more than the extra matmul columns; above, the other way round.
FOLD_ROWS = 4
# A weight of at least this many elements is also kept as row tiles or prepacked (see `Weight`): one
# that size is read from memory at every step, where those layouts pay; smaller ones stay in the caches,
# where the plain matmul is faster (the tiny model's weights).
PACK_MIN = 1 << 19  # 2 MB of float32, a core's L2 here: oneDNN's packed copy of weights this large
# float32 weights of this many elements and more also take row tiles: all of them, since within the
# stack even small ones read faster as tiles (the tiny model's step, docs/engine.md)
TILE_MIN = 0
# Up to this many rows in all (the new tokens of every prompt), a prefill runs through the layer
# stack in one call (`Decoder.prefill`): on the Intel AVX-512 machine 0.56-0.64x the time of the
# operations at 16-64 rows of the tiny model, 0.88x at 256; SmolLM2's 0.74x at 16, 0.93x at 236
# (docs/engine.md). Past it, operation by operation (the stack's scratch grows with rows squared)
PREFILL_ROWS = 256
FAST_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
OWN_ATTENTION = "the engine's kernel (`kernels.attend`)"  # `Decoder.attention` where a decode step used it
PREFILL_STACK = "the layers in one call (`kernels.Stack.prefill`)"  # `Decoder.prefilled` where a prefill ran so
STATIC_ROPE = {None, "default", "linear", "llama3", "yarn", "longrope"}


class Weight:
    """One weight for several projections of the same input (q, k, v; gate, up), as vLLM does,
    plus `extra` rows (the rotated q/k below): `w(x)` is x @ W^T (+ b), `w(x, n)` only the first
    `n` outputs, `w.add(x, h)` h + x @ W^T. Plain `nn.Linear`s are stored transposed, [in, out],
    because on CPUs `x @ W` with a contiguous W runs up to 10x faster than `F.linear` for 4 to 16
    rows (with `copy` False: a view, no copy); `Int8Linear`s as their int8 rows and scales, multiplied
    by `quant.int8_matmul`. A copy: the modules are left as they are, so training and saving see
    no change.

    With `pack` (on the CPU), the weight without its extra rows is also kept in a layout for several
    rows at once. float32 (of `TILE_MIN` elements and more): as row tiles (`kernels.Tiles`), read
    from 2 to `kernels.MAX_ROWS` rows (a batched decode step: 8 rows read SmolLM2's weights at ~1.5x
    the rate of oneDNN's packed layout); where that kernel cannot be built, in oneDNN's packed layout
    (of `PACK_MIN` elements and more), read at 2 rows and more. One row reads the plain copy, or the
    tiles where `Decoder` measured them faster at one row on this machine (`one_row_tiles`); the
    many rows of a prefill read the plain copy, or the tiles up to `tile_rows` rows where `Decoder`
    measured them faster at that many. bfloat16: oneDNN's packed layout reads ~2x faster at
    every row count, so it is the only one read; so it is with `plain` False too (a vision tower's
    weights, whose calls have many rows), and no plain copy or concatenation is kept beside it
    (extra rows are read only where a plain copy is: `Decoder` folds the rotation into the
    projection there alone)."""

    def __init__(
        self,
        mods: list[nn.Module],
        extra: list = (),
        extra_bias: list = (),
        copy: bool = True,
        pack: bool = False,
        plain: bool = True,
    ):
        with torch.no_grad():
            self.int8 = type(mods[0]) is Int8Linear
            biases = [m.bias for m in mods] + list(extra_bias)
            self.main = sum(m.out_features for m in mods)  # outputs before the extra rows
            self.packed, self.tiles, self.packed_only = None, None, False
            self.one_row_tiles = False  # one row reads the tiles too (`Decoder` measures which is faster)
            self.tile_rows = kernels.MAX_ROWS  # the most rows that read the tiles (`Decoder` may raise it)
            if self.int8:  # extra: (int8 rows, scales) pairs
                self.w = torch.cat([m.weight for m in mods] + [e[0] for e in extra])
                self.scales = torch.cat([m.scales for m in mods] + [e[1] for e in extra])
                sizes = [m.out_features for m in mods] + [e[0].shape[0] for e in extra]
                self.b = self._bias(biases, sizes, torch.float32, self.w.device)
            else:
                w = torch.cat([m.weight for m in mods] + list(extra)) if len(mods) + len(extra) > 1 else mods[0].weight
                sizes = [m.out_features for m in mods] + [e.shape[0] for e in extra]
                big = self.main * w.shape[1] >= PACK_MIN or w.dtype == torch.bfloat16
                tiled = pack and plain and w.dtype == torch.float32 and self.main * w.shape[1] >= TILE_MIN
                self.b = self._bias(biases, sizes, w.dtype, w.device)
                if tiled and w.device.type == "cpu" and kernels.library():
                    # float32 read by several rows at once (a batched decode step): the row tiles
                    self.tiles = kernels.Tiles(w[: self.main], None if self.b is None else self.b[: self.main])
                else:
                    self.packed = self._pack(w[: self.main]) if pack and big else None
                # the packed copy is the one read at every row count: bfloat16's, and without `plain`
                self.packed_only = self.packed is not None and (w.dtype == torch.bfloat16 or not plain)
                if self.packed_only:
                    self.w = None  # every call reads the packed copy
                else:
                    self.w = w.t().contiguous() if copy else w.t()
            self.width = sum(sizes)  # outputs, the extra rows included

    @staticmethod
    def _bias(biases: list, sizes: list[int], dtype, device) -> torch.Tensor | None:
        """The biases of every output (zeros where a projection has none), or None where none has one."""
        if all(x is None for x in biases):
            return None
        zeros = [torch.zeros(n, dtype=dtype, device=device) for n in sizes]
        return torch.cat([z if x is None else x.to(dtype) for x, z in zip(biases, zeros)])

    @staticmethod
    def _pack(w: torch.Tensor):
        """`w` [out, in] in oneDNN's layout for `mkldnn._linear_pointwise`, or None where that is missing."""
        if w.dtype not in (torch.float32, torch.bfloat16) or w.device.type != "cpu":
            return None
        if not torch.backends.mkldnn.is_available():
            return None
        try:
            return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 8)
        except (RuntimeError, AttributeError):
            return None

    def plain_for(self, rows: int) -> bool:
        """Whether `rows` rows at once take the plain copy (always without a packed one or tiles)."""
        if self.tiles is not None:
            return (rows == 1 and not self.one_row_tiles) or rows > self.tile_rows
        return self.packed is None or (rows == 1 and not self.packed_only)

    def reads_packed(self, rows: int, n: int | None = None) -> bool:
        """Whether `rows` rows, multiplied by the first `n` outputs (None: all), read the packed copy
        or the tiles (which hold no extra rows)."""
        return not self.plain_for(rows) and (n or self.width) == self.main

    def kernel(self, rows: int, stacked: bool = False) -> str:
        """In words, what multiplies `rows` rows by this weight (all its outputs); `stacked`: within
        `kernels.Stack`, which reads the tiles where this weight would, else the plain copy."""
        if self.int8:
            return "torch's int8 kernel"
        if stacked and not self.reads_packed(rows, self.main):
            return "the engine's kernel on the plain copy"
        if not self.reads_packed(rows, self.main):
            why = kernels.why_unavailable() if self.packed is not None and rows > 1 else None
            return "torch's matmul" + (f" (row tiles unavailable: {why})" if why else "")
        if self.tiles is not None:
            width = self.tiles.tiles.shape[-1]
            return f"row tiles (`kernels.Tiles`, {width} outputs a tile; up to {self.tile_rows} rows)"
        why = kernels.why_unavailable()
        return "oneDNN's packed layout" + (f" (row tiles unavailable: {why})" if why else "")

    def __call__(self, x: torch.Tensor, n: int | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        b = self.b if n is None or self.b is None else self.b[:n]
        if self.int8:
            y = int8_matmul(x2, self.w if n is None else self.w[:n], self.scales if n is None else self.scales[:n])
            y = y if b is None else y + b.to(y.dtype)
        elif self.reads_packed(x2.shape[0], n):
            if self.tiles is not None:
                y = self.tiles(x2)  # the bias included
            else:
                bias = None if self.b is None else self.b[: self.main]
                y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, bias, "none", [], "")
        else:
            w = self.w if n is None else self.w[:, :n]
            y = torch.mm(x2, w) if b is None else torch.addmm(b, x2, w)
        return y.view(*x.shape[:-1], y.shape[1])

    def gelu(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        """gelu(x @ W^T + b): one oneDNN call (the activation fused into the matmul) where the
        weight is packed and several rows go, otherwise the matmul, then the activation."""
        x2 = x.reshape(-1, x.shape[-1])
        if not self.reads_packed(x2.shape[0]) or self.packed is None:
            return F.gelu(self(x), approximate=approximate)
        y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.b, "gelu", [], approximate)
        return y.view(*x.shape[:-1], y.shape[1])

    def add(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h + x @ W^T (x, h: [..., *]): one addmm for a bias-free float weight read plain, one call
        of the tiles where they are read."""
        rows = x.numel() // x.shape[-1]
        if self.tiles is not None and self.reads_packed(rows) and h.is_contiguous():
            return self.tiles(x.reshape(rows, -1), h.view(rows, -1)).view(h.shape)
        if self.int8 or self.b is not None or not self.plain_for(rows):
            return h + self(x)
        return torch.addmm(h.reshape(-1, h.shape[-1]), x.reshape(-1, x.shape[-1]), self.w).view(h.shape)

    def swiglu_add(self, gu: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h + (silu(gate) * up) @ W^T for gu = [gate | up] ([..., 2 x in]): a SwiGLU MLP's down
        projection, in one call of the tiles where they are read."""
        half = gu.shape[-1] // 2
        rows = gu.numel() // gu.shape[-1]
        if self.tiles is not None and self.reads_packed(rows) and h.is_contiguous():
            return self.tiles.swiglu(gu.reshape(rows, -1), h.view(rows, -1)).view(h.shape)
        return self.add(F.silu(gu[..., :half]) * gu[..., half:], h)


def _tiled(w) -> bool:
    return isinstance(w, Weight) and w.tiles is not None


def _sample(weights: list[Weight], rows: int, limit: int) -> tuple[list[Weight], int, dict]:
    """(the first of these tiled weights up to `limit` bytes of tiles, their bytes, an input of
    `rows` rows for each input width): what the measurements below read."""
    picked, nbytes = [], 0
    for w in weights:
        if nbytes < limit:
            picked.append(w)
            nbytes += w.tiles.tiles.numel() * 4
    return picked, nbytes, {w.tiles.inp: torch.ones(rows, w.tiles.inp) for w in picked}


def _rates(weights: list[Weight], rows: int, limit: int, repeats: int = 5) -> tuple[float, float]:
    """Bytes/s at which `rows` rows read these weights (up to `limit` bytes of them) as row tiles,
    and as torch's matmul reads their plain copies: best of `repeats`, measured now."""
    picked, nbytes, xs = _sample(weights, rows, limit)

    def tiles() -> None:
        for w in picked:
            w.tiles(xs[w.tiles.inp])

    def matmul() -> None:
        for w in picked:
            xs[w.tiles.inp] @ w.w[:, : w.main]

    with torch.no_grad():
        t, m = runtime.best_seconds_each([tiles, matmul], repeats)
    return nbytes / t, nbytes / m


def _one_row_step(decoder, stacks: list[kernels.Stack], keys: int = 16, repeats: int = 3) -> list[float]:
    """Seconds of one sequence's decode step through each of `stacks`, best of `repeats` (the stacks
    taking turns), on a scratch cache of `keys` keys: the weights' read is what differs between them."""
    keys = min(keys, decoder.cos.shape[0])
    shape = (1, len(decoder.layers), decoder.kv_heads, keys, decoder.head_dim)
    k, v = torch.zeros(shape), torch.zeros(shape)
    h = torch.zeros(1, stacks[0].dims[0])
    visible = kernels.Visible(torch.tensor([keys]))
    calls = [functools.partial(s, h, visible, k, v, decoder.cos, decoder.sin) for s in stacks]
    with torch.no_grad():
        return runtime.best_seconds_each(calls, repeats)


def _one_row_tiles(weights: list[Weight], limit: int = 1 << 30) -> tuple[bool, str]:
    """(whether one row reads these weights faster as row tiles than torch's matmul reads their plain
    copies, the two rates in words), measured now on up to `limit` bytes of them (~0.3 s for
    SmolLM2): the tiles read at 1.9-2.7x the matmul's rate on an AMD AVX-512 machine and at 0.86x on an
    Intel one (docs/engine.md)."""
    t, m = _rates(weights, 1, limit)
    return t > m, f"tiles read at {t / 1e9:.1f} GB/s, torch's matmul at {m / 1e9:.1f}"


def _pick_prefetch(weights: list[Weight], rows: int = 8, limit: int = 1 << 30) -> str:
    """Sets whether the tiles' blocks of several rows prefetch their weights in software
    (`kernels.set_prefetch`), whichever read these weights (up to `limit` bytes of them, from memory
    where they are that large) faster at `rows` rows, measured now (~0.3 s for SmolLM2); returns the
    figures in words. SmolLM2's 8 rows: 1.4x faster with it on an Intel machine, 0.94x on an AMD
    one (docs/engine.md)."""
    picked, nbytes, xs = _sample(weights, rows, limit)

    def read(ahead: int):
        def run() -> None:
            kernels.set_prefetch(ahead)
            for w in picked:
                w.tiles(xs[w.tiles.inp])

        return run

    with torch.no_grad():
        off, on = runtime.best_seconds_each([read(0), read(kernels.PREFETCH_BYTES)], 3)
    kernels.set_prefetch(kernels.PREFETCH_BYTES if on < off else 0)
    said = f"{rows} rows read {nbytes / 1e6:.0f} MB in {on * 1e3:.1f} ms with it, {off * 1e3:.1f} without"
    return f"{'on' if on < off else 'off'}, {kernels.PREFETCH_BYTES // 1024} KB ahead ({said}; measured now)"


TILE_ROWS = (64, 256)  # row counts past `kernels.MAX_ROWS` at which `_tile_rows` tries the tiles


def _tile_rows(weights: list[Weight], limit: int = 1 << 25) -> tuple[int, str]:
    """(the most rows, of `kernels.MAX_ROWS` and `TILE_ROWS`, up to which the tiles beat torch's
    matmul at each count tried, the figures in words), measured now on up to `limit` bytes of the
    weights (~0.5 s for SmolLM2). A prefill's rows are compute-bound, where torch's blocking won on an
    Intel machine (236 rows 0.89x) and the tiles win on an AMD one (1.1-1.7x at 64-256 rows,
    docs/engine.md)."""
    most, said = kernels.MAX_ROWS, []
    for rows in TILE_ROWS:
        t, m = _rates(weights, rows, limit, repeats=3)
        said.append(f"{rows} rows {t / m:.2f}x torch's matmul")
        if t <= m:
            break
        most = rows
    return most, ", ".join(said)


def fusable(*mods: nn.Module) -> bool:
    """Plain `nn.Linear`s (not LoRA wrappers) or `Int8Linear`s, all alike on one dtype and device:
    these can be one `Weight`."""
    kinds = {type(m) for m in mods}
    if kinds not in ({nn.Linear}, {Int8Linear}):
        return False
    return len({(m.weight.dtype, m.weight.device) for m in mods}) == 1


def _rotated(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of `rotate_half(W x)` per head: [-W_2, W_1] for each head's halves [W_1, W_2]."""
    v = w.view(-1, head_dim, *w.shape[1:])
    half = head_dim // 2
    return torch.cat((-v[:, half:], v[:, :half]), dim=1).reshape(w.shape)


def _rotated_rows(m: nn.Module, head_dim: int):
    """The rows of `rotate_half` of a projection: a float weight, or an int8 one's (rows, scales)
    (the rotation moves and negates rows: their scales move with them)."""
    if type(m) is Int8Linear:  # the rows negated, their (positive) scales only moved
        return _rotated(m.weight, head_dim), _rotated(m.scales[:, None], head_dim)[:, 0].abs()
    return _rotated(m.weight, head_dim)


def _residual(m: nn.Module, copy: bool) -> tuple[Weight | None, object]:
    """(its `Weight`, `(x, h) -> h + m(x)`): one addmm for a plain bias-free `nn.Linear` (x, h:
    [B, T, *]); with `copy` (CPUs), on a transposed contiguous copy of the weight and a prepacked one
    (see `Weight`). No `Weight` for other modules."""
    if fusable(m):
        w = Weight([m], copy=copy, pack=copy)
        return w, w.add
    return None, lambda x, h: h + m(x)


def _own_rms(norm: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of a LlamaRMSNorm that the engine's kernel computes (float32, on the CPU), else None."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
    if type(norm).__name__.endswith("RMSNorm") and eps is not None and "gemma" not in type(norm).__name__.lower():
        w = norm.weight
        if w.dtype == torch.float32 and w.device.type == "cpu" and kernels.library():
            return w.detach(), eps
    return None


def _rms(norm: nn.Module, own: bool = True):
    """LlamaRMSNorm (float32 statistics, weight applied in the input dtype) as one fused op: with
    `own`, on the CPU in float32, the engine's kernel (`kernels.rms_norm`; torch's runs six kernels);
    without, torch's (a compiled graph traces it)."""
    found = _own_rms(norm) if own else None
    if found is not None:
        w, eps = found
        return lambda x: kernels.rms_norm(x, w, eps) if x.dtype == torch.float32 else norm(x)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
    if type(norm).__name__.endswith("RMSNorm") and eps is not None and "gemma" not in type(norm).__name__.lower():
        w = norm.weight
        if w.dtype == torch.float32:
            return lambda x: F.rms_norm(x, w.shape, w, eps) if x.dtype == torch.float32 else norm(x)
        return lambda x: w * F.rms_norm(x.float(), w.shape, eps=eps).to(x.dtype)
    return norm


def fast_path_reason(lm_config, max_len: int) -> str | None:
    """Why the lean forward cannot run this LM (None: it can)."""
    kind = getattr(lm_config, "model_type", None)
    if kind not in FAST_TYPES:
        return f"model_type {kind!r}"
    rope = getattr(lm_config, "rope_parameters", None) or getattr(lm_config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) not in STATIC_ROPE:
        return f"rope type {rope.get('rope_type')!r}"
    window = getattr(lm_config, "sliding_window", None)
    if window and getattr(lm_config, "use_sliding_window", True) and window < max_len:
        return f"sliding window {window} < context {max_len}"
    return None


class _Layer:
    """One decoder layer's weights, arranged for few calls per token."""

    def __init__(self, layer, heads: int, kv_heads: int, head_dim: int, xattn, fuse: bool):
        a, mlp = layer.self_attn, layer.mlp
        self.attn, self.mlp = a, mlp  # the modules as they are (the compiled step reads them)
        self.linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        self.n1, self.n2 = _rms(layer.input_layernorm), _rms(layer.post_attention_layernorm)
        self.norms = (_own_rms(layer.input_layernorm), _own_rms(layer.post_attention_layernorm))
        self.traced_n1, self.traced_n2 = _rms(layer.input_layernorm, False), _rms(layer.post_attention_layernorm, False)
        self.q_norm, self.k_norm = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
        self.scale, self.act, self.xattn = a.scaling, mlp.act_fn, xattn
        silu = isinstance(self.act, nn.SiLU) or type(self.act).__name__ == "SiLUActivation"  # transformers' own
        (self.w_o, self.o), (self.w_down, self.down) = _residual(a.o_proj, fuse), _residual(mlp.down_proj, fuse)
        self.qk = (heads + kv_heads) * head_dim
        self.fold = fuse and self.q_norm is None and fusable(a.q_proj, a.k_proj, a.v_proj)
        if self.fold:
            # rotate_half(q) is a linear map of the input too: its rows join the fused projection,
            # so rotary embedding costs two multiplications and an addition. Output: [q k | v | q' k']
            rot = [_rotated_rows(a.q_proj, head_dim), _rotated_rows(a.k_proj, head_dim)]
            rot_b = [
                None if m.bias is None else _rotated(m.bias[:, None], head_dim)[:, 0] for m in (a.q_proj, a.k_proj)
            ]
            self.w_qkv = Weight([a.q_proj, a.k_proj, a.v_proj], rot, rot_b, pack=True)
        elif fuse and fusable(a.q_proj, a.k_proj, a.v_proj):
            self.w_qkv = Weight([a.q_proj, a.k_proj, a.v_proj], pack=True)
        else:
            self.w_qkv = None
            self.q, self.k, self.v = a.q_proj, a.k_proj, a.v_proj
        self.kv = kv_heads * head_dim
        self.w_gu = None
        if fuse and fusable(mlp.gate_proj, mlp.up_proj):
            self.w_gu = Weight([mlp.gate_proj, mlp.up_proj], pack=True)
            self.inter = mlp.gate_proj.out_features
        else:
            self.gate, self.up = mlp.gate_proj, mlp.up_proj
        # SwiGLU with both weights fused: the activation goes with the down projection (`Weight.swiglu_add`)
        self.swiglu = silu and self.w_gu is not None and self.w_down is not None


class Decoder:
    """`forward(embeds [B, T, D], positions [B, T], mask [B, 1, T, L] or None, cache, cross_context,
    rows)` → last hidden states [B, T, D]; with `rows` [B] only those positions' ([B, 1, D]). No
    mask: every key is visible to a decode step (T 1); to T > 1 new tokens without a cached prefix,
    the causal ones (the lean forward only)."""

    def __init__(self, model, max_len: int, fast: bool | None = None, compile: bool = False, projections: str = "auto"):
        lm = model.causal_lm
        self.compiled, self.why_not_compiled = None, "not asked for"
        self._last = None  # (the hidden states, their logits) of the last step through the stack with the head
        self.attention = None  # in words, what the last decode step attended with (the lean forward's)
        self.prefilled = None  # in words, what ran the last prefill (the lean forward's)
        self.hf = lm.get_decoder()
        self.bridge = model.connector if model.cross_attention else None
        reason = fast_path_reason(lm.config, max_len)
        self.fast = reason is None if fast is None else fast
        self.why_slow = reason
        head = lm.get_output_embeddings()
        embed = lm.get_input_embeddings()
        # the table a decode step through the stack embeds its tokens from, in the same call
        plain_embed = type(embed) is nn.Embedding and embed.max_norm is None and embed.weight.dtype == torch.float32
        self.embed = embed.weight.detach() if plain_embed and embed.weight.is_contiguous() else None
        # the LM head as [D, V], contiguous (a copy; see `Weight` for why) on CPUs
        cpu = self.fast and head.weight.device.type == "cpu"
        self.head_w = Weight([head], copy=cpu, pack=cpu) if fusable(head) else head
        if not self.fast:
            if compile:
                self.why_not_compiled = f"the lean forward does not run it ({reason})"
            return
        cfg = lm.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        param = next(lm.parameters())
        with torch.no_grad():  # the model's own rotary module, evaluated once for every position
            pos = torch.arange(max_len, device=param.device)[None]
            cos, sin = self.hf.rotary_emb(param.new_zeros(1, dtype=param.dtype), position_ids=pos)
        self.cos, self.sin = cos[0], sin[0]  # [L, head_dim]
        xattn = dict(zip(self.bridge.at, self.bridge.layers)) if self.bridge is not None else {}
        # On a CPU every operation costs its dispatch: there, q/k/v and gate/up are fused into one
        # weight each (a copy, made now: the engine serves the weights it was built with) and the
        # rotation is folded into the projection. Not on accelerators, whose memory is dearer.
        fuse = param.device.type == "cpu"
        self.layers = [
            _Layer(layer, self.heads, self.kv_heads, self.head_dim, xattn.get(i), fuse)
            for i, layer in enumerate(self.hf.layers[: cfg.num_hidden_layers])
        ]
        self.norm, self.traced_norm = _rms(self.hf.norm), _rms(self.hf.norm, False)
        self._stacks: dict[object, tuple[kernels.Stack | None, str | None]] = {}  # by rows or a prefill's layout
        tiled = [w for L in self.layers for w in (L.w_qkv, L.w_o, L.w_gu, L.w_down) if _tiled(w)]
        tiled += [self.head_w] if _tiled(self.head_w) else []
        self._tiled = tiled
        self.one_row, self.one_row_tiles = None, False  # how one row reads the tiled weights, and why (measured now)
        self.many_rows = None  # up to how many rows the tiles are read, and why (measured now)
        self.prefetch = None  # whether the tiles' blocks of several rows prefetch in software, and why
        if tiled:
            self.prefetch = _pick_prefetch(tiled)  # first: it changes the tiles' rates at every row count past one
            most, figures = _tile_rows(tiled)
            for w in tiled:
                w.tile_rows = most
            self.many_rows = f"row tiles up to {most} rows, torch's matmul past that ({figures}; measured now)"
        if compile:
            self.why_not_compiled = eligible(self.layers, param.dtype, param.device)
            if self.why_not_compiled is None and not isinstance(self.head_w, Weight):
                self.why_not_compiled = "the LM head is not a plain linear layer"
            if self.why_not_compiled is None:
                self.compiled = CompiledStep(self, head, projections)
        if tiled:
            self._pick_one_row(tiled)

    def _pick_one_row(self, tiled: list[Weight]) -> None:
        """How one row reads the tiled weights (`one_row`, in words, `one_row_tiles`), measured now.
        Where the stack takes a one-sequence step (`stack`), it does, reading the tiles or the plain
        copies, whichever made its step faster (`_one_row_step`): on an Intel AVX-512 machine the stack
        on the tiles took SmolLM2's step at 1.34x the operations' rate, though torch's matmul alone
        read the plain copies at 1.05x the tiles' rate (the operations' ~300 calls a step cost more,
        docs/engine.md). Elsewhere (a compiled one-row step, cross-attention) the operations read the
        tiles or torch's matmul the plain copies, whichever reads faster (`_one_row_tiles`)."""
        if self.compiled is None:
            built = {tiles: self._build_stack(1, tiles) for tiles in (True, False)}
            ran = {tiles: stack for tiles, (stack, _) in built.items() if stack is not None}
            if ran:
                seconds = dict(zip(ran, _one_row_step(self, list(ran.values()))))
                win = min(seconds, key=seconds.get)
                self._stacks[True] = built[win]
                on = {True: "tiles", False: "plain copies"}
                said = ", ".join(f"{seconds[t] * 1e3:.2f} ms on the {on[t]}" for t in seconds)
                layout = "row tiles" if win else "its kernel on the plain copies"
                self._pick(tiled, win, f"the stack, reading {layout} (a step {said}; measured now)")
                return
        win, why = _one_row_tiles(tiled)
        self._pick(tiled, win, f"{'row tiles' if win else 'torch matmul on the plain copies'} ({why}; measured now)")

    def _pick(self, tiled: list[Weight], tiles: bool, said: str) -> None:
        for w in tiled:
            w.one_row_tiles = tiles
        self.one_row_tiles, self.one_row = tiles, said

    def stack(self, rows: int) -> tuple[kernels.Stack | None, str | None]:
        """(the layer stack as one call of the engine's kernels for a decode step of `rows` (1 to
        `kernels.MAX_ROWS`) sequences, None), or (None, why not). `kernels.Stack` reads each weight
        as the weight itself would at that many rows: its tiles, or its plain copy; at one row, the
        layout that made the stack's step faster (`one_row`)."""
        if not 1 <= rows <= kernels.MAX_ROWS:
            return None, f"{rows} rows (the stack takes 1 to {kernels.MAX_ROWS})"
        one = rows == 1
        if one not in self._stacks:
            self._stacks[one] = self._build_stack(rows)
        return self._stacks[one]

    def _build_stack(self, rows: int, tiles: bool | None = None) -> tuple[kernels.Stack | None, str | None]:
        """The stack for `rows` rows, reading each weight's tiles where `tiles` (None: where the
        weight itself would at that many rows), else its plain copy; or (None, why not)."""
        why = kernels.attendable(self.cos.dtype, self.cos.device, self.head_dim)  # the LM's dtype and device
        if why is not None:
            return None, why
        layers, eps, scale = [], set(), set()
        for i, L in enumerate(self.layers):
            ws = (L.w_qkv, L.w_o, L.w_gu, L.w_down)
            if L.xattn is not None:
                return None, f"layer {i} has cross-attention"
            if L.q_norm is not None:
                return None, f"layer {i} norms q and k per head"
            if not L.swiglu or any(not isinstance(w, Weight) or w.int8 for w in ws):
                return None, f"layer {i} is not float32 linear layers with a SwiGLU MLP (LoRA, int8 or another MLP)"
            if None in L.norms:
                return None, f"layer {i}'s norms are not float32 RMS norms"
            picked = []
            for w in ws:
                if w.tiles is not None and (w.reads_packed(rows, w.main) if tiles is None else tiles):
                    picked.append((w.tiles, None))
                elif w.w is not None:
                    picked.append((w.w, w.b))
                else:
                    return None, f"layer {i} keeps a weight in oneDNN's packed layout alone"
            (n1, e1), (n2, e2) = L.norms
            layers.append((n1, picked[0], picked[1], n2, picked[2], picked[3]))
            eps |= {e1, e2}
            scale.add(L.scale)
        if len(eps) > 1 or len(scale) > 1:
            return None, "the layers' norms or attention scales differ"
        final, vocab, norm, hw = None, 0, _own_rms(self.hf.norm), self.head_w
        if norm is not None and norm[1] in eps and isinstance(hw, Weight) and not hw.int8:  # the head goes too
            if hw.tiles is not None and (hw.reads_packed(rows, hw.main) if tiles is None else tiles):
                final, vocab = (norm[0], (hw.tiles, None)), hw.main
            elif hw.w is not None:
                final, vocab = (norm[0], (hw.w, hw.b)), hw.main
        try:
            inter, e, sc = self.layers[0].inter, eps.pop(), scale.pop()
            stack = kernels.Stack(layers, self.heads, self.kv_heads, self.head_dim, inter, e, sc, final, vocab)
        except ValueError as e:
            return None, str(e)
        return stack, None

    def prefill(self, embeds: torch.Tensor, cache, rows: torch.Tensor) -> torch.Tensor | None:
        """A prefill (the cache set for it: `SlotCache.prefill`) of up to `PREFILL_ROWS` new tokens
        in all through the stack in one call (`kernels.Stack.prefill`): each prompt's real tokens
        alone, no padding, each seeing its slot's keys up to its own position (a cached prefix's too),
        the last layer and the head for the `rows` [N] wanted (each prompt's last) alone → their hidden
        states [N, 1, D] after the final norm (their logits kept for `logits`); None where the stack
        does not take it (then `forward` runs it operation by operation)."""
        mode = cache.prefilling() if hasattr(cache, "prefilling") else None
        if mode is None or embeds.dtype != torch.float32:
            self.prefilled = "operation by operation (not a float32 prefill into the slot cache)"
            return None
        slot, starts, lengths = mode
        total = sum(lengths)
        wanted = rows.tolist()
        if total > PREFILL_ROWS:
            self.prefilled = f"operation by operation ({total} rows: the stack takes up to {PREFILL_ROWS})"
            return None
        if len(lengths) != embeds.shape[0] or any(not 0 <= r < n for r, n in zip(wanted, lengths)):
            self.prefilled = "operation by operation (rows wanted past a prompt's tokens)"
            return None
        key = ("prefill", total == 1, total <= max((w.tile_rows for w in self._tiled), default=0))
        if key not in self._stacks:
            self._stacks[key] = self._build_stack(total)
        stack, why = self._stacks[key]
        if stack is None:
            self.prefilled = f"operation by operation ({why})"
            return None
        self.prefilled = PREFILL_STACK
        h = embeds[0, :total] if len(lengths) == 1 else torch.cat([e[:n] for e, n in zip(embeds, lengths)])
        slots = [slot + i for i, n in enumerate(lengths) for _ in range(n)]
        counts = [start + j + 1 for start, n in zip(starts, lengths) for j in range(n)]
        offsets = [0, *itertools.accumulate(lengths)]
        keep = [o + r for o, r in zip(offsets, wanted)]
        h, logits = stack.prefill(h, slots, counts, keep, cache.k_all, cache.v_all, self.cos, self.sin)
        if logits is None:
            return self.norm(h).view(len(keep), 1, -1)
        self._last = (h, logits)  # for `logits`
        return h.view(len(keep), 1, -1)

    def decode(self, tokens: list[int], lengths: list[int], cache) -> tuple[torch.Tensor, list[int]] | None:
        """A decode step of `len(tokens)` sequences, each sequence's new token at position
        `lengths[i]` of its slot in `cache` (a `SlotCache` grown to hold it), run whole by the
        stack (the embedding, the layers, the final norm and the head in one call) → (the logits
        [B, vocab], each row's argmax); None where the stack does not take it (then `forward` runs
        the step)."""
        b = len(tokens)
        if not self.fast or self.embed is None or (self.compiled is not None and b == 1):
            return None
        stack = self.stack(b)[0]
        if stack is None or stack.final is None:
            return None
        counts = [n + 1 for n in lengths]
        stepped = stack.from_tokens(self.embed, tokens, counts, cache.k_all, cache.v_all, self.cos, self.sin)
        self.attention = OWN_ATTENTION
        return stepped

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The logits of the hidden states [N, D] the last decode step returned, where that step
        computed them (the compiled step, or the stack with the head); None otherwise."""
        if self.compiled is not None and (logits := self.compiled.logits(hidden)) is not None:
            return logits
        last = self._last
        if last is None or hidden.data_ptr() != last[0].data_ptr() or hidden.shape[0] != last[1].shape[0]:
            return None
        return last[1]

    def kernels(self, rows: int) -> str:
        """In words, what multiplies `rows` rows by the LM's weights: each kernel, with the kinds of
        weight (q/k/v, o, gate/up, down, head) that take it in any layer."""
        names = {"w_qkv": "q/k/v", "w_o": "o", "w_gu": "gate/up", "w_down": "down"}
        found: dict[str, list[str]] = {}
        stack = self.stack(rows)[0] if self.fast else None
        stacked = stack is not None
        for L in self.layers:
            for attr, name in names.items():
                w = getattr(L, attr, None)
                kernel = w.kernel(rows, stacked) if isinstance(w, Weight) else None
                if kernel and name not in found.get(kernel, []):
                    found.setdefault(kernel, []).append(name)
        if isinstance(self.head_w, Weight):
            found.setdefault(self.head_w.kernel(rows, stacked and stack.final is not None), []).append("head")
        said = "; ".join(f"{', '.join(names)}: {kernel}" for kernel, names in found.items()) or "the modules' own"
        return ("the layers in one call (`kernels.Stack`); " if stacked else "") + said

    def _hf(self, embeds, positions, mask, cache, cross_context) -> torch.Tensor:
        """The Hugging Face decoder's forward on the same cache and mask."""
        if isinstance(positions, int):
            positions = torch.full((embeds.shape[0], 1), positions, device=embeds.device)
        attending = self.bridge.attending(cross_context) if self.bridge is not None else contextlib.nullcontext()
        with attending:
            return self.hf(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state

    def _attention(self, L, i, x, h, fold, cos, sin, mask, cache, rows, own, visible):
        """Layer `i`'s attention output [B, T, heads x head_dim] for its normed input x [B, T, D] by torch's
        operations (the cache written through its `update`), and the residual `h` of the rows kept
        (`rows`: the last layer of a prefill keeps each prompt's last position alone)."""
        b, t, _ = x.shape
        hd, nh = self.head_dim, self.heads
        half = hd // 2
        if L.w_qkv is not None:
            if fold:  # the rotated rows too: rope(x) = x cos + rotate_half(x) sin in three operations
                y = L.w_qkv(x)
                qk = y[..., : L.qk].view(b, t, -1, hd) * cos + y[..., L.qk + L.kv :].view(b, t, -1, hd) * sin
            else:  # many rows: the matmul dominates, so only [q k v] (the first columns)
                y = L.w_qkv(x, L.qk + L.kv)
                qk = y[..., : L.qk].view(b, t, -1, hd)
            vs = y[..., L.qk : L.qk + L.kv]
        else:
            qk = torch.cat((L.q(x), L.k(x)), dim=-1).view(b, t, -1, hd)
            vs = L.v(x)
        if not fold:
            if L.q_norm is not None:
                qk = torch.cat((L.q_norm(qk[:, :, :nh]), L.k_norm(qk[:, :, nh:])), dim=2)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
        qs = qk[:, :, :nh]
        ks, vs = cache.update(qk[:, :, nh:].transpose(1, 2), vs.view(b, t, -1, hd).transpose(1, 2), i)
        if rows is not None and i == len(self.layers) - 1:  # past the keys and values: the wanted rows alone
            pick = torch.arange(b, device=x.device)
            qs, h, t = qs[pick, rows][:, None], h[pick, rows][:, None], 1
            mask = None if mask is None else mask[pick, :, rows][:, :, None]
        if t == 1:  # one query a row: the heads that share a key head are that head's query rows
            q1 = qs.reshape(b, self.kv_heads, nh // self.kv_heads, hd)
            if own is None:
                att = kernels.attend(q1, ks, vs, visible, L.scale)
            else:
                att = F.scaled_dot_product_attention(q1, ks, vs, attn_mask=mask, scale=L.scale)
        else:
            gqa = self.kv_heads != nh
            att = F.scaled_dot_product_attention(
                qs.transpose(1, 2), ks, vs, attn_mask=mask, scale=L.scale, enable_gqa=gqa, is_causal=mask is None
            ).transpose(1, 2)
        return att.reshape(b, t, -1), h

    def forward(self, embeds, positions, mask, cache, cross_context=None, rows=None) -> torch.Tensor:
        """`positions`: [B, T] tensor, or an int when T is 1 and every row is at that position.
        `rows`: the one position of each row whose hidden state is wanted (a prefill's last): the
        last layer then runs past its keys and values for those positions alone, as llama.cpp's
        graph does."""
        if not self.fast:
            out = self._hf(embeds, positions, mask, cache, cross_context)
            return out if rows is None else out[torch.arange(out.shape[0], device=out.device), rows][:, None]
        b, t, _ = embeds.shape
        if self.compiled is not None and b == t == 1 and isinstance(positions, int) and mask is None:
            return self.compiled(embeds, positions, cache)
        if rows is not None and (stacked := self.prefill(embeds, cache, rows)) is not None:
            return stacked
        hd, nh = self.head_dim, self.heads
        # a decode step: the keys each row sees, as the cache says; the engine's kernels take the step
        # (rotation, cache writes, attention) where `own` is None, and `own` says why not otherwise
        counts = cache.visible(b) if t == 1 and rows is None and hasattr(cache, "visible") else None
        own = "a prefill" if counts is None else kernels.attendable(embeds.dtype, embeds.device, hd)
        visible = None if own is not None else kernels.Visible(counts)
        if own is None:
            stack = self.stack(b)[0]
            if stack is not None:  # the whole stack in one call, the final norm and the head with it
                h, logits = stack(embeds.view(b, -1), visible, cache.k_all, cache.v_all, self.cos, self.sin)
                self.attention = OWN_ATTENTION
                if logits is None:
                    return self.norm(h.view(b, 1, -1))
                self._last = (h, logits)  # for `logits`
                return h.view(b, 1, -1)
        if isinstance(positions, int):  # one new token per row, all at this position
            cos = self.cos[positions : positions + 1, None]  # [1, 1, hd]: broadcast over [B, T, H, hd]
            sin = self.sin[positions : positions + 1, None]
        else:
            cos = self.cos[positions][:, :, None]  # [B, T, 1, hd]
            sin = self.sin[positions][:, :, None]
        h = embeds
        for i, L in enumerate(self.layers):
            if L.xattn is not None and cross_context is not None:
                h = L.xattn(h, *cross_context)
            x = L.n1(h)
            fold = L.fold and b * t <= FOLD_ROWS and L.w_qkv.plain_for(b * t)
            if own is None and L.w_qkv is not None and L.q_norm is None and not fold:
                y = L.w_qkv(x, L.qk + L.kv).view(b, -1)
                kb, vb = cache.k[i], cache.v[i]
                q1 = kernels.rope_store(y, nh, self.kv_heads, self.cos, self.sin, visible, kb, vb)
                h = L.o(kernels.attend(q1, kb[:b], vb[:b], visible, L.scale).view(b, 1, -1), h)
            else:
                att, h = self._attention(L, i, x, h, fold, cos, sin, mask, cache, rows, own, visible)
                h = L.o(att, h)
            x = L.n2(h)
            if L.swiglu:
                h = L.w_down.swiglu_add(L.w_gu(x), h)
            elif L.w_gu is not None:
                gu = L.w_gu(x)
                h = L.down(L.act(gu[..., : L.inter]) * gu[..., L.inter :], h)
            else:
                h = L.down(L.act(L.gate(x)) * L.up(x), h)
        if counts is not None:
            self.attention = OWN_ATTENTION if own is None else f"torch's scaled_dot_product_attention ({own})"
        return self.norm(h)
