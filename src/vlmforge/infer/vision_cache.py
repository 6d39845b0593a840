"""Image features once per image, for the engine: visual tokens in an LRU keyed by the image's
content hash, so that a repeated image skips the encoder and the connector."""

from __future__ import annotations

import collections

import torch

from vlmforge.infer.kv_cache import LRU
from vlmforge.infer.request import ImageInput, Request
from vlmforge.infer.tower import LeanTower
from vlmforge.model.vision import by_shape


class VisionCache:
    """Visual tokens `[tokens, D]` of up to `capacity` images, and the encoder batch that makes them.

    Args:
        model: the `VLM` whose processor, encoder and connector make the tokens.
        capacity: images kept.
        dtype: the LM's dtype (tokens are stored in it).
        stats: the engine's counters (`encoded_images` is added to).
        lean: encode through `tower.LeanTower` where it runs this tower (False: the tower's own forward).
    """

    def __init__(self, model, capacity: int, dtype: torch.dtype, stats: collections.Counter, lean: bool = True):
        self.model, self.dtype, self.stats = model, dtype, stats
        self.features = LRU(capacity)
        self.why_not_lean = LeanTower.reason(model.vision) if lean else "not asked for"
        self.lean = LeanTower(model.vision) if self.why_not_lean is None else None

    def how(self) -> str:
        """In words, what encodes an image of the tower's own size."""
        if self.lean is None:
            return f"the tower's own forward ({self.why_not_lean})"
        if self.lean.encoder is not None:
            return "the engine's kernels, the encoder in one call (`kernels.Encoder`)"
        return f"the lean forward, operation by operation (not in one call: {self.lean.why_no_encoder})"

    def needed(self, req: Request, start: int) -> list[ImageInput]:
        """The images whose tokens a prefill from token `start` on needs."""
        if self.model.cross_attention:  # every token attends to every image of the request
            return req.images
        ends = self.model.image_ends(req.prompt)  # an image is needed when its last placeholder is not cached
        return [im for im, end in zip(req.images, ends) if end >= start]

    def gather(self, images: list[ImageInput], have: dict, decoded: dict) -> None:
        """Sort `images` into `have` (key -> cached tokens) and `decoded` (key -> PIL image, to
        encode); an image that cannot be decoded raises here, for its request alone."""
        for im in images:
            if im.key in decoded or im.key in have:
                continue
            hit = self.features.get(im.key)
            if hit is not None:
                have[im.key] = hit
            else:
                decoded[im.key] = im.load()

    def encode(self, images: dict[str, object], device) -> dict[str, torch.Tensor]:
        """Visual tokens of decoded images {key: PIL image}, one encoder batch per view shape; kept here."""
        if not images:
            return {}
        proc = self.model.processor
        views = [proc.views(im).to(device) for im in images.values()]
        if self.lean is not None:
            # patch features, which the connector takes as they are: one forward per shape of views
            # (all the batch's images together), as `image_tokens` runs the tower's own
            native = [i for i, v in enumerate(views) if self.lean.runs(v)]
            for i, feats in zip(native, by_shape([views[i] for i in native], self.lean)):
                views[i] = feats
        vis = self.model.image_tokens(views)
        out = {}
        for key, tokens in zip(images, vis):
            out[key] = tokens.to(self.dtype)
            self.features.put(key, out[key])
        self.stats["encoded_images"] += len(images)
        return out
