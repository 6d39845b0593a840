"""The engine's vision forward: a lean loop over a SigLIP tower's own modules.

An image's encoding in a small tower is mostly per-call overhead, as a decode step is (see
`decoder`). On CPUs transformers' modules multiply by their weights as stored ([out, in], through
`F.linear`), which for a few dozen rows runs 2.5-4x slower than a matmul on a transposed contiguous
copy, and embed the patches with a convolution whose stride is its kernel: one matmul over the
unfolded patches. This module runs SigLIP's formula,
`h = patches @ P + pos; h += o(attn(qkv(ln1(h)))); h += fc2(act(fc1(ln2(h))))`, then the final norm,
with the tower's own weights through `decoder.Weight` (q/k/v as one weight; transposed copies, or
oneDNN's packed layout for weights that size, which also runs a GELU inside fc1's matmul: apart,
the activation costs a quarter of a large tower's MLP here), and stops at the tower's `feature_layer`. The copies
are made when the engine is built: it serves the weights it was built with, as for the LM. A tower
whose weights are all small enough for row tiles runs the whole formula in one call of the engine's
C kernels (`kernels.Encoder`): there the ~10 operations of each layer cost more in dispatch than in
arithmetic (the tiny preset's 4 layers over 16 patches: docs/engine.md).

Every other case runs through `VisionTower.forward`: another encoder, a tower on an accelerator, one
with LoRA adapters, pooled features, stored states (`from_states`), and inputs
of another size than the tower's own (their position embeddings are interpolated).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from vlmforge.infer import decoder, kernels
from vlmforge.infer.decoder import Weight
from vlmforge.model.vision import vision_core


def _weight(*mods) -> Weight:
    """`mods` as one `Weight`: for a weight of `PACK_MIN` elements and more only oneDNN's packed copy
    (a large tower's calls have many rows, which read the packed one); a smaller one as a transposed
    copy, and as row tiles too where the engine's kernels build (read by up to `kernels.MAX_ROWS`
    rows: a small tower's patches of one image, 16 for the tiny preset's, ~1.8x torch's matmul)."""
    big = sum(m.weight.numel() for m in mods) >= decoder.PACK_MIN
    return Weight(list(mods), copy=not big, pack=True, plain=not big)


def gelu_kind(act) -> str | None:
    """The approximation of torch's GELU ("tanh" or "none") that the activation module `act` runs
    (transformers' and torch's); None for any other activation."""
    if isinstance(act, torch.nn.GELU):
        return act.approximate
    f = getattr(act, "act", None)
    if f is F.gelu:
        return "none"
    if isinstance(f, functools.partial) and f.func is F.gelu and not f.args and set(f.keywords) <= {"approximate"}:
        return f.keywords.get("approximate", "none")
    return None


class LeanTower:
    """`tower(pixels [N, 3, S, S])` → patch features [N, P, Dv], as `VisionTower.forward` gives
    them, for the towers `reason` accepts and inputs of the tower's own size `S`."""

    def __init__(self, tower):
        core = vision_core(tower.model)
        emb = core.embeddings
        conv = emb.patch_embedding
        with torch.no_grad():
            self.patch = conv.kernel_size[0]
            self.size = tower.image_size
            self.embed_w = conv.weight.reshape(conv.weight.shape[0], -1).t().contiguous()  # [C p p, Dv]
            self.embed_b = conv.bias
            self.pos = emb.position_embedding.weight  # [P, Dv]
        self.dtype = conv.weight.dtype
        depth = len(core.encoder.layers)
        # hidden_states[k]: the embeddings' output (k 0), then each layer's; -1: after the final norm
        last = tower.feature_layer == -1
        stop = depth if last else tower.feature_layer % (depth + 1)
        self.post = core.post_layernorm if last else None
        self.layers = []
        for layer in core.encoder.layers[:stop]:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    layer.layer_norm1,
                    _weight(a.q_proj, a.k_proj, a.v_proj),
                    _weight(a.out_proj),
                    layer.layer_norm2,
                    _weight(mlp.fc1),
                    gelu_kind(mlp.activation_fn) or mlp.activation_fn,  # a GELU is fused into fc1 where it can
                    _weight(mlp.fc2),
                    a.num_heads,
                    a.scale,
                )
            )
        self.encoder, self.why_no_encoder = self._encoder()

    def _encoder(self) -> tuple[kernels.Encoder | None, str | None]:
        """The layers as one call of the engine's kernels, or None and why not."""
        if kernels.library() is None:
            return None, kernels.why_unavailable()
        if self.dtype != torch.float32:
            return None, f"{self.dtype} weights"
        norms = [n for layer in self.layers for n in (layer[0], layer[3])] + ([self.post] if self.post else [])
        if any(n.weight is None or n.bias is None for n in norms) or len({n.eps for n in norms}) > 1:
            return None, "layer norms without weights and biases, or of different eps"
        if not all(w.tiles is not None for layer in self.layers for w in (layer[1], layer[2], layer[4], layer[6])):
            return None, "weights too large for row tiles"
        if any(layer[5] not in ("tanh", "none") for layer in self.layers):
            return None, "an activation other than torch's GELU"
        if len({layer[5] for layer in self.layers}) > 1:
            return None, "layers of different activations"
        with torch.no_grad():
            embed = kernels.Tiles(self.embed_w.t().contiguous(), self.embed_b)
            layers = [
                ((n1.weight, n1.bias), qkv.tiles, o.tiles, (n2.weight, n2.bias), fc1.tiles, fc2.tiles)
                for n1, qkv, o, n2, fc1, _, fc2, *_ in self.layers
            ]
        heads, scale = (self.layers[0][7], self.layers[0][8]) if self.layers else (1, 1.0)
        gelu = self.layers[0][5] if self.layers else "tanh"
        post = None if self.post is None else (self.post.weight, self.post.bias)
        eps = norms[0].eps if norms else 1e-6
        try:
            return kernels.Encoder(embed, self.pos.detach().contiguous(), layers, heads, eps, scale, gelu, post), None
        except ValueError as e:  # e.g. a head dim that is no multiple of 16
            return None, str(e)

    @staticmethod
    def reason(tower) -> str | None:
        """Why the lean forward cannot run `tower` (None: it can)."""
        core = vision_core(tower.model)
        names = {type(getattr(core, "embeddings", None)).__name__}
        names |= {type(m).__name__ for m in getattr(getattr(core, "encoder", None), "layers", [None])}
        if names != {"SiglipVisionEmbeddings", "SiglipEncoderLayer"}:
            return f"not a SigLIP tower ({type(tower.model).__name__})"
        p = next(tower.model.parameters())
        if p.device.type != "cpu":
            return f"on {p.device.type}"
        if tower.released or tower.from_states or tower.pooled:
            return "released, on stored states, or pooled"
        if tower.has_lora:
            return "LoRA adapters"
        depth = len(core.encoder.layers)
        if not -(depth + 1) <= tower.feature_layer <= depth:  # the tower's own forward says why
            return f"feature_layer {tower.feature_layer} out of range"
        conv = core.embeddings.patch_embedding
        if conv.kernel_size != conv.stride or conv.padding not in ((0, 0), "valid") or conv.bias is None:
            return "a patch embedding that is not one matmul"
        return None

    def runs(self, pixels: torch.Tensor) -> bool:
        """Whether these inputs are the tower's own size (others interpolate their positions)."""
        return pixels.dim() == 4 and tuple(pixels.shape[-2:]) == (self.size, self.size)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        n, c, s, _ = pixels.shape
        p, g = self.patch, s // self.patch
        # [N, C, g, p, g, p] -> [N, g, g, C, p, p]: each patch's pixels in the conv weight's order
        x = pixels[..., : g * p, : g * p].to(self.dtype)  # the convolution drops what is left of a patch
        x = x.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n * g * g, c * p * p)
        if self.encoder is not None:
            return self.encoder(x.view(n, g * g, -1))
        h = torch.addmm(self.embed_b, x, self.embed_w).view(n, g * g, -1) + self.pos
        for ln1, qkv, o, ln2, fc1, act, fc2, heads, scale in self.layers:
            y = qkv(F.layer_norm(h, ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps))
            q, k, v = y.view(n, g * g, 3, heads, -1).permute(2, 0, 3, 1, 4)
            att = F.scaled_dot_product_attention(q, k, v, scale=scale)
            h = o.add(att.transpose(1, 2).reshape(n, g * g, -1), h)
            x = F.layer_norm(h, ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps)
            h = fc2.add(fc1.gelu(x, act) if isinstance(act, str) else act(fc1(x)), h)
        return self.post(h) if self.post is not None else h
