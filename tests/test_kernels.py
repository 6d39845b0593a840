"""The engine's CPU kernels (`infer/kernels.py`): the row tiles equal to torch's matmul at every row
count and shape they take, the decode attention to torch's masked `scaled_dot_product_attention`, the
RMS norm to torch's; bad input refused by name, and a clear reason where they cannot be built."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from vlmforge import runtime
from vlmforge.infer import kernels
from vlmforge.infer.kv_cache import SlotCache


@pytest.fixture
def rebuilt(monkeypatch, tmp_path):
    """`kernels` loading afresh (its cached library forgotten) into `tmp_path`, and as before after."""
    monkeypatch.setenv("VLMFORGE_KERNEL_CACHE", str(tmp_path))
    kernels._load.cache_clear()
    yield tmp_path
    kernels._load.cache_clear()


def test_tiles_equal_the_matmul_at_every_row_count():
    assert kernels.library() is not None, kernels.why_unavailable()
    width = kernels.library().rowmm_tile_width()
    g = torch.Generator().manual_seed(0)
    # outputs below, at and past a tile's width, and not a multiple of it; inputs of 1 and odd widths;
    # with and without the software prefetch of the blocks of several rows (the same sums)
    for ahead in (0, kernels.PREFETCH_BYTES):
        kernels.set_prefetch(ahead)
        for out, inp in [(1, 1), (width - 1, 7), (width, 64), (3 * width + 5, 33), (200, 576)]:
            for bias in (None, torch.randn(out, generator=g)):
                w = torch.randn(out, inp, generator=g)
                tiles = kernels.Tiles(w, bias)
                for rows in (1, 2, 3, 5, 8, 9, 13, 17, kernels.MAX_ROWS):
                    x = torch.randn(inp, rows, generator=g).t()  # not contiguous
                    want = x @ w.t() + (0 if bias is None else bias)
                    got = tiles(x)
                    assert got.shape == (rows, out)
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * inp**0.5)
    kernels.set_prefetch(0)
    assert kernels.prefetch() == 0
    with pytest.raises(ValueError, match="a non-negative multiple of 4, got 6"):
        kernels.set_prefetch(6)
    assert kernels.Tiles(torch.ones(4, 3))(torch.empty(0, 3)).shape == (0, 4)
    with runtime.threads(1):  # the kernel runs on torch's thread count of the calling thread
        torch.testing.assert_close(tiles(x), want, rtol=1e-5, atol=1e-5 * inp**0.5)


def test_tiles_add_a_residual_and_take_swiglu():
    g = torch.Generator().manual_seed(4)
    for inp, out in [(40, 70), (33, 32)]:  # SwiGLU's input past and below a 16-wide vector
        w, bias = torch.randn(out, inp, generator=g), torch.randn(out, generator=g)
        tiles = kernels.Tiles(w, bias)
        for rows in (1, 3, 9):
            x, res = torch.randn(rows, inp, generator=g), torch.randn(rows, out, generator=g)
            torch.testing.assert_close(tiles(x, res), x @ w.t() + bias + res, rtol=1e-5, atol=1e-4)
            gu = 4 * torch.randn(rows, 2 * inp, generator=g)  # gates far below and above 0
            want = (F.silu(gu[:, :inp]) * gu[:, inp:]) @ w.t() + bias
            torch.testing.assert_close(tiles.swiglu(gu), want, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(tiles.swiglu(gu, res), want + res, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"residual \[9, 32\], got torch.float32 \(9, 31\)"):
        tiles(x, torch.ones(9, 31))
    with pytest.raises(ValueError, match=r"gate\|up \[rows, 66\].*\(9, 33\)"):
        tiles.swiglu(x)


def test_bad_input_is_refused_by_name():
    tiles = kernels.Tiles(torch.ones(40, 16))
    with pytest.raises(ValueError, match=r"x \[rows, 16\].*\(2, 15\)"):
        tiles(torch.ones(2, 15))
    with pytest.raises(ValueError, match="float64"):
        tiles(torch.ones(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="torch.float16"):
        kernels.Tiles(torch.ones(40, 16, dtype=torch.float16))


def test_attend_equals_masked_sdpa():
    """Views into a slot-major cache ([slots, layers, heads, length, dim], as `SlotCache` keeps it), each
    sequence seeing its own number of keys; query groups of 1 (no grouping) to 5, head dims the
    kernel inlines (64, 128) and others (160: more than the 8 vectors of a value row it sums at once),
    lengths below, at and past its 16-key blocks."""
    g = torch.Generator().manual_seed(1)
    for b, h, group, d in [(1, 1, 1, 16), (8, 3, 3, 64), (2, 8, 4, 128), (3, 2, 5, 48), (2, 1, 2, 160)]:
        for length in (1, 5, 16, 17, 40, 300):
            cache = torch.randn(2, b + 1, 3, h, length + 9, d, generator=g)  # [k/v, slots, layers, heads, L, dim]
            keys, values = cache[0, :b, 1, :, :length], cache[1, :b, 1, :, :length]
            q = 3 * torch.randn(b, h, group, d, generator=g)  # scores over a wide range: a peaked softmax too
            counts = torch.randint(1, length + 1, (b,), generator=g)
            counts[0] = length
            hide = torch.where(torch.arange(length)[None] < counts[:, None], 0.0, float("-inf"))[:, None, None]
            want = F.scaled_dot_product_attention(q, keys, values, attn_mask=hide, scale=0.3)
            got = kernels.attend(q, keys, values, kernels.Visible(counts), 0.3)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    with runtime.threads(1):
        torch.testing.assert_close(
            kernels.attend(q, keys, values, kernels.Visible(counts), 0.3), want, rtol=1e-5, atol=2e-5
        )


def test_rope_store_rotates_and_writes_as_torch():
    """q and k rotated as Llama's rotate_half does it, k and v written at each row's slot and position
    of a slot-major cache's layer, nothing else in the cache touched."""
    g = torch.Generator().manual_seed(3)
    b, heads, kv_heads, d, length = 3, 6, 2, 32, 20
    y = torch.randn(b, (heads + 2 * kv_heads) * d, generator=g)
    angles = torch.rand(length, d // 2, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    cache = torch.randn(2, b + 1, 3, kv_heads, length, d, generator=g)  # [k/v, slots, layers, heads, L, dim]
    before = cache.clone()
    keys, values = cache[0, :, 1], cache[1, :, 1]
    counts = torch.tensor([5, 20, 1])
    q = kernels.rope_store(y, heads, kv_heads, cos, sin, kernels.Visible(counts), keys, values)

    def rope(x, at):  # [B, H, d] at positions [B]
        c, s = cos[at][:, None], sin[at][:, None]
        return x * c + torch.cat((-x[..., d // 2 :], x[..., : d // 2]), -1) * s

    at = counts - 1
    q_want = rope(y[:, : heads * d].view(b, heads, d), at).view(b, kv_heads, heads // kv_heads, d)
    torch.testing.assert_close(q, q_want)
    k_want = rope(y[:, heads * d : (heads + kv_heads) * d].view(b, kv_heads, d), at)
    v_want = y[:, (heads + kv_heads) * d :].view(b, kv_heads, d)
    pick = torch.arange(b)
    torch.testing.assert_close(keys[pick, :, at], k_want)
    torch.testing.assert_close(values[pick, :, at], v_want)
    written = torch.zeros_like(cache, dtype=torch.bool)
    written[:, pick, 1, :, at] = True
    assert torch.equal(cache[~written], before[~written])


def test_rms_norm_equals_torch():
    g = torch.Generator().manual_seed(2)
    for shape in [(1, 576), (8, 1, 576), (2, 48, 256), (3, 7)]:
        x, w = 5 * torch.randn(*shape, generator=g), torch.randn(shape[-1], generator=g)
        torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), F.rms_norm(x, w.shape, w, 1e-5))
    x, w = torch.randn(40, 6, generator=g).t(), torch.randn(40, generator=g)  # x not contiguous
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), F.rms_norm(x, w.shape, w, 1e-6))


def _llama_layers(g, layers, dim, heads, kv_heads, d, inter, bias):
    """Random weights of Llama's layer: (norm 1, [q; k; v], its bias, o, norm 2, [gate; up], down)."""
    qkv = (heads + 2 * kv_heads) * d

    def rand(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    return [
        (
            1 + 0.1 * torch.randn(dim, generator=g),
            rand(qkv, dim),
            torch.randn(qkv, generator=g) if bias else None,
            rand(dim, heads * d),
            1 + 0.1 * torch.randn(dim, generator=g),
            rand(2 * inter, dim),
            rand(dim, inter),
        )
        for _ in range(layers)
    ]


def _reference_step(weights, h, counts, keys, values, cos, sin, heads, kv_heads, d, inter, eps, scale, slots=None):
    """The decode step by torch's operations: the cache [slots, layers, kv_heads, L, d] written in place;
    row i in slot i, or in slots[i] (a prefill's rows, several to a slot: all written, then read)."""
    b, at, half = h.shape[0], counts - 1, d // 2
    pick = torch.arange(b) if slots is None else slots

    def rope(x):  # [B, H, d]
        c, s = cos[at][:, None], sin[at][:, None]
        return x * c + torch.cat((-x[..., half:], x[..., :half]), -1) * s

    hide = torch.where(torch.arange(keys.shape[3])[None] < counts[:, None], 0.0, float("-inf"))[:, None, None]
    for i, (n1, wqkv, bqkv, wo, n2, wgu, wdown) in enumerate(weights):
        y = F.rms_norm(h, n1.shape, n1, eps) @ wqkv.t() + (0 if bqkv is None else bqkv)
        q = rope(y[:, : heads * d].view(b, heads, d))
        keys[pick, i, :, at] = rope(y[:, heads * d : (heads + kv_heads) * d].view(b, kv_heads, d))
        values[pick, i, :, at] = y[:, (heads + kv_heads) * d :].view(b, kv_heads, d)
        att = F.scaled_dot_product_attention(
            q[:, :, None], keys[pick, i], values[pick, i], attn_mask=hide, scale=scale, enable_gqa=True
        )
        h = h + att.reshape(b, -1) @ wo.t()
        gu = F.rms_norm(h, n2.shape, n2, eps) @ wgu.t()
        h = h + (F.silu(gu[:, :inter]) * gu[:, inter:]) @ wdown.t()
    return h


@pytest.fixture
def keep_threads():
    """torch's thread count, restored after the test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("layout", ["tiles", "transposed"])
def test_stack_equals_the_layers_by_torch(layout, keep_threads):
    """`Stack`: a decode step's whole layer stack in one call equals Llama's layers by torch's operations
    (the cache written at each sequence's own position, nothing else in it touched), for 1 to 11
    sequences on 1 to 3 threads (each with rows of its own in the scratch), with the weights as tiles
    or as transposed copies with more columns than are read (the folded rotation's rows) and widths
    that are no multiple of a tile; and so do the final norm and the LM head where the stack takes
    them too, and the engine's step from token ids (`from_tokens`: the embedding too, the scratch
    kept from one call to the next)."""
    g = torch.Generator().manual_seed(5)
    layers, dim, heads, kv_heads, d, inter, eps, scale = 3, 96, 6, 2, 16, 172, 1e-5, 0.25
    weights = _llama_layers(g, layers, dim, heads, kv_heads, d, inter, bias=True)
    angles = torch.rand(40, d // 2, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def as_read(w, b=None):
        if layout == "tiles":
            return kernels.Tiles(w), b  # the tiles hold the bias
        extra = torch.randn(7, w.shape[1], generator=g)  # columns past the outputs, never read
        return torch.cat([w, extra]).t().contiguous(), None if b is None else torch.cat([b, torch.zeros(7)])

    def tiles_bias(w, b):
        return (kernels.Tiles(w, b), None) if layout == "tiles" else as_read(w, b)

    layer_weights = [
        (n1, tiles_bias(wqkv, bqkv), as_read(wo), n2, as_read(wgu), as_read(wdown))
        for n1, wqkv, bqkv, wo, n2, wgu, wdown in weights
    ]
    stack = kernels.Stack(layer_weights, heads, kv_heads, d, inter, eps, scale)
    # and with the final norm and an LM head of 101 outputs (no multiple of a tile), with its bias
    norm, head, head_b = 1 + 0.1 * torch.randn(dim, generator=g), torch.randn(101, dim, generator=g), torch.randn(101)
    final = (norm, tiles_bias(head, head_b))
    headed = kernels.Stack(layer_weights, heads, kv_heads, d, inter, eps, scale, final, 101)
    embed = torch.randn(50, dim, generator=g)
    for b, n in ((1, 2), (3, 3), (8, 2), (11, 1)):  # on n threads, each with rows of its own
        torch.set_num_threads(n)
        cache = torch.randn(2, b + 1, layers, kv_heads, 40, d, generator=g)  # [k/v, slots, layers, heads, L, d]
        counts = torch.randint(1, 40, (b,), generator=g)
        ids = torch.randint(0, len(embed), (b,), generator=g)
        h = embed[ids]
        want_cache, cache_2, cache_3 = cache.clone(), cache.clone(), cache.clone()
        want = _reference_step(
            weights, h, counts, want_cache[0], want_cache[1], cos, sin, heads, kv_heads, d, inter, eps, scale
        )
        got, none = stack(h, kernels.Visible(counts), cache[0], cache[1], cos, sin)
        assert none is None
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache, want_cache, rtol=1e-5, atol=1e-5)
        normed, logits = headed(h, kernels.Visible(counts), cache_2[0], cache_2[1], cos, sin)
        want_normed = F.rms_norm(want, norm.shape, norm, eps)
        torch.testing.assert_close(normed, want_normed, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits, want_normed @ head.t() + head_b, rtol=1e-4, atol=1e-3)
        stepped, best = headed.from_tokens(embed, ids.tolist(), counts.tolist(), cache_3[0], cache_3[1], cos, sin)
        torch.testing.assert_close(stepped, logits, rtol=1e-5, atol=1e-5)
        assert best == stepped.argmax(-1).tolist()
        torch.testing.assert_close(cache_3, want_cache, rtol=1e-5, atol=1e-5)
    # the greedy tokens as torch's argmax picks them: the first of equal logits, else the first NaN;
    # in rows of 40, past the kernel's 16 lanes: equal maxima in other lanes and blocks, a larger one
    # in the last (partial) block, NaNs there or in a block, a row of -inf
    nan, inf = float("nan"), float("inf")

    def row(*at):
        out = [0.0] * 40
        for i, v in at:
            out[i] = v
        return out

    for bias, want in (
        ([0.0, 3, 3, 1, 3], 1),
        ([0.0, 3, 3, nan, 3, nan], 3),
        (row((20, 3), (7, 3), (35, 3), (23, 3)), 7),
        (row((20, 3), (7, 3), (38, 5)), 38),
        (row((3, 9), (25, nan), (30, nan), (36, nan)), 25),
        (row((3, 9), (36, nan), (39, nan)), 36),
        (row((0, nan), (3, 9)), 0),
        ([-inf] * 40, 0),
    ):
        flat = (norm, tiles_bias(torch.zeros(len(bias), dim), torch.tensor(bias)))
        tied = kernels.Stack(layer_weights, heads, kv_heads, d, inter, eps, scale, flat, len(bias))
        logits, best = tied.from_tokens(embed, [3, 4], [1, 2], cache[0], cache[1], cos, sin)
        assert best == [want, want] == logits.argmax(-1).tolist(), bias
    with pytest.raises(ValueError, match=r"Stack: h \[B, 96\], got \(2, 95\)"):
        stack(torch.ones(2, 95), kernels.Visible(torch.tensor([1, 1])), cache[0], cache[1], cos, sin)
    with pytest.raises(ValueError, match=r"Stack: a cache \[slots, 3, 2, L, 16\]"):
        stack(torch.ones(2, 96), kernels.Visible(torch.tensor([1, 1])), cache[0, :, :2], cache[1, :, :2], cos, sin)
    with pytest.raises(ValueError, match=r"a cache of 12 slots for 13 sequences"):
        stack(torch.ones(13, 96), kernels.Visible(torch.ones(13, dtype=torch.long)), cache[0], cache[1], cos, sin)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\), got \[3, 50\]"):
        headed.from_tokens(embed, [3, 50], [1, 1], cache[0], cache[1], cos, sin)
    with pytest.raises(ValueError, match=r"2 sequences of 1 to 40 keys, got \[41, 1\]"):
        headed.from_tokens(embed, [3, 4], [41, 1], cache[0], cache[1], cos, sin)
    with pytest.raises(ValueError, match=r"1 to 16 ids with a count each, got 2 and 1"):
        headed.from_tokens(embed, [3, 4], [1], cache[0], cache[1], cos, sin)
    with pytest.raises(ValueError, match=r"a contiguous embedding table \[tokens, 96\], got \(50, 95\)"):
        headed.from_tokens(embed[:, :95], [3], [1], cache[0], cache[1], cos, sin)
    with pytest.raises(ValueError, match=r"the stack has no final norm and head"):
        stack.from_tokens(embed, [3], [1], cache[0], cache[1], cos, sin)
    with pytest.raises(ValueError, match=r"layer 1's tiles are \[96, 95\], not \[96, 96\]"):
        bad = [
            (n1, as_read(wqkv), as_read(wo), n2, as_read(wgu), as_read(wdown))
            for n1, wqkv, _, wo, n2, wgu, wdown in weights
        ]
        bad[1] = (*bad[1][:2], (kernels.Tiles(torch.ones(96, 95)), None), *bad[1][3:])
        kernels.Stack(bad, heads, kv_heads, d, inter, eps, scale)


def test_a_prefill_through_the_stack_equals_the_layers_by_torch(keep_threads):
    """`Stack.prefill`: prompts' rows through the layers, several rows to a slot (each seeing its
    slot's keys up to its own position, those of a cached prefix too), equal Llama's layers by torch's
    operations on the rows kept (each prompt's last: the last layer goes on with them alone), the
    final norm and the head on them too; every row's keys and values written, nothing else touched."""
    g = torch.Generator().manual_seed(7)
    layers, dim, heads, kv_heads, d, inter, eps, scale = 2, 96, 6, 2, 16, 172, 1e-5, 0.25
    weights = _llama_layers(g, layers, dim, heads, kv_heads, d, inter, bias=True)
    angles = torch.rand(40, d // 2, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    lw = [
        (
            n1,
            (kernels.Tiles(wqkv, bqkv), None),
            (kernels.Tiles(wo), None),
            n2,
            (kernels.Tiles(wgu), None),
            (wdown.t().contiguous(), None),
        )
        for n1, wqkv, bqkv, wo, n2, wgu, wdown in weights
    ]
    norm, head = 1 + 0.1 * torch.randn(dim, generator=g), torch.randn(101, dim, generator=g)
    headed = kernels.Stack(lw, heads, kv_heads, d, inter, eps, scale, (norm, (kernels.Tiles(head), None)), 101)
    bare = kernels.Stack(lw, heads, kv_heads, d, inter, eps, scale)
    # prompts in slots 2, 0 and 3: 13 tokens, 1 token after a cached prefix of 6, 20 tokens after 4
    prompts = [(2, 0, 13), (0, 6, 1), (3, 4, 20)]
    slots = [s for s, start, n in prompts for _ in range(n)]
    counts = [start + j + 1 for s, start, n in prompts for j in range(n)]
    keep = list(itertools.accumulate(n for *_, n in prompts))
    keep = [k - 1 for k in keep]
    for threads in (2, 1, 3):
        torch.set_num_threads(threads)
        h = torch.randn(len(slots), dim, generator=g)
        cache = torch.randn(2, 4, layers, kv_heads, 40, d, generator=g)
        want_cache, cache_2 = cache.clone(), cache.clone()
        want = _reference_step(
            weights,
            h,
            torch.tensor(counts),
            want_cache[0],
            want_cache[1],
            cos,
            sin,
            heads,
            kv_heads,
            d,
            inter,
            eps,
            scale,
            torch.tensor(slots),
        )[keep]
        got, none = bare.prefill(h, slots, counts, keep, cache[0], cache[1], cos, sin)
        assert none is None
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache, want_cache, rtol=1e-5, atol=1e-5)
        normed, logits = headed.prefill(h, slots, counts, keep, cache_2[0], cache_2[1], cos, sin)
        want_normed = F.rms_norm(want, norm.shape, norm, eps)
        torch.testing.assert_close(normed, want_normed, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits, want_normed @ head.t(), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(cache_2, want_cache, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"the rows kept must ascend within \[0, 34\), got \[12, 12\]"):
        bare.prefill(h, slots, counts, [12, 12], cache[0], cache[1], cos, sin)
    with pytest.raises(ValueError, match=r"rows in slots below 4 seeing 1 to 40 keys"):
        bare.prefill(h, [4] * len(slots), counts, keep, cache[0], cache[1], cos, sin)


def _vit_layers(g, layers, dim, inter):
    """Random weights of SigLIP's layer: (norm 1 (w, b), q/k/v, its bias, o, its bias, norm 2 (w, b),
    fc1, its bias, fc2, its bias)."""

    def rand(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    def norm():
        return 1 + 0.1 * torch.randn(dim, generator=g), 0.1 * torch.randn(dim, generator=g)

    out = []
    for _ in range(layers):
        n1, qkv, bqkv, o, bo = norm(), rand(3 * dim, dim), rand(3 * dim), rand(dim, dim), rand(dim)
        out.append((n1, qkv, bqkv, o, bo, norm(), rand(inter, dim), rand(inter), rand(dim, inter), rand(dim)))
    return out


def _reference_encoder(patches, embed, embed_b, pos, weights, heads, eps, scale, gelu, post):
    """SigLIP's encoder by torch's operations."""
    n, p, _ = patches.shape
    h = patches @ embed.t() + embed_b + pos
    for n1, wqkv, bqkv, wo, bo, n2, w1, b1, w2, b2 in weights:
        x = F.layer_norm(h, h.shape[-1:], *n1, eps)
        q, k, v = (x @ wqkv.t() + bqkv).view(n, p, 3, heads, -1).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(n, p, -1)
        h = h + att @ wo.t() + bo
        x = F.layer_norm(h, h.shape[-1:], *n2, eps)
        h = h + F.gelu(x @ w1.t() + b1, approximate=gelu) @ w2.t() + b2
    return h if post is None else F.layer_norm(h, h.shape[-1:], *post, eps)


@pytest.mark.parametrize("heads,d", [(3, 16), (2, 48), (1, 64)])
def test_encoder_equals_the_layers_by_torch(heads, d, keep_threads):
    """`Encoder`: a small ViT's encoder in one call equals SigLIP's layers by torch's operations, for
    1 to 3 images of 5 or 20 patches (no multiple of 16: the attention's padded blocks) on 1 to 3
    threads, with either GELU, with and without the final norm, widths no multiple of a tile; the
    head dims: one of 16, one the attention's generic code takes (48), one it inlines (64)."""
    g = torch.Generator().manual_seed(11)
    dim, inter, cpp, eps, scale = heads * d, 72, 27, 1e-6, d**-0.5
    weights = _vit_layers(g, 2, dim, inter)
    embed, embed_b = torch.randn(dim, cpp, generator=g) / cpp**0.5, torch.randn(dim, generator=g)
    post = (1 + 0.1 * torch.randn(dim, generator=g), 0.1 * torch.randn(dim, generator=g))
    layers = [
        (n1, kernels.Tiles(wqkv, bqkv), kernels.Tiles(wo, bo), n2, kernels.Tiles(w1, b1), kernels.Tiles(w2, b2))
        for n1, wqkv, bqkv, wo, bo, n2, w1, b1, w2, b2 in weights
    ]
    for n, p, threads, gelu, final in ((1, 5, 2, "tanh", post), (3, 20, 3, "none", None), (2, 5, 1, "tanh", None)):
        torch.set_num_threads(threads)
        pos = torch.randn(p, dim, generator=g)
        enc = kernels.Encoder(kernels.Tiles(embed, embed_b), pos, layers, heads, eps, scale, gelu, final)
        patches = torch.randn(n, p, cpp, generator=g)
        want = _reference_encoder(patches, embed, embed_b, pos, weights, heads, eps, scale, gelu, final)
        torch.testing.assert_close(enc(patches), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"Encoder: patches \[N, 5, 27\], got \(1, 6, 27\)"):
        kernels.Encoder(kernels.Tiles(embed, embed_b), pos, layers, heads, eps, scale, "tanh")(torch.ones(1, 6, 27))
    with pytest.raises(ValueError, match=r"Encoder: a GELU approximation 'tanh' or 'none', not 'relu'"):
        kernels.Encoder(kernels.Tiles(embed, embed_b), pos, layers, heads, eps, scale, "relu")
    with pytest.raises(ValueError, match=rf"layer 1's projections must be tiles of \[{inter}, {dim}\]"):
        bad = list(layers)
        bad[1] = (*bad[1][:4], kernels.Tiles(torch.ones(inter, dim + 1)), bad[1][5])
        kernels.Encoder(kernels.Tiles(embed, embed_b), pos, bad, heads, eps, scale, "tanh")
    with pytest.raises(ValueError, match=rf"Encoder: layer 0's norm 2 must be \[{dim}\], got \({dim + 1},\)"):
        bad = [(layers[0][0], *layers[0][1:3], (torch.ones(dim + 1), torch.ones(dim)), *layers[0][4:])]
        kernels.Encoder(kernels.Tiles(embed, embed_b), pos, bad, heads, eps, scale, "tanh")
    with pytest.raises(ValueError, match=r"a head dim that is a multiple of 16"):
        kernels.Encoder(kernels.Tiles(embed, embed_b), pos, layers, dim // 8, eps, scale, "tanh")


def test_attend_and_rms_norm_refuse_bad_input_by_name():
    q, kv = torch.ones(2, 3, 2, 64), torch.ones(2, 3, 10, 64)
    few = kernels.Visible(torch.tensor([10, 4]))
    with pytest.raises(ValueError, match="head dim must be a multiple of 16, got 24"):
        kernels.attend(torch.ones(2, 3, 2, 24), torch.ones(2, 3, 10, 24), torch.ones(2, 3, 10, 24), few, 1.0)
    with pytest.raises(ValueError, match=r"keys and values \[2, 3, L, 64\].*\(2, 4, 10, 64\)"):
        kernels.attend(q, torch.ones(2, 4, 10, 64), torch.ones(2, 4, 10, 64), few, 1.0)
    with pytest.raises(ValueError, match="at most 10 keys, got counts \\[11, 4\\]"):
        kernels.attend(q, kv, kv, kernels.Visible(torch.tensor([11, 4])), 1.0)
    with pytest.raises(ValueError, match="contiguous rows"):
        kernels.attend(q, torch.ones(2, 3, 10, 128)[..., ::2], kv, few, 1.0)
    with pytest.raises(ValueError, match="values must be float32 on the CPU, not torch.bfloat16"):
        kernels.attend(q, kv, kv.bfloat16(), few, 1.0)
    with pytest.raises(ValueError, match="one positive count per sequence, got \\[3, 0\\]"):
        kernels.Visible(torch.tensor([3, 0]))
    with pytest.raises(ValueError, match=r"x \[\.\.\., 8\].*got x \(2, 7\)"):
        kernels.rms_norm(torch.ones(2, 7), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="x must be float32 on the CPU, not torch.float64"):
        kernels.rms_norm(torch.ones(2, 8, dtype=torch.float64), torch.ones(8), 1e-6)
    y, cos = torch.ones(2, (6 + 2 * 3) * 64), torch.ones(30, 64)
    with pytest.raises(ValueError, match=r"y \[B, \(6 \+ 2 x 3\) x 64\], got \(2, 700\)"):
        kernels.rope_store(torch.ones(2, 700), 6, 3, cos, cos, few, kv, kv)
    with pytest.raises(ValueError, match=r"positions below 10, got \[10, 3\]"):
        kernels.rope_store(y, 6, 3, cos, cos, kernels.Visible(torch.tensor([11, 4])), kv, kv)
    with pytest.raises(ValueError, match=r"a cache \[>= 2, 3, L, 64\], got \(1, 3, 10, 64\)"):
        kernels.rope_store(y, 6, 3, cos, cos, few, kv[:1], kv[:1])
    cpu = torch.device("cpu")
    assert "multiple of 16" in kernels.attendable(torch.float32, cpu, 24)
    assert "bfloat16" in kernels.attendable(torch.bfloat16, cpu, 64)
    assert kernels.attendable(torch.float32, cpu, 64) is None


def test_a_kernel_that_cannot_be_built_says_why(rebuilt, monkeypatch):
    monkeypatch.setenv("VLMFORGE_KERNELS", "0")
    assert kernels.library() is None and "VLMFORGE_KERNELS=0" in kernels.why_unavailable()
    with pytest.raises(RuntimeError, match="unavailable: turned off"):
        kernels.Tiles(torch.ones(4, 4))
    kernels._load.cache_clear()
    monkeypatch.delenv("VLMFORGE_KERNELS")
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    assert kernels.library() is None and "false could not build kernels.c" in kernels.why_unavailable()
    assert list(rebuilt.iterdir()) == []  # nothing half-written left behind


def test_the_library_is_built_once_into_the_cache_folder(rebuilt):
    assert kernels.library() is not None, kernels.why_unavailable()
    (built,) = rebuilt.glob("kernels-*.so")
    stamp = built.stat().st_mtime_ns
    kernels._load.cache_clear()
    assert kernels.library() is not None and built.stat().st_mtime_ns == stamp  # taken from the cache


def test_large_tiles_sit_from_a_huge_page_boundary_and_multiply_alike():
    """A weight of 2 MB and more is laid out in memory advised for transparent huge pages, from a 2 MB
    boundary (`huge_pages`), and multiplies as the small ones do; below a page, plain memory."""
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(1030, 1024, generator=g), torch.randn(1030, generator=g)  # 4 MB, no multiple of a tile
    tiles = kernels.Tiles(w, b)
    assert tiles.tiles.data_ptr() % kernels.HUGE_PAGE == 0
    x = torch.randn(5, 1024, generator=g)
    torch.testing.assert_close(tiles(x), x @ w.t() + b, rtol=1e-4, atol=1e-3)
    small = kernels.huge_pages((3, 7))
    assert small.shape == (3, 7) and small.dtype == torch.float32
    big = kernels.huge_pages((2, 1 << 20))
    big.fill_(1.5)
    assert big.shape == (2, 1 << 20) and big.is_contiguous() and float(big.sum()) == 1.5 * 2 * (1 << 20)
    half = kernels.huge_pages((3, 1 << 20), torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.data_ptr() % kernels.HUGE_PAGE == 0


def test_the_kv_cache_in_huge_pages_starts_at_zero_and_keeps_its_rows_as_it_grows():
    """`SlotCache` with `huge_pages` (as the engine has it on a CPU): buffers of 2 MB and more from a
    huge page's boundary, zero where nothing was written, and what was written kept when it grows."""
    cache = SlotCache(2, 3, 64, torch.float32, torch.device("cpu"), alloc=kernels.huge_pages)
    cache.reserve(2, 8)  # 24 KB a kind: plain memory
    rows = torch.randn(2, 3, 64)
    cache.put(1, 5, rows, -rows)
    cache.reserve(4, 1024)  # 6 MB a kind
    for kind, sign in ((cache.k_all, 1), (cache.v_all, -1)):
        assert kind.data_ptr() % kernels.HUGE_PAGE == 0 and kind.shape == (4, 2, 3, 1024, 64)
        assert torch.equal(kind[1, :, :, 5], sign * rows)
        kind[1, :, :, 5] = 0
        assert not kind.any()
