"""The engine's own CPU kernels (`kernels.c`), compiled for this CPU on first use and kept in a
cache folder, for the operations of a decode step that torch's kernels run well below the machine's
memory rate at a few rows:

* `Tiles`: x @ W^T for a few rows at once (a batched decode step), reading each weight once. torch's
  kernels for so few rows (MKL's `x @ W`, oneDNN's packed layout) read float32 weights at about half
  the rate a plain sum reads memory (12-13 GB/s against 22-24 on the 2-core AVX-512 Xeon), while one
  row reads at the full rate; so 8 rows cost 1.7-1.8x one row where the memory allows ~1x. Here the
  weight is stored in tiles of 32 outputs (16 without AVX-512), each tile one contiguous stream read
  once for 8 rows whose 32 outputs stay in vector registers: SmolLM2's 538 MB at 8 rows in 28 ms
  against oneDNN's 43 and a plain sum's 24 (docs/engine.md).
  `Tiles` also add a residual, and take a SwiGLU MLP's activation with its down projection.
* `attend`: a decode step's attention, one query token per sequence over its cached keys and
  values, the query heads that share a key/value head (grouped-query attention) together, so that
  each cached row is read once for all of them.
* `rope_store`: a decode step's q and k rotated and its k and v written into the cache, one call
  where torch takes about a dozen operations.
* `rms_norm`: one call where torch's CPU `rms_norm` runs six kernels.
* `Stack`: a decode step's whole layer stack (Llama's layer: the norms, q/k/v, `rope_store`,
  `attend`, o, gate/up, SwiGLU and down, each residual added) in one call, the weights read as
  tiles or as their transposed copies: no Python between the ~8 operations of each layer, whose
  dispatch cost as much as their work at a few rows. A prefill's rows too (`Stack.prefill`: a
  prompt's tokens share its slot, each attending up to its own position).
* `Encoder`: a small vision tower's whole encoder (SigLIP's layer: layer norms, q/k/v, attention
  over an image's patches, o, a GELU MLP) in one call, for the same reason: a tower of a few
  hundred kilobytes over a few dozen patches costs more in dispatch than in arithmetic.

Where the kernels cannot be built (no C compiler, another architecture, `VLMFORGE_KERNELS=0`),
`library()` is None and `why_unavailable()` says why; callers keep torch's kernels then.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = [
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-ffp-contract=fast",
    "-fopenmp",
    "-shared",
    "-fPIC",
    "-std=c11",
]
# Up to this many rows the tiles are read; above, torch's matmul, whose blocking wins as the rows
# make it compute-bound (SmolLM2's weights: 16 rows 68 ms as tiles against 80 by `x @ W`, 24 rows 68
# against 71, 32 rows 85 against 81, 236 rows 489 against 437; docs/engine.md).
MAX_ROWS = 16


def cache_dir() -> Path:
    """Where compiled kernels are kept: `$VLMFORGE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/vlmforge/kernels`
    (default `~/.cache/vlmforge/kernels`)."""
    if os.environ.get("VLMFORGE_KERNEL_CACHE"):
        return Path(os.environ["VLMFORGE_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vlmforge" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


class _Unavailable(Exception):
    pass


def _build() -> ctypes.CDLL:
    if os.environ.get("VLMFORGE_KERNELS", "1") == "0":
        raise _Unavailable("turned off by VLMFORGE_KERNELS=0")
    if platform.machine() not in ("x86_64", "AMD64"):
        raise _Unavailable(f"written for x86-64 vector units, not {platform.machine()}")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise _Unavailable("no C compiler (cc or gcc) on PATH")
    source = SOURCE.read_bytes()
    # the library is built for this CPU (-march=native): the key names the source, flags, compiler and CPU
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), cc.encode(), _cpu_flags().encode()]))
    target = cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
            if done.returncode != 0:
                raise _Unavailable(f"{cc} could not build {SOURCE.name}: {done.stderr.strip()[-300:]}")
            os.replace(out, target)  # atomic: a concurrent process sees the whole library or none
    # loaded after torch, whose libgomp (same soname) the library's OpenMP calls then share
    lib = ctypes.CDLL(str(target))
    p, n = ctypes.c_void_p, ctypes.c_long
    lib.rowmm.argtypes = [p, n, n, p, p, p, n, p, ctypes.c_int]
    lib.rowmm.restype = None
    lib.rowmm_swiglu.argtypes = [p, n, n, p, p, p, p, n, p, ctypes.c_int]
    lib.rowmm_swiglu.restype = None
    lib.rowmm_tile_width.restype = ctypes.c_int
    lib.set_prefetch.argtypes = [n]
    lib.set_prefetch.restype = None
    lib.rms_norm.argtypes = [p, n, n, p, ctypes.c_float, p]
    lib.rms_norm.restype = None
    lib.attend.argtypes = [p, n, n, n, n, p, p, n, n, p, ctypes.c_float, p, p, n, ctypes.c_int]
    lib.attend.restype = None
    lib.rope_store.argtypes = [p, n, n, n, n, p, p, p, p, p, n, n, p]
    lib.rope_store.restype = None
    lib.decode_scratch.argtypes = [n] * 8
    lib.decode_scratch.restype = n
    lib.decode_layers.argtypes = [p, n, n, n, p, p, n, n, n, n, p, p, p, n, p, p, n, n, n, ctypes.c_float]
    lib.decode_layers.argtypes += [ctypes.c_float, p, ctypes.c_int, p, p, n, p, n, p, p, p, p, p, p, p, n]
    lib.decode_layers.restype = None
    lib.encode_scratch.argtypes = [n] * 7
    lib.encode_scratch.restype = n
    lib.encode_layers.argtypes = [p, n, n, n, p, p, p, p, n, n, p, n, n, n, ctypes.c_float, ctypes.c_float]
    lib.encode_layers.argtypes += [ctypes.c_int, p, p, p, p, ctypes.c_int]
    lib.encode_layers.restype = None
    return lib


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    try:
        return _build(), None
    except _Unavailable as e:
        return None, str(e)
    except OSError as e:  # a library that does not load
        return None, f"the compiled kernels did not load: {e}"


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call (about two seconds), or None (`why_unavailable`)."""
    return _load()[0]


