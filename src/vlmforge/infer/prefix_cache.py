"""Prefix KV reuse (SGLang's radix cache, vLLM's automatic prefix caching), for the engine.

After a prefill the keys and values of the prompt are kept, indexed by chained hashes of 8-token
blocks (a block's hash covers its tokens and the content hashes of the images it holds). A later
prompt that starts with the same blocks (same system prompt, same image, ...) copies them into its
slot and prefills only the rest.
"""

from __future__ import annotations

import hashlib
import itertools

import torch

from vlmforge.infer.kv_cache import BLOCK, LRU, SlotCache
from vlmforge.infer.request import Request


class PrefixCache:
    """Up to `capacity_tokens` prompt tokens of keys/values, by block-chain hash (0: off).

    Args:
        capacity_tokens: tokens kept at most (least recently used entries go first).
        image_starts: where each image block starts in a prompt (the model's `image_starts`).
        cross_attention: every token sees every image of its request (a block's hash covers them all).
    """

    def __init__(self, capacity_tokens: int, image_starts, cross_attention: bool):
        self.store = LRU(capacity_tokens, size=lambda e: e[2], on_evict=self._forget)
        self.index: dict[str, tuple[int, int]] = {}  # block-chain hash -> (entry id, tokens)
        self.image_starts, self.cross_attention = image_starts, cross_attention
        self._ids = itertools.count()

    def hashes(self, req: Request) -> list[str]:
        """Chained hashes of the prompt's full blocks (the last token is never covered, so that
        the prefill always computes it)."""
        if not self.store.capacity:
            return []
        image_at = self.image_starts(req.prompt)
        h = hashlib.blake2b(digest_size=16)
        if self.cross_attention:
            h.update("".join(im.key for im in req.images).encode())
        hashes, k = [], 0
        for b in range((len(req.prompt) - 1) // BLOCK):
            lo, hi = b * BLOCK, (b + 1) * BLOCK
            h.update(torch.tensor(req.prompt[lo:hi], dtype=torch.int64).numpy().tobytes())
            while not self.cross_attention and k < len(image_at) and image_at[k] < hi:
                h.update(req.images[k].key.encode())
                k += 1
            hashes.append(h.copy().hexdigest())
        return hashes

    def lookup(self, hashes: list[str], cache: SlotCache, slot: int) -> int:
        """Copy the longest cached prefix of these blocks into `slot`; returns its length in tokens."""
        for b in reversed(range(len(hashes))):
            hit = self.index.get(hashes[b])
            if hit is not None and hit[0] in self.store:
                ks, vs, _, _ = self.store.get(hit[0])
                cache.write(slot, ks, vs, (b + 1) * BLOCK)
                return (b + 1) * BLOCK
        return 0

    def keep(self, hashes: list[str], cache: SlotCache, slot: int, cached: int) -> None:
        """Keep the blocks of the prompt just prefilled in `slot` (unless all came from here)."""
        if hashes and len(hashes) * BLOCK > cached:
            ks, vs = cache.read(slot, len(hashes) * BLOCK)
            entry_id = next(self._ids)
            self.store.put(entry_id, (ks, vs, len(hashes) * BLOCK, hashes))
            for b, hsh in enumerate(hashes):
                self.index[hsh] = (entry_id, (b + 1) * BLOCK)

    def _forget(self, entry_id, entry) -> None:
        for hsh in entry[3]:
            if self.index.get(hsh, (None,))[0] == entry_id:
                del self.index[hsh]
