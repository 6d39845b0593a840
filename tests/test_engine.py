"""The generation engine: KV-cache parity, batching parity, caches, sampling, stops, limits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from vlmforge.infer import decoder, kernels
from vlmforge.infer.detokenize import byte_level_table
from vlmforge.infer.engine import Engine
from vlmforge.infer.request import EngineBusy, PromptTooLong, SamplingParams
from vlmforge.infer.tower import LeanTower
from vlmforge.model.vision import vision_core
from vlmforge.model.vlm import VLM

COLORS = ["red", "green", "blue", "yellow", "purple"]


def image(color, size=(40, 30)):
    return Image.new("RGB", size, color)


@pytest.fixture(scope="module", params=["autoregressive", "cross_attention"])
def vlm(request, model_cfg):
    torch.manual_seed(0)
    cfg = dataclasses.replace(model_cfg, architecture=request.param, xattn_every=1)
    m = VLM.from_backbones(cfg).eval()
    with torch.no_grad():  # a model whose answers depend on the image and vary token to token
        for p in m.connector.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return m


def prompts(m, questions):
    return [m.build_prompt(q, 1) for q in questions]


QUESTIONS = ["what is it?", "describe the picture in many words please", "color?", "how many shapes are there"]


def no_cache_greedy(m, prompt, img, n):
    """Greedy decoding by re-running the whole sequence every step (no KV cache at all)."""
    ids = list(prompt)
    pixels = m.processor.views(img)
    with torch.no_grad():
        for _ in range(n):
            logits = m(torch.tensor([ids]), pixel_values=pixels).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("fast", [True, False])
def test_kv_cache_output_equals_no_cache_output(vlm, fast):
    eng = Engine(vlm, fast=fast)
    assert eng.lm_forward.fast == fast and (eng.vision.lean is not None) == fast
    calls, lean = [], eng.vision.lean
    if fast:
        eng.vision.lean = lambda x: calls.append(len(x)) or lean(x)
        eng.vision.lean.runs = lean.runs
    p = prompts(vlm, QUESTIONS[:2])
    reqs = eng.generate(p, [[image("red")], [image("blue")]], SamplingParams(max_tokens=12, ignore_eos=True))
    assert calls == ([2] if fast else [])  # the prefill's two images in one forward of the tower
    for r, prompt, color in zip(reqs, p, ["red", "blue"]):
        assert r.tokens == no_cache_greedy(vlm, prompt, image(color), 12)
        assert r.finish_reason == "length" and len(r.tokens) == 12


@pytest.mark.parametrize("feature_layer,packed", [(-1, False), (-2, False), (-1, True)])
def test_lean_tower_equals_the_towers_own_forward(model_cfg, feature_layer, packed, monkeypatch):
    torch.manual_seed(0)
    m = VLM.from_backbones(dataclasses.replace(model_cfg, feature_layer=feature_layer)).eval()
    assert LeanTower.reason(m.vision) is None
    if packed:  # every weight in oneDNN's layout, as a large tower's are: the GELU runs inside fc1's matmul
        monkeypatch.setattr(decoder, "PACK_MIN", 0)
    lean = LeanTower(m.vision)
    assert (lean.layers[0][4].packed is not None) == packed and lean.layers[0][5] == "tanh"
    side = m.vision.image_size
    pixels = torch.rand(3, 3, side, side) * 2 - 1  # every patch different: their order shows
    with torch.no_grad():
        ref = m.vision(pixels)
    out = lean(pixels)
    assert out.shape == ref.shape == (3, m.vision.num_patches, m.vision.hidden_size)
    torch.testing.assert_close(out, ref, atol=1e-5 * float(ref.max() - ref.min()), rtol=0)
    assert lean.runs(pixels) and not lean.runs(torch.rand(1, 3, side + 8, side))  # other sizes: the tower's own
    # small weights: the whole encoder in one call of the engine's kernels (`out` above); large ones not
    assert (lean.encoder is None) == packed
    assert lean.why_no_encoder == ("weights too large for row tiles" if packed else None)
    if not packed:  # the layers operation by operation too, reading row tiles where the patches are few
        lean.encoder = None
        torch.testing.assert_close(lean(pixels), ref, atol=1e-5 * float(ref.max() - ref.min()), rtol=0)
        patches, weights = m.vision.num_patches, [lean.layers[0][i] for i in (1, 2, 4, 6)]
        assert all(w.tiles is not None for w in weights)
        assert lean.layers[0][1].reads_packed(patches) == (patches <= kernels.MAX_ROWS)
        for layer in lean.layers:
            for i in (1, 2, 4, 6):
                layer[i].tile_rows = patches  # whatever the count: one image reads the tiles
        torch.testing.assert_close(lean(pixels[:1]), ref[:1], atol=1e-5 * float(ref.max() - ref.min()), rtol=0)
    if packed:  # only the packed copy is kept (no plain one, no concatenated q/k/v), read at one row too
        _, qkv, o, _, fc1, _, fc2, *_ = lean.layers[0]
        assert all(w.w is None and w.packed_only for w in (qkv, o, fc1, fc2))
        a = vision_core(m.vision.model).encoder.layers[0].self_attn
        x = torch.randn(1, m.vision.hidden_size)
        want = torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], dim=-1)
        torch.testing.assert_close(qkv(x), want, atol=1e-5 * float(want.abs().max()), rtol=0)
    m.vision.pooled = True
    assert "pooled" in LeanTower.reason(m.vision)
    m.vision.pooled, m.vision.feature_layer = False, 99
    assert "out of range" in LeanTower.reason(m.vision)
    m.vision.feature_layer = feature_layer
    m.vision.set_trainable("lora")
    assert LeanTower.reason(m.vision) == "LoRA adapters"


def recording(engine) -> list[torch.Tensor]:
    """The logits of every token the engine picks, in order (appended as it runs)."""
    seen, sample = [], engine._sample

    def record(logits, reqs, greedy=None):
        seen.append(logits.clone())
        assert greedy is None or greedy == logits.argmax(-1).tolist()  # the stack's own argmax: torch's
        return sample(logits, reqs, greedy)

    engine._sample = record
    return seen


@pytest.mark.parametrize("through", ["the stack", "operations"])
def test_prefill_logits_equal_the_models_own_forward(vlm, through, monkeypatch):
    """A prompt alone (causal attention without a mask), beside a longer one (padded, masked), and
    after its cached prefix: the first token's logits are the model's own forward's, where the last
    layer ran for the last position only; through the layer stack in one call (each prompt's rows
    alone, no padding: `Stack.prefill`), or operation by operation (the cross-attention LM's always)."""
    monkeypatch.setattr(decoder, "PREFILL_ROWS", 0 if through == "operations" else 1000)  # two prompts: 65 rows
    eng = Engine(vlm, prefix_cache_tokens=64)
    seen = recording(eng)
    p, imgs = prompts(vlm, QUESTIONS[:2]), [image("red"), image("blue")]
    stacked = through == "the stack" and not vlm.cross_attention
    eng.generate(p[:1], [imgs[:1]], SamplingParams(max_tokens=1))
    assert (eng.lm_forward.prefilled == decoder.PREFILL_STACK) == stacked, eng.lm_forward.prefilled
    eng.generate(p, [[i] for i in imgs], SamplingParams(max_tokens=1))
    assert (eng.lm_forward.prefilled == decoder.PREFILL_STACK) == stacked
    eng.generate(p[1:], [imgs[1:]], SamplingParams(max_tokens=1))
    assert eng.stats["cached_tokens"] > len(p[0])  # the second prompt's prefix too, the last time
    with torch.no_grad():
        ref = [vlm(torch.tensor([q]), pixel_values=vlm.processor.views(i)).logits[0, -1] for q, i in zip(p, imgs)]
    for got, want in zip((seen[0][0], seen[1][0], seen[1][1], seen[2][0]), (ref[0], ref[0], ref[1], ref[1])):
        torch.testing.assert_close(got, want, atol=1e-4 * float(want.max() - want.min()), rtol=0)


@pytest.mark.parametrize("kernels_take", ["attention", "each operation", "the stack", "the stack on plain copies"])
def test_decode_logits_equal_the_models_own_forward(vlm, kernels_take, monkeypatch):
    """Two prompts of different lengths decoding together (each slot's keys end at its own position):
    every step's logits are the model's own forward's over the whole sequence so far, to 1e-4 of
    their range. The layers operation by operation (the cross-attention LM's, always): the attention
    the engine's kernel, the rotation, the cache's writes and the projections torch's where the
    rotation is folded into the projection (few rows of small weights); or the engine's kernels for
    each: `rope_store`, the projections as row tiles, the down projection with its SwiGLU
    (`Tiles.swiglu`). Or the whole stack in one call (`kernels.Stack`), on row tiles or on the
    weights' plain copies."""
    if kernels_take in ("attention", "the stack on plain copies"):
        monkeypatch.setattr(decoder, "TILE_MIN", 1 << 62)  # no weight takes tiles
    if kernels_take != "the stack on plain copies":
        monkeypatch.setattr(decoder, "FOLD_ROWS", 0 if kernels_take != "attention" else decoder.FOLD_ROWS)
    if kernels_take in ("attention", "each operation"):
        monkeypatch.setattr(decoder.Decoder, "stack", lambda self, rows: (None, "turned off"))
    eng = Engine(vlm, prefix_cache_tokens=0)
    tiled = kernels_take in ("each operation", "the stack")
    assert (eng.lm_forward.layers[0].w_down.tiles is not None) == tiled
    stacked = kernels_take.startswith("the stack") and not vlm.cross_attention
    assert eng.lm_forward.kernels(2).startswith("the layers in one call") == stacked
    seen = recording(eng)
    p, imgs = prompts(vlm, QUESTIONS[:2]), [image("red"), image("blue")]
    reqs = eng.generate(p, [[i] for i in imgs], SamplingParams(max_tokens=6, ignore_eos=True))
    assert eng.lm_forward.attention == decoder.OWN_ATTENTION
    with torch.no_grad():
        for step in range(1, 6):  # the decode steps (step 0 was the prefill)
            for row, (q, i, r) in enumerate(zip(p, imgs, reqs)):
                ids = torch.tensor([q + r.tokens[:step]])
                want = vlm(ids, pixel_values=vlm.processor.views(i)).logits[0, -1]
                got = seen[step][row]
                torch.testing.assert_close(got, want, atol=1e-4 * float(want.max() - want.min()), rtol=0)


@pytest.mark.parametrize("projections", ["rows", "mm"])
def test_compiled_decode_step_equals_the_eager_one(vlm, projections):
    """`compile=True`: one sequence's steps go through the compiled graph and give the eager engine's
    logits (to 1e-5 of their range) and tokens (sampled with a seed: varied tokens), across the
    cache's growth (40 tokens: its length doubles twice) and after a batch (eager) has widened the
    cache's slots, with either way of multiplying by the weights, compiled once for all of it (a
    second compilation of SmolLM2's step stalls a server for about two minutes); the cross-attention LM is
    refused by name and runs eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # no graph of an earlier test to reuse: each one this test needs is compiled here
    graphs = counters["stats"]["unique_graphs"]
    eng = Engine(vlm, compile=True, prefix_cache_tokens=0, projections=projections)
    step = eng.lm_forward.compiled
    if vlm.cross_attention:
        assert step is None and "cross-attention" in eng.lm_forward.why_not_compiled
    else:
        assert step is not None and step.projections == projections
    p = prompts(vlm, QUESTIONS[:2])
    imgs = [[image("red")], [image("blue")]]
    params = SamplingParams(max_tokens=40, ignore_eos=True, temperature=1.0, seed=3)
    eager = Engine(vlm, prefix_cache_tokens=0)
    ours, theirs = recording(eng), recording(eager)
    one = eng.generate(p[:1], imgs[:1], params)[0]
    assert one.tokens == eager.generate(p[:1], imgs[:1], params)[0].tokens
    both = eng.generate(p, imgs, params)
    assert [r.tokens for r in both] == [r.tokens for r in eager.generate(p, imgs, params)]
    again = eng.generate(p[1:], imgs[1:], params)[0]
    assert again.tokens == both[1].tokens == eager.generate(p[1:], imgs[1:], params)[0].tokens
    assert len(set(one.tokens)) > 10  # answers that vary token to token
    assert len(ours) == len(theirs) == 40 + 40 + 40
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() <= 1e-5 * (b.max() - b.min())
    if step is not None:
        assert step.steps == 2 * 39  # the two single answers' steps after their first token, no batch's
        assert counters["stats"]["unique_graphs"] - graphs == 1  # one graph, before and after the batch


def test_the_compiled_step_picks_its_projections_by_measuring_them(model_cfg):
    """ "auto" measures the matmul's read rate over the step's own weights and the machine's, and says
    which it took and why; an unknown choice is refused by name."""
    from vlmforge.infer.compiled import _weights, read_rates

    vlm = VLM.from_backbones(dataclasses.replace(model_cfg, architecture="autoregressive")).eval()
    step = Engine(vlm, compile=True, prefix_cache_tokens=0).lm_forward.compiled
    assert step.projections in ("rows", "mm") and "GB/s" in step.why
    decoder = step.graph._orig_mod.decoder
    every = _weights(decoder)
    mm, total = read_rates(every)
    assert mm > 0 and total > 0
    assert len(every) == 4 * len(decoder.layers) + 1 and every[-1] is decoder.head_w.w  # all, the head last
    assert len(_weights(decoder, limit=1)) == 4  # a first layer past the limit: the rest left out
    with pytest.raises(ValueError, match="unknown projections 'fast'"):
        Engine(vlm, compile=True, projections="fast")


@pytest.mark.parametrize("weights", ["plain", "tiles", "packed"])
def test_batched_equals_one_by_one_and_hf_generate(vlm, weights, monkeypatch):
    """`weights`: the tiny LM's plain copies alone (no weight as large as `TILE_MIN`), or each also
    kept as row tiles (read at 2 to `kernels.MAX_ROWS` rows: the batch and these short prompts'
    prefills), the decode steps' layers in one call either way (`kernels.Stack`); or, where the
    engine's kernels are unavailable, in oneDNN's packed layout (and the decode steps' operations
    torch's)."""
    if weights == "plain":
        monkeypatch.setattr(decoder, "TILE_MIN", 1 << 62)
    if weights == "packed":
        monkeypatch.setattr(decoder, "PACK_MIN", 0)
        monkeypatch.setattr(kernels, "library", lambda: None)
    engine = Engine(vlm, max_batch=3, max_prefills_per_step=1)
    qkv = engine.lm_forward.layers[0].w_qkv
    assert (qkv.tiles is not None, qkv.packed is not None) == (weights == "tiles", weights == "packed")
    # the decode steps' layers in one call of the engine's kernels, but where those are unavailable
    # or the layers have cross-attention
    stacked = weights != "packed" and not vlm.cross_attention
    said = {
        "plain": "q/k/v, o, gate/up, down, head: torch's matmul",
        "tiles": "q/k/v, o, gate/up, down, head: row tiles (`kernels.Tiles`",
        "packed": "q/k/v, o, gate/up, down, head: oneDNN's packed layout",
    }[weights]
    if stacked:
        said = "the layers in one call (`kernels.Stack`); " + said.replace(
            "torch's matmul", "the engine's kernel on the plain copy"
        )
    assert engine.lm_forward.kernels(3).startswith(said)
    assert (engine.lm_forward.stack(3)[0] is not None) == stacked, engine.lm_forward.stack(3)[1]
    p = prompts(vlm, QUESTIONS)  # different lengths: slots at different positions
    imgs = [[image(c)] for c in COLORS[:4]]
    params = SamplingParams(max_tokens=10)
    alone = [Engine(vlm, prefix_cache_tokens=0).generate([q], [i], params)[0] for q, i in zip(p, imgs)]
    batched = engine.generate(p, imgs, params)  # requests join mid-way
    own = engine.lm_forward.attention == decoder.OWN_ATTENTION  # decode steps attend with the engine's kernel
    assert own == (weights != "packed"), engine.lm_forward.attention
    assert [r.tokens for r in batched] == [r.tokens for r in alone]
    assert [r.text for r in batched] == [r.text for r in alone]
    views = [vlm.processor.views(i[0]) for i in imgs]
    reference = [vlm.generate([q], pixel_values=v, max_new_tokens=10)[0] for q, v in zip(p, views)]
    assert [r.tokens for r in alone] == reference
    for r in alone:  # the streamed text is the decoded answer
        assert r.text == vlm.tokenizer.decode(r.tokens, skip_special_tokens=True)


@pytest.mark.parametrize("faster", ["on", "off"])
def test_the_tiles_prefetch_in_software_where_that_read_them_faster(faster, monkeypatch):
    """The tiles' blocks of several rows prefetch their weights in software, or leave it to the
    hardware, whichever read the weights faster when the engine was built (here made to win by
    turns): the setting of the process (`kernels.set_prefetch`), said in words."""
    weights = [decoder.Weight([torch.nn.Linear(64, 96)], pack=True) for _ in range(3)]
    assert all(w.tiles is not None for w in weights)
    set_to = []

    def timed(fns, repeats):
        for fn in fns:
            fn()  # each sets its prefetch, then reads the tiles
            set_to.append(kernels.prefetch())
        return [2.0, 1.0] if faster == "on" else [1.0, 2.0]

    monkeypatch.setattr(decoder.runtime, "best_seconds_each", timed)
    try:
        said = decoder._pick_prefetch(weights)
        assert set_to == [0, kernels.PREFETCH_BYTES]
        assert kernels.prefetch() == (kernels.PREFETCH_BYTES if faster == "on" else 0)
        assert said.startswith(f"{faster}, 4 KB ahead (8 rows read 0 MB in ") and said.endswith("; measured now)")
    finally:
        kernels.set_prefetch(0)


@pytest.mark.parametrize("faster", ["tiles", "plain copies"])
def test_one_row_takes_the_stack_on_the_layout_whose_step_was_faster(vlm, faster, monkeypatch):
    """A one-sequence decode step goes through the stack, which reads the weights' tiles or their
    plain copies, whichever made its step faster when the engine was built (here made to win by
    turns); the model with cross-attention, which the stack does not take, reads at one row what
    read faster by the operations' own matmul. Either way the tokens are transformers' own."""
    steps = []

    def timed(dec, stacks):
        steps.append(len(stacks))
        return [1.0, 2.0] if faster == "tiles" else [2.0, 1.0]

    monkeypatch.setattr(decoder, "_one_row_step", timed)
    engine = Engine(vlm, prefix_cache_tokens=0)
    dec = engine.lm_forward
    stack, why = dec.stack(1)
    if vlm.cross_attention:
        assert stack is None and "cross-attention" in why and not steps
        assert "torch's matmul at" in dec.one_row and "measured now" in dec.one_row
        assert not dec.kernels(1).startswith("the layers in one call")
    else:
        assert steps == [2], "the two layouts' steps were timed"
        tiles = faster == "tiles"
        lds = set(stack.lds.tolist())  # each kind of projection's row length: 0 for tiles
        assert (lds == {0}) if tiles else (0 not in lds)
        assert (stack._final[2] == 0) == tiles  # the head's layout too
        ms = "1000.00 ms on the tiles, 2000.00" if tiles else "2000.00 ms on the tiles, 1000.00"
        layout = "row tiles" if tiles else "its kernel on the plain copies"
        assert dec.one_row == f"the stack, reading {layout} (a step {ms} ms on the plain copies; measured now)"
        word = "row tiles (`kernels.Tiles`" if tiles else "the engine's kernel on the plain copy"
        said = "the layers in one call (`kernels.Stack`); q/k/v, o, gate/up, down, head: " + word
        assert dec.kernels(1).startswith(said)
    p, img = prompts(vlm, QUESTIONS[:1]), [image("green")]
    got = engine.generate(p, [img], SamplingParams(max_tokens=8))[0].tokens
    assert got == vlm.generate(p, pixel_values=vlm.processor.views(img[0]), max_new_tokens=8)[0]


def test_repeated_image_reuses_features_and_prefix(vlm):
    eng = Engine(vlm)
    p = prompts(vlm, QUESTIONS[:2])
    first = eng.generate(p[:1], [[image("red")]], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    encoded = eng.stats["encoded_images"]
    assert encoded == 1 and first.cached_tokens == 0
    again = eng.generate(p, [[image("red")], [image("red")]], SamplingParams(max_tokens=8, ignore_eos=True))
    assert eng.stats["encoded_images"] == encoded  # the encoder did not run again
    assert again[0].tokens == first.tokens and again[0].cached_tokens >= len(p[0]) - 16
    if not vlm.cross_attention:  # a different question shares the image's tokens (with cross-attention
        assert again[1].cached_tokens >= vlm.tokens_per_image  # the image is no tokens of the prompt)
    cold = Engine(vlm, prefix_cache_tokens=0, feature_cache=1)
    fresh = cold.generate(p[1:], [[image("red")]], SamplingParams(max_tokens=8, ignore_eos=True))
    assert again[1].tokens == fresh[0].tokens


def test_sampling_seed_top_k_and_stop_strings(vlm):
    eng = Engine(vlm)
    p = prompts(vlm, QUESTIONS[:1]) * 2
    imgs = [[image("green")]] * 2
    hot = SamplingParams(max_tokens=16, temperature=1.5, seed=7, ignore_eos=True)
    a, b = eng.generate(p, imgs, hot)
    assert a.tokens == b.tokens  # same seed, same tokens
    c = eng.generate(p[:1], imgs[:1], dataclasses.replace(hot, seed=8))[0]
    greedy = eng.generate(p[:1], imgs[:1], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert c.tokens != a.tokens or a.tokens != greedy.tokens
    top1 = eng.generate(p[:1], imgs[:1], SamplingParams(max_tokens=16, temperature=1.0, top_k=1, ignore_eos=True))[0]
    assert top1.tokens == greedy.tokens
    nucleus = eng.generate(
        p[:1], imgs[:1], SamplingParams(max_tokens=16, temperature=1.0, top_p=1e-6, ignore_eos=True)
    )[0]
    assert nucleus.tokens == greedy.tokens
    text = greedy.text
    assert len(text) > 4
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = eng.generate(p[:1], imgs[:1], SamplingParams(max_tokens=16, stop=(stop,), ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_limits_cancel_and_errors(vlm):
    eng = Engine(vlm, max_queue=2, max_len=96)
    p = prompts(vlm, QUESTIONS[:1])[0]
    with pytest.raises(PromptTooLong, match="exceeds the context of 96"):
        eng.submit(p, [image("red")], SamplingParams(max_tokens=96))
    with pytest.raises(ValueError, match="1 image blocks but 0 images"):
        eng.submit(p, [], SamplingParams(max_tokens=4))
    r1 = eng.submit(p, [image("red")], SamplingParams(max_tokens=20, ignore_eos=True))
    eng.submit(p, [image("red")], SamplingParams(max_tokens=4))
    with pytest.raises(EngineBusy, match="max_queue 2"):
        eng.submit(p, [image("red")], SamplingParams(max_tokens=4))
    eng.step()
    assert len(eng.running) == 2
    r1.cancel()
    eng.step()
    assert r1.finish_reason == "abort" and len(eng.running) <= 1
    eng.run_until_done()
    assert not eng.running and not eng.waiting
    # an image that cannot be read fails its own request only
    from vlmforge.infer.request import ImageInput

    def broken():
        raise OSError("truncated file")

    bad = eng.submit(p, [ImageInput("x", broken)], SamplingParams(max_tokens=4))
    good = eng.submit(p, [image("blue")], SamplingParams(max_tokens=4))
    eng.run_until_done()
    assert bad.finish_reason == "error" and "truncated file" in bad.error
    assert good.finish_reason in ("stop", "length")


def test_background_thread_and_byte_level_decoding(vlm):
    eng = Engine(vlm).start()
    try:
        p = prompts(vlm, QUESTIONS)
        reqs = [eng.submit(q, [image(c)], SamplingParams(max_tokens=6)) for q, c in zip(p, COLORS)]
        events = list(reqs[0].stream(timeout=60))
        assert events[-1].finish_reason in ("stop", "length")
        assert "".join(e.text for e in events) == reqs[0].text
        for r in reqs:
            r.wait(60)
    finally:
        eng.stop(drain_seconds=5)
    tok = vlm.tokenizer
    table = byte_level_table(tok)
    assert table is not None
    import codecs
    import random

    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 20))]
        d = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = "".join(d.decode(table[i]) for i in ids) + d.decode(b"", final=True)
        assert text == tok.decode(ids, skip_special_tokens=True)