def why_unavailable() -> str | None:
    return _load()[1]


# How far ahead the tiles' blocks of 2 rows or more prefetch their stream in software where that
# is on (`set_prefetch`): the distance that read SmolLM2's weights fastest at 8 rows on the Intel
# machine of 2026-12-08 (1, 2, 4, 8 and 16 KB tried: 4-16 KB alike, docs/engine.md)
PREFETCH_BYTES = 4096
_PREFETCH = [0]  # bytes ahead, as last set in the library (the process's one setting)


def set_prefetch(nbytes: int) -> None:
    """Whether (and how many bytes ahead) the tiles' blocks of 2 rows or more prefetch their weights
    in software, for every `Tiles` and `Stack` of this process (0: the hardware's prefetch alone,
    the default). The results are the same either way; which is faster depends on the machine
    (`decoder` measures it)."""
    if nbytes < 0 or nbytes % 4:
        raise ValueError(f"set_prefetch: bytes ahead must be a non-negative multiple of 4, got {nbytes}")
    _lib().set_prefetch(nbytes // 4)
    _PREFETCH[0] = nbytes


def prefetch() -> int:
    """Bytes ahead the tiles' blocks of several rows prefetch (0: none): `set_prefetch`'s setting."""
    return _PREFETCH[0]


def _threads() -> int:
    return torch.get_num_threads()  # as torch's own kernels would run here (`runtime.threads`)


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"the engine's CPU kernels are unavailable: {why_unavailable()}")
    return lib


def _float_cpu(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError(f"{name} must be float32 on the CPU, not {t.dtype} on {t.device}")


HUGE_PAGE = 2 << 20  # bytes of a transparent huge page on x86-64


def huge_pages(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised CPU tensor of `shape` and `dtype` in memory the kernel is asked to back with
    transparent huge pages (`madvise(MADV_HUGEPAGE)` before anything is written to it, from a 2 MB
    boundary), where it is at least one such page and the platform has them; else `torch.empty`. A
    decode step streams its weights once: with 4 KB pages every 4 KB of them costs a TLB miss, and on
    the AMD machine a sum over 538 MB read 1.04-1.11x faster from huge pages in its slow mode and
    1.43x in its fast one (docs/engine.md). The engine's KV cache takes them too (`attend` reads its
    rows 1.05-1.11x faster). Where the kernel's setting is "never" this is plain memory."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: the memory is plain, and as good
        pass
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive as long as any view
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start : start + nbytes].view(dtype).view(shape)


