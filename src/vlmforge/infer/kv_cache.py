"""The engine's memory: per-layer key/value buffers of the running requests, one slot each
(`SlotCache`, handed to the HF decoder as its `past_key_values`), and the bounded LRU its prefix
and image-feature caches live in."""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch

BLOCK = 8  # prefix-cache granularity (tokens); buffers grow by at least this much


class SlotCache:
    """Per-layer key/value buffers `[slots, kv_heads, length, head_dim]`, passed to the HF decoder
    as `past_key_values`. `prefill(slot, start)` or `decode(positions)` says where the next forward
    writes; `update` (called by every attention layer) writes and returns what to attend to.

    Each kind is one tensor, slot-major (`[slots, layers, kv_heads, length, head_dim]`), so that one
    slot's keys of every layer (`slot`) are one contiguous block whose strides do not depend on how
    many slots there are: the compiled step's graph, which reads them, then serves any batch width
    without being compiled again."""

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device, alloc: Callable | None = None
    ):
        """`alloc(shape, dtype)`: an uninitialised CPU tensor for the buffers (the engine's on a CPU:
        `kernels.huge_pages`), zeroed here; default zeros by torch on `device`."""
        self.layers, self.kv_heads, self.head_dim, self.dtype, self.device = layers, kv_heads, head_dim, dtype, device
        self.alloc = alloc
        self.slots, self.length = 0, 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.k_all = self.v_all = None  # [slots, layers, kv_heads, length, head_dim]: k[i] is k_all[:, i]
        self._mode: tuple = ()
        self._flat = None  # (positions, each layer's flat row indices) of the current decode step

    def reserve(self, slots: int, length: int, max_length: int | None = None) -> None:
        """Grow (never shrink) to at least `slots` x `length`, keeping the contents; growth
        doubles, so that a growing batch or context copies the buffers rarely."""
        if slots <= self.slots and length <= self.length:
            return
        new_s = max(slots, 2 * self.slots) if slots > self.slots else self.slots
        new_l = max(length, 2 * self.length, BLOCK) if length > self.length else self.length
        if max_length:
            new_l = max(min(new_l, max_length), length)
        shape = (new_s, self.layers, self.kv_heads, new_l, self.head_dim)
        for name in ("k", "v"):  # one tensor per kind; the per-layer buffers are its views
            if self.alloc:
                fresh = self.alloc(shape, self.dtype).zero_()
            else:
                fresh = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.slots:
                fresh[: self.slots, :, :, : self.length] = getattr(self, f"{name}_all")
            setattr(self, f"{name}_all", fresh)
            setattr(self, name, list(fresh.unbind(1)))
        self.slots, self.length = new_s, new_l
        self._flat = None

    def prefill(self, slot: int, starts: list[int], lengths: list[int]) -> None:
        """Rows i of the next forward go to slot `slot + i`, positions `starts[i]` on, `lengths[i]` real tokens."""
        self._mode = ("prefill", slot, starts, lengths)

    def prefilling(self) -> tuple[int, list[int], list[int]] | None:
        """In a prefill, (its first slot, each row's start, its real tokens), as `prefill` set them; else None."""
        return self._mode[1:] if self._mode and self._mode[0] == "prefill" else None

    def decode(self, positions: torch.Tensor | int, width: int) -> None:
        """Positions [B] of the new token of each slot, or one int when all slots share it."""
        self._mode = ("decode", positions, width)

    def visible(self, b: int) -> torch.Tensor | None:
        """In a decode step, how many keys each of the first `b` slots attends to (its new token's
        position + 1), int64 [b]; None in a prefill."""
        if not self._mode or self._mode[0] != "decode":
            return None
        pos = self._mode[1]
        if isinstance(pos, int):
            return torch.full((b,), pos + 1, dtype=torch.int64)
        return pos[:b].to(torch.int64) + 1

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs=None):
        k, v = self.k[layer_idx], self.v[layer_idx]
        if self._mode[0] == "prefill":
            _, s, starts, lengths = self._mode
            for i, (a, n) in enumerate(zip(starts, lengths)):
                k[s + i, :, a : a + n] = key[i, :, :n]
                v[s + i, :, a : a + n] = value[i, :, :n]
            end = max(a + n for a, n in zip(starts, lengths))
            return k[s : s + len(starts), :, :end], v[s : s + len(starts), :, :end]
        _, pos, width = self._mode
        b = key.shape[0]
        if isinstance(pos, int):
            k[:b, :, pos : pos + 1] = key
            v[:b, :, pos : pos + 1] = value
        else:  # one row of the buffers as [rows, head_dim] per (slot, head): one index_copy_ a layer
            if self._flat is None or self._flat[0] is not pos:
                layers = torch.arange(self.layers, device=key.device)[:, None, None]
                slots = torch.arange(b, device=key.device)[:, None]
                heads = torch.arange(self.kv_heads, device=key.device)
                rows = ((slots * self.layers + layers) * self.kv_heads + heads) * self.length + pos[:, None]
                self._flat = (pos, rows.reshape(self.layers, -1))  # [layers, slots * heads]
            idx = self._flat[1][layer_idx]
            self.k_all.view(-1, self.head_dim).index_copy_(0, idx, key.reshape(-1, self.head_dim))
            self.v_all.view(-1, self.head_dim).index_copy_(0, idx, value.reshape(-1, self.head_dim))
        return k[:b, :, :width], v[:b, :, :width]

    def slot(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot's keys and values of every layer, `[layers, kv_heads, length, head_dim]` (contiguous views)."""
        return self.k_all[slot], self.v_all[slot]

    def put(self, slot: int, position: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one token's keys and values of every layer (`[layers, kv_heads, head_dim]`) at `position`."""
        self.k_all[slot, :, :, position] = keys
        self.v_all[slot, :, :, position] = values

    def read(self, slot: int, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [k[slot, :, :n].clone() for k in self.k], [v[slot, :, :n].clone() for v in self.v]

    def write(self, slot: int, ks: list[torch.Tensor], vs: list[torch.Tensor], n: int) -> None:
        for i in range(self.layers):
            self.k[i][slot, :, :n] = ks[i][:, :n]
            self.v[i][slot, :, :n] = vs[i][:, :n]

    def move(self, src: int, dst: int, n: int) -> None:
        for buffers in (self.k, self.v):
            for b in buffers:
                b[dst, :, :n] = b[src, :, :n]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # asked for only when no positions are given
        return 0


class LRU(collections.OrderedDict):
    """An OrderedDict that forgets its least recently used entries beyond `capacity` (by `size`)."""

    def __init__(self, capacity: int, size: Callable = lambda v: 1, on_evict: Callable | None = None):
        super().__init__()
        self.capacity, self.size, self.on_evict, self.total = capacity, size, on_evict, 0

    def get(self, key, default=None):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def put(self, key, value) -> None:
        if key in self:
            self.total -= self.size(self.pop(key))
        self[key] = value
        self.total += self.size(value)
        while self.total > self.capacity and len(self) > 1:
            k, v = self.popitem(last=False)
            self.total -= self.size(v)
            if self.on_evict:
                self.on_evict(k, v)