class Tiles:
    """A float32 weight [out, in] (+ bias [out]) laid out for `rowmm`; `tiles(x)` is x @ W^T + b for
    x [rows, in] (float32, on the CPU). A copy (`huge_pages`): the weight is left as it is."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None = None):
        lib = _lib()
        if w.dtype != torch.float32 or w.device.type != "cpu" or w.dim() != 2:
            raise ValueError(f"Tiles takes a 2-d float32 CPU weight, not {w.dtype} {tuple(w.shape)} on {w.device}")
        self.lib, self.out, self.inp = lib, w.shape[0], w.shape[1]
        width = lib.rowmm_tile_width()
        with torch.no_grad():
            pad = -self.out % width
            w = torch.cat([w, w.new_zeros(pad, self.inp)]) if pad else w
            tiled = w.reshape(-1, width, self.inp).transpose(1, 2)  # [tiles, in, width]
            self.tiles = huge_pages(tuple(tiled.shape)).copy_(tiled)
            self.bias = None if bias is None else bias.detach().float().contiguous()
        self._b = None if self.bias is None else self.bias.data_ptr()

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T + b (+ `residual` [rows, out])."""
        if x.dim() != 2 or x.shape[1] != self.inp or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"expected x [rows, {self.inp}] float32 on the CPU, got {x.dtype} {tuple(x.shape)}")
        x = x.contiguous()
        y = torch.empty(x.shape[0], self.out)
        res = self._residual(residual, x.shape[0])
        self.lib.rowmm(
            x.data_ptr(), x.shape[0], self.inp, self.tiles.data_ptr(), self._b, res, self.out, y.data_ptr(), _threads()
        )
        return y

    def swiglu(self, gu: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """`self(silu(gate) * up)` (+ `residual`) for gu = [gate | up], [rows, 2 x in]: a SwiGLU MLP's
        down projection, its activation in the same call."""
        if gu.dim() != 2 or gu.shape[1] != 2 * self.inp or gu.dtype != torch.float32 or gu.device.type != "cpu":
            raise ValueError(
                f"expected gate|up [rows, {2 * self.inp}] float32 on the CPU, got {gu.dtype} {tuple(gu.shape)}"
            )
        gu = gu.contiguous()
        rows = gu.shape[0]
        scratch, y = torch.empty(rows, self.inp), torch.empty(rows, self.out)
        res = self._residual(residual, rows)
        self.lib.rowmm_swiglu(
            gu.data_ptr(),
            rows,
            self.inp,
            scratch.data_ptr(),
            self.tiles.data_ptr(),
            self._b,
            res,
            self.out,
            y.data_ptr(),
            _threads(),
        )
        return y

    def _residual(self, residual: torch.Tensor | None, rows: int) -> int | None:
        if residual is None:
            return None
        if residual.shape != (rows, self.out) or residual.dtype != torch.float32 or not residual.is_contiguous():
            want = f"a contiguous float32 residual [{rows}, {self.out}]"
            raise ValueError(f"expected {want}, got {residual.dtype} {tuple(residual.shape)}")
        return residual.data_ptr()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`F.rms_norm(x, weight.shape, weight, eps)` over x's last dimension (float32, on the CPU)."""
    lib = _lib()
    for name, t in (("x", x), ("weight", weight)):
        _float_cpu(name, t)
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"rms_norm: x [..., {weight.shape[0]}] for a weight {tuple(weight.shape)}, got x {tuple(x.shape)}"
        )
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty_like(x)
    lib.rms_norm(x.data_ptr(), x.numel() // max(x.shape[-1], 1), x.shape[-1], weight.data_ptr(), eps, y.data_ptr())
    return y


def attendable(dtype: torch.dtype, device: torch.device, head_dim: int) -> str | None:
    """Why `attend` and `rope_store` cannot take queries and keys of this dtype, device and head dim
    (None: they can)."""
    if library() is None:
        return why_unavailable() or "the kernels are unavailable"
    if dtype != torch.float32 or device.type != "cpu":
        return f"{dtype} on {device} (float32 on the CPU only)"
    if head_dim % 16:
        return f"head dim {head_dim}, not a multiple of 16"
    return None


class Visible:
    """How many cached keys each sequence of a decode step sees (`counts`, 1 or more each; its new
    token is the last, at `positions` = counts - 1): checked and laid out once for all the step's
    layers."""

    def __init__(self, counts: torch.Tensor):
        self.counts = counts.to(torch.int64).contiguous()
        self.fewest, self.most = int(self.counts.min()), int(self.counts.max())
        if self.counts.dim() != 1 or self.fewest < 1:
            raise ValueError(f"visible key counts must be one positive count per sequence, got {self.counts.tolist()}")
        self.positions = self.counts - 1


def rope_store(
    y: torch.Tensor,
    heads: int,
    kv_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    visible: Visible,
    keys: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """A decode step's projections y [B, (heads + 2 kv_heads) * D] (q, then k, then v), each row at its
    position (`visible.positions`): q and k rotated (cos, sin: [positions, D] tables, Llama's
    rotate_half), k and v written to the cache `keys`, `values` ([slots, kv_heads, length, D], rows
    contiguous) at each row's slot and position → q [B, kv_heads, heads // kv_heads, D], each key
    head's query heads together (as `attend` takes them)."""
    lib = _lib()
    b, d = y.shape[0], cos.shape[-1]
    for name, t in (("y", y), ("cos", cos), ("sin", sin), ("keys", keys), ("values", values)):
        _float_cpu(name, t)
    if y.dim() != 2 or y.shape[1] != (heads + 2 * kv_heads) * d or heads % kv_heads:
        raise ValueError(f"rope_store: y [B, ({heads} + 2 x {kv_heads}) x {d}], got {tuple(y.shape)}")
    if keys.shape[0] < b or keys.shape[1:] != (kv_heads, keys.shape[2], d) or values.shape != keys.shape:
        raise ValueError(f"rope_store: a cache [>= {b}, {kv_heads}, L, {d}], got {tuple(keys.shape)}")
    if keys.stride() != values.stride() or keys.stride(3) != 1 or keys.stride(2) != d:
        raise ValueError(f"rope_store: the cache needs contiguous rows and equal strides, got {keys.stride()}")
    if visible.counts.shape != (b,) or visible.most > min(keys.shape[2], cos.shape[0]):
        raise ValueError(f"rope_store: {b} positions below {keys.shape[2]}, got {visible.positions.tolist()}")
    y, cos, sin = y.contiguous(), cos.contiguous(), sin.contiguous()
    q = torch.empty(b, kv_heads, heads // kv_heads, d)
    lib.rope_store(
        y.data_ptr(),
        b,
        kv_heads,
        heads // kv_heads,
        d,
        cos.data_ptr(),
        sin.data_ptr(),
        visible.positions.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        keys.stride(0),
        keys.stride(1),
        q.data_ptr(),
    )
    return q


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: Visible, scale: float) -> torch.Tensor:
    """Attention of one new token per sequence: q [B, H, G, D] (the G query heads that share key/value
    head h are q[:, h]), keys and values [B, H, L, D] whose rows are contiguous (a view into a cache
    is fine), of which the first `visible.counts[b]` are seen by sequence b → [B, H, G, D]; as
    `scaled_dot_product_attention` with `scale` and a mask that hides the rest."""
    lib = _lib()
    for name, t in (("q", q), ("keys", keys), ("values", values)):
        _float_cpu(name, t)
    b, h, g, d = q.shape
    if keys.shape[:2] != (b, h) or keys.shape[3] != d or values.shape != keys.shape:
        raise ValueError(
            f"attend: keys and values [{b}, {h}, L, {d}] for q {tuple(q.shape)}, "
            f"got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    if d % 16:
        raise ValueError(f"attend: the head dim must be a multiple of 16, got {d}")
    if keys.stride() != values.stride() or keys.stride(3) != 1 or keys.stride(2) != d:
        raise ValueError(
            f"attend: keys and values need contiguous rows and equal strides, got {keys.stride()} and {values.stride()}"
        )
    if visible.counts.shape != (b,) or visible.most > keys.shape[2]:
        raise ValueError(f"attend: {b} sequences of at most {keys.shape[2]} keys, got counts {visible.counts.tolist()}")
    q = q.contiguous()
    out = torch.empty_like(q)
    longest = visible.most
    scratch = torch.empty(b * h * g * ((longest + 15) // 16 * 16))  # the scores, 16 keys to a vector
    lib.attend(
        q.data_ptr(),
        b,
        h,
        g,
        d,
        keys.data_ptr(),
        values.data_ptr(),
        keys.stride(0),
        keys.stride(1),
        visible.counts.data_ptr(),
        scale,
        out.data_ptr(),
        scratch.data_ptr(),
        longest,
        _threads(),
    )
    return out


def _vector(whose: str, t: torch.Tensor, size: int, exact: bool, owner: str = "Stack") -> None:
    """`t` must be a contiguous float32 CPU vector of `size` values (or more, unless `exact`)."""
    _float_cpu(f"{owner}: {whose}", t)
    if t.dim() != 1 or not t.is_contiguous() or (t.shape[0] != size if exact else t.shape[0] < size):
        raise ValueError(f"{owner}: {whose} must be [{'' if exact else '>= '}{size}], got {tuple(t.shape)}")


class Stack:
    """A decode step's whole layer stack in one call (`decode_layers`): Llama's layer, for float32
    weights on the CPU, RMS norms, fused q/k/v and gate/up, a SwiGLU MLP, no q/k norms.

    `layers`: per layer, (norm 1's weight, q/k/v, o, norm 2's weight, gate/up, down), each projection
    a (weight, bias or None) pair: `Tiles` (read as tiles, with their own bias) or a transposed
    weight [in, >= out] (`Weight.w`: its first `out` columns are read). The same kind of projection
    takes the same layout and row length in every layer. `out` of each projection: q/k/v (heads + 2
    kv_heads) x head_dim, o `dim`, gate/up 2 x `inter`, down `dim`. `final`: the final norm's weight
    and the LM head (a projection as above, `vocab` outputs), run after the layers in the same call
    (None: not)."""

    def __init__(
        self,
        layers: list[tuple],
        heads: int,
        kv_heads: int,
        head_dim: int,
        inter: int,
        eps: float,
        scale: float,
        final: tuple | None = None,
        vocab: int = 0,
    ):
        self.lib = _lib()
        dim = layers[0][0].shape[0]
        self.dims = (dim, heads, kv_heads, head_dim, inter)
        if heads % kv_heads or head_dim % 16:
            raise ValueError(f"Stack: {heads} heads over {kv_heads} key heads of dim {head_dim} (a multiple of 16)")
        qkv = (heads + 2 * kv_heads) * head_dim
        shapes = [(qkv, dim), (dim, heads * head_dim), (2 * inter, dim), (dim, inter)]  # (out, in) of each projection
        rows, lds = [], None
        for i, (n1, wqkv, wo, n2, wgu, wdown) in enumerate(layers):
            ptrs, layer_lds = [], []
            for norm in (n1, n2):
                _vector(f"layer {i}'s norm weights", norm, dim, exact=True)
            for (w, b), (out, inp) in zip((wqkv, wo, wgu, wdown), shapes):
                ld, ptr, bias = self._layout(f"layer {i}'s", w, b, out, inp)
                ptrs += [ptr, bias]
                layer_lds.append(ld)
            if lds is not None and layer_lds != lds:
                raise ValueError(
                    f"Stack: layer {i}'s weights are laid out unlike layer 0's ({layer_lds} against {lds})"
                )
            lds = layer_lds
            qkv_p, qkv_b, o_p, o_b, gu_p, gu_b, down_p, down_b = ptrs
            rows.append([n1.data_ptr(), qkv_p, qkv_b, o_p, o_b, n2.data_ptr(), gu_p, gu_b, down_p, down_b])
        self.layers, self.final, self.vocab = layers, final, vocab  # the weights the table points into, kept alive
        self._final = (0, 0, 0, 0)  # the final norm's, the head's and its bias' addresses, the head's ld
        if final is not None:
            norm, (w, b) = final
            _vector("the final norm's weight", norm, dim, exact=True)
            ld, ptr, bias = self._layout("the head's", w, b, vocab, dim)
            self._final = (norm.data_ptr(), ptr, ld, bias)
        self.table = torch.tensor(rows, dtype=torch.int64)
        self.lds = torch.tensor(lds, dtype=torch.int64)
        self.eps, self.scale = float(eps), float(scale)
        # `from_tokens`' state: the tensors last checked, its residual stream, normed rows and scratch
        self._checked: tuple | None = None
        self._h, self._normed = torch.empty(MAX_ROWS, dim), torch.empty(MAX_ROWS, dim)
        self._scratch = torch.empty(0)

    @staticmethod
    def _layout(whose: str, w, b: torch.Tensor | None, out: int, inp: int) -> tuple[int, int, int]:
        """(ld, address, the bias' address or 0) of one projection: ld 0 for tiles (which hold their
        own bias), else the transposed weight's row length."""
        if isinstance(w, Tiles):
            if (w.out, w.inp) != (out, inp):
                raise ValueError(f"Stack: {whose} tiles are [{w.out}, {w.inp}], not [{out}, {inp}]")
            ld, ptr, b = 0, w.tiles.data_ptr(), w.bias
        else:
            _float_cpu(f"{whose} weight", w)
            if w.dim() != 2 or w.shape[0] != inp or w.shape[1] < out or w.stride(1) != 1:
                raise ValueError(
                    f"Stack: {whose} transposed weight must be [{inp}, >= {out}] with rows contiguous, "
                    f"got {tuple(w.shape)} strides {w.stride()}"
                )
            ld, ptr = w.stride(0), w.data_ptr()
        if b is not None:
            _vector(f"{whose} bias", b, out, exact=False)
        return ld, ptr, 0 if b is None else b.data_ptr()

    def __call__(
        self,
        h: torch.Tensor,
        visible: Visible,
        keys: torch.Tensor,
        values: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layers on the residual stream h [B, dim] (one new token per sequence, at
        `visible.positions`) → (h after them, a new tensor, through the final norm where the stack
        has it; the logits [B, vocab], or None without a head); keys, values: the cache [slots,
        layers, kv_heads, length, head_dim], rows contiguous, written at each sequence's position."""
        dim = self.dims[0]
        b = h.shape[0]
        _float_cpu("h", h)
        if h.dim() != 2 or h.shape[1] != dim:
            raise ValueError(f"Stack: h [B, {dim}], got {tuple(h.shape)}")
        self._check(keys, values, cos, sin)
        if visible.counts.shape != (b,) or visible.most > min(keys.shape[3], cos.shape[0]):
            raise ValueError(f"Stack: {b} sequences of at most {keys.shape[3]} keys, got {visible.counts.tolist()}")
        h = h.contiguous().clone()
        threads = _threads()
        scratch = torch.empty(self._scratch_size(b, visible.most, threads))
        normed, logits = (torch.empty(b, dim), torch.empty(b, self.vocab)) if self._final[0] else (None, None)
        args = (h, b, visible.counts.data_ptr(), visible.most, keys, values, cos, sin, scratch, normed, logits)
        self._run(*args, threads=threads)
        return (h, None) if normed is None else (normed, logits)

    def from_tokens(
        self,
        embed: torch.Tensor,
        ids: list[int],
        counts: list[int],
        keys: torch.Tensor,
        values: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, list[int]]:
        """A decode step from each sequence's new token: `ids` (rows of the embedding table `embed`
        [tokens, dim]), embedded in the same call, through the layers, the final norm and the head
        → (the logits [B, vocab], a new tensor; each row's argmax, as torch's). `counts`: the keys
        each sequence sees, its new token's the last (at position counts[i] - 1); keys, values,
        cos, sin as `__call__` takes them. The engine's step: tensors are checked when they change
        (the cache grows), and the scratch is kept, so that besides the C call a step costs a few
        list operations; one call at a time (the engine's loop), as the scratch is shared."""
        if not self._final[0]:
            raise ValueError("Stack.from_tokens: the stack has no final norm and head")
        b = len(ids)
        if not 1 <= b <= MAX_ROWS or len(counts) != b:
            raise ValueError(f"Stack.from_tokens: 1 to {MAX_ROWS} ids with a count each, got {b} and {len(counts)}")
        checked = (embed, keys, values, cos, sin)
        if self._checked is None or any(a is not c for a, c in zip(checked, self._checked)):
            self._check(keys, values, cos, sin)
            _float_cpu("the embedding table", embed)
            if embed.dim() != 2 or embed.shape[1] != self.dims[0] or not embed.is_contiguous():
                raise ValueError(
                    f"Stack: a contiguous embedding table [tokens, {self.dims[0]}], got {tuple(embed.shape)}"
                )
            self._checked = checked
        most = max(counts)
        if min(counts) < 1 or most > min(keys.shape[3], cos.shape[0]):
            raise ValueError(f"Stack: {b} sequences of 1 to {keys.shape[3]} keys, got {counts}")
        if min(ids) < 0 or max(ids) >= embed.shape[0]:
            raise ValueError(f"Stack: token ids must be in [0, {embed.shape[0]}), got {ids}")
        threads = _threads()
        need = self._scratch_size(b, most, threads)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(2 * need)
        logits = torch.empty(b, self.vocab)
        longs = ctypes.c_long * b  # the lists as C arrays, alive through the call
        best = longs()
        args = (self._h, b, longs(*counts), most, keys, values, cos, sin, self._scratch, self._normed, logits)
        self._run(*args, threads=threads, ids=longs(*ids), embed=embed, best=best)
        return logits, best[:]

    def prefill(
        self,
        h: torch.Tensor,
        slots: list[int],
        counts: list[int],
        keep: list[int],
        keys: torch.Tensor,
        values: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A prefill's rows through the layers: h [R, dim], row i a prompt's token at position
        counts[i] - 1 of the cache's slot slots[i] (rows may share a slot: a prompt's tokens, each
        seeing the keys up to its own, those of its slot's earlier positions too: a cached prefix), its
        key and value written there; the last layer goes on past its keys and values with the rows
        `keep` alone (ascending; each prompt's last) → (their hidden states [len(keep), dim], a new
        tensor, through the final norm where the stack has it; their logits, or None without a head)."""
        dim = self.dims[0]
        r = h.shape[0]
        _float_cpu("h", h)
        if h.dim() != 2 or h.shape[1] != dim or not 1 <= r == len(slots) == len(counts):
            raise ValueError(f"Stack.prefill: h [R, {dim}] with a slot and a count per row, got {tuple(h.shape)}")
        self._check(keys, values, cos, sin)
        most = max(counts)
        if (
            min(counts) < 1
            or most > min(keys.shape[3], cos.shape[0])
            or not 0 <= min(slots) <= max(slots) < keys.shape[0]
        ):
            raise ValueError(f"Stack.prefill: rows in slots below {keys.shape[0]} seeing 1 to {keys.shape[3]} keys")
        if not keep or any(a >= b for a, b in zip(keep, keep[1:])) or keep[0] < 0 or keep[-1] >= r:
            raise ValueError(f"Stack.prefill: the rows kept must ascend within [0, {r}), got {keep}")
        h = h.contiguous().clone()
        threads = _threads()
        scratch = torch.empty(self._scratch_size(r, most, threads))
        k = len(keep)
        normed, logits = (torch.empty(k, dim), torch.empty(k, self.vocab)) if self._final[0] else (None, None)
        longs = ctypes.c_long
        args = (h, r, (longs * r)(*counts), most, keys, values, cos, sin, scratch, normed, logits)
        self._run(*args, threads=threads, slots=(longs * r)(*slots), keep=(longs * k)(*keep))
        return (h[:k], None) if normed is None else (normed, logits)

    def _check(self, keys: torch.Tensor, values: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        _, heads, kv_heads, d, _ = self.dims
        for name, t in (("keys", keys), ("values", values), ("cos", cos), ("sin", sin)):
            _float_cpu(name, t)
        layers = self.table.shape[0]
        if keys.dim() != 5 or keys.shape[1:] != (layers, kv_heads, keys.shape[3], d):
            raise ValueError(f"Stack: a cache [slots, {layers}, {kv_heads}, L, {d}], got {tuple(keys.shape)}")
        if values.shape != keys.shape or keys.stride() != values.stride() or keys.stride()[3:] != (d, 1):
            raise ValueError(f"Stack: keys and values alike with contiguous rows, got strides {keys.stride()}")
        if (
            cos.shape != sin.shape
            or cos.dim() != 2
            or cos.shape[1] != d
            or not (cos.is_contiguous() and sin.is_contiguous())
        ):
            raise ValueError(f"Stack: contiguous cos and sin tables [positions, {d}], got {tuple(cos.shape)}")

    def _scratch_size(self, b: int, most: int, threads: int) -> int:
        """Floats of scratch for b sequences of at most `most` keys on `threads` threads (each has
        rows of its own)."""
        dim, heads, kv_heads, d, inter = self.dims
        return self.lib.decode_scratch(b, dim, heads, kv_heads, d, inter, most, threads)

    def _run(
        self,
        h,
        b,
        counts,
        most,
        keys,
        values,
        cos,
        sin,
        scratch,
        normed,
        logits,
        threads,
        ids=None,
        embed=None,
        best=None,
        slots=None,
        keep=None,
    ):
        """decode_layers; `scratch` sized for `threads` (`_scratch_size`)."""
        if slots is None and keys.shape[0] < b:
            raise ValueError(f"Stack: a cache of {keys.shape[0]} slots for {b} sequences")
        dim, heads, kv_heads, d, inter = self.dims
        norm, head, head_ld, head_b = self._final
        self.lib.decode_layers(
            h.data_ptr(),
            b,
            dim,
            self.table.shape[0],
            self.table.data_ptr(),
            self.lds.data_ptr(),
            heads,
            kv_heads,
            d,
            inter,
            cos.data_ptr(),
            sin.data_ptr(),
            counts,
            most,
            keys.data_ptr(),
            values.data_ptr(),
            keys.stride(1),
            keys.stride(0),
            keys.stride(2),
            self.eps,
            self.scale,
            scratch.data_ptr(),
            threads,
            norm,
            head,
            head_ld,
            head_b,
            self.vocab,
            0 if normed is None else normed.data_ptr(),
            0 if logits is None else logits.data_ptr(),
            best,
            ids,
            0 if embed is None else embed.data_ptr(),
            slots,
            keep,
            0 if keep is None else len(keep),
        )


class Encoder:
    """A small vision tower's whole encoder in one call (`encode_layers`): SigLIP's layer, float32 on
    the CPU, every projection as `Tiles` (with its bias), layer norms with weights and biases, a
    GELU MLP, attention of every patch of an image over every patch of it.

    `embed`: the patch embedding as `Tiles` ([dim, channels x patch x patch], the convolution's
    bias its own); `pos` [patches, dim]; `layers`: per layer (norm 1's (weight, bias), q/k/v, o,
    norm 2's (weight, bias), fc1, fc2), the projections `Tiles`: q/k/v 3 x `dim` outputs (the
    heads' queries, then keys, then values), o and fc2 `dim`, fc1 the MLP's width; `gelu`: "tanh"
    or "none" (torch's approximations); `post`: the final norm's (weight, bias), or None. One `eps`
    for every norm."""

    def __init__(
        self,
        embed: Tiles,
        pos: torch.Tensor,
        layers: list[tuple],
        heads: int,
        eps: float,
        scale: float,
        gelu: str,
        post: tuple | None = None,
    ):
        self.lib = _lib()
        dim = pos.shape[-1]
        if dim % heads or (dim // heads) % 16:
            raise ValueError(f"Encoder: {dim} wide over {heads} heads: a head dim that is a multiple of 16")
        if gelu not in ("tanh", "none"):
            raise ValueError(f"Encoder: a GELU approximation 'tanh' or 'none', not {gelu!r}")
        if not isinstance(embed, Tiles) or embed.out != dim:
            raise ValueError(f"Encoder: the patch embedding as tiles of {dim} outputs")
        _float_cpu("Encoder: the position embeddings", pos)
        if pos.dim() != 2 or not pos.is_contiguous():
            raise ValueError(f"Encoder: contiguous position embeddings [patches, {dim}], got {tuple(pos.shape)}")
        inter = layers[0][4].out if layers else 0
        shapes = [(3 * dim, dim), (dim, dim), (inter, dim), (dim, inter)]  # (out, in) of q/k/v, o, fc1, fc2
        rows = []
        for i, (n1, qkv, o, n2, fc1, fc2) in enumerate(layers):
            for name, t in (("norm 1", n1), ("norm 2", n2)):
                for part in t:
                    _vector(f"layer {i}'s {name}", part, dim, exact=True, owner="Encoder")
            for w, (out, inp) in zip((qkv, o, fc1, fc2), shapes):
                if not isinstance(w, Tiles) or (w.out, w.inp) != (out, inp):
                    raise ValueError(f"Encoder: layer {i}'s projections must be tiles of [{out}, {inp}]")
            ptrs = [n1[0], n1[1], qkv.tiles, qkv.bias, o.tiles, o.bias, n2[0], n2[1], fc1.tiles, fc1.bias]
            rows.append([0 if t is None else t.data_ptr() for t in ptrs + [fc2.tiles, fc2.bias]])
        if post is not None:
            for part in post:
                _vector("the final norm", part, dim, exact=True, owner="Encoder")
        # the tensors the table points into, kept alive
        self.embed, self.pos, self.layers, self.post = embed, pos, layers, post
        self.table = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 12)
        self.dims = (dim, heads, inter)
        self.eps, self.scale, self.tanh = float(eps), float(scale), int(gelu == "tanh")

    def __call__(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [N, P, channels x patch x patch] (each patch's pixels in the convolution weight's
        order) → the features [N, P, dim] after the layers (and the final norm, where there is one)."""
        dim, heads, inter = self.dims
        _float_cpu("patches", patches)
        n, p = patches.shape[:2]
        if patches.dim() != 3 or patches.shape[2] != self.embed.inp or p != self.pos.shape[0] or n < 1:
            want = f"[N, {self.pos.shape[0]}, {self.embed.inp}]"
            raise ValueError(f"Encoder: patches {want}, got {tuple(patches.shape)}")
        patches = patches.contiguous()
        threads = _threads()
        d = dim // heads
        scratch = torch.empty(self.lib.encode_scratch(n * p, p, dim, heads, d, inter, threads))
        h = torch.empty(n, p, dim)
        out = torch.empty(n, p, dim) if self.post is not None else h
        post_w, post_b = (0, 0) if self.post is None else (self.post[0].data_ptr(), self.post[1].data_ptr())
        self.lib.encode_layers(
            patches.data_ptr(),
            n,
            p,
            self.embed.inp,
            self.embed.tiles.data_ptr(),
            0 if self.embed.bias is None else self.embed.bias.data_ptr(),
            self.pos.data_ptr(),
            h.data_ptr(),
            dim,
            self.table.shape[0],
            self.table.data_ptr(),
            heads,
            d,
            inter,
            self.eps,
            self.scale,
            self.tanh,
            post_w,
            post_b,
            out.data_ptr(),
            scratch.data_ptr(),
            threads,
        )
        return out
