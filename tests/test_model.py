import pytest
import torch

from vlmforge.data.formats import load_records
from vlmforge.model.connectors import CONNECTORS, build_connector
from vlmforge.model.vision import vision_core
from vlmforge.model.vlm import VLM


def _batch(model, data_dir, n=3):
    from vlmforge.data.collate import VQADataset, collate

    recs = load_records(data_dir / "shapes_sft.json")[:n]
    ds = VQADataset(recs, model.prompts, model.processor)
    return collate([ds[i] for i in range(n)], model.tokenizer.pad_token_id)


@pytest.mark.parametrize("name", sorted(CONNECTORS))
def test_connector_shapes(name):
    c = build_connector(name, 32, 48, layers=2, heads=4)
    x = torch.randn(3, 16, 32)  # [N, P, Dv]
    assert c(x).shape == (3, c.num_tokens(16), 48)


@pytest.mark.parametrize("patches", [16, 64, 144])
def test_connector_token_counts(patches):
    x = torch.randn(2, patches, 32)  # [N, P, Dv]
    counts = {"linear": patches, "mlp": patches, "attention": patches, "pixel_shuffle": patches // 4}
    for name, n in counts.items():
        assert build_connector(name, 32, 48)(x).shape == (2, n, 48), name
    for latents in (64, 16):  # the perceiver emits its latents, whatever the number of patches
        c = build_connector("perceiver", 32, 48, latents=latents, layers=2)
        assert c.num_tokens(patches) == latents and c(x).shape == (2, latents, 48)
    c = build_connector("pixel_shuffle", 32, 48, factor=4)
    assert c(x).shape == (2, patches // 16, 48)


def test_pixel_shuffle_groups_neighbouring_patches_and_refuses_odd_grids():
    c = build_connector("pixel_shuffle", 2, 8)
    c.proj = torch.nn.Identity()
    x = torch.arange(16 * 2, dtype=torch.float32).view(1, 16, 2)  # a 4 x 4 grid, 2 channels
    out = c(x)  # [1, 4, 8]: each token the 2 x 2 block of patches, row-major
    torch.testing.assert_close(out[0, 0], torch.cat([x[0, 0], x[0, 1], x[0, 4], x[0, 5]]))
    torch.testing.assert_close(out[0, 3], torch.cat([x[0, 10], x[0, 11], x[0, 14], x[0, 15]]))
    with pytest.raises(ValueError, match="17 patch tokens are not a square grid.*pooled"):
        c(torch.randn(1, 17, 2))
    with pytest.raises(ValueError, match="9 patch tokens"):
        c.num_tokens(9)  # 3 x 3 does not divide by 2


@pytest.mark.parametrize("connector", sorted(CONNECTORS))
def test_every_connector_with_image_splitting(model_cfg, data_dir, connector):
    import dataclasses

    cfg = dataclasses.replace(model_cfg, connector=connector, split_grid=2, connector_latents=8)
    m = VLM.from_backbones(cfg)
    per_view = {"perceiver": 8, "pixel_shuffle": 4}.get(connector, 16)
    assert m.tokens_per_view == per_view and m.tokens_per_image == 5 * per_view  # 4 crops + the whole image
    b = _batch(m, data_dir, n=2)
    assert int((b["input_ids"] == m.image_token_id).sum()) == 2 * m.tokens_per_image
    out = m(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b["pixel_values"])
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for p in m.connector.parameters())


def test_module_shapes(model, data_dir):
    b = _batch(model, data_dir)
    feats = model.encode_images(b["pixel_values"])
    assert b["pixel_values"].shape == (3, 3, 32, 32)
    assert feats.shape == (3, model.vision.num_patches, model.vision.hidden_size) == (3, 16, 32)
    vis = model.image_embeds(image_features=feats)
    assert vis.shape == (3, model.tokens_per_image, 64)
    out = model(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"])
    assert out.logits.shape == (*b["input_ids"].shape, len(model.tokenizer))
    lossy = model(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b["pixel_values"])
    assert lossy.n_tokens == int((b["labels"][:, 1:] != -100).sum()) > 0
    assert torch.isfinite(lossy.loss)


def test_placeholder_count_mismatch_names_both_numbers(model, data_dir):
    b = _batch(model, data_dir)
    with pytest.raises(ValueError, match=r"placeholder tokens \(48\).*2 images x 16 tokens = 32"):
        model(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"][:2])
    with pytest.raises(ValueError, match="48 image placeholder tokens in the input but no images"):
        model(b["input_ids"], b["attention_mask"])
    with pytest.raises(ValueError, match="image_features must be"):
        model(b["input_ids"], b["attention_mask"], image_features=torch.randn(3, 16, 7))


def test_pixels_and_precomputed_features_give_identical_logits(model, data_dir):
    b = _batch(model, data_dir)
    with torch.no_grad():
        a = model(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"]).logits
        feats = model.encode_images(b["pixel_values"])
        c = model(b["input_ids"], b["attention_mask"], image_features=feats).logits
    assert torch.equal(a, c)


@pytest.mark.parametrize("connector", sorted(CONNECTORS))
@pytest.mark.parametrize("lm_mode", ["full", "lora"])
def test_save_and_from_pretrained_round_trip(model_cfg, data_dir, tmp_path, connector, lm_mode):
    import dataclasses

    from vlmforge.config import TrainConfig
    from vlmforge.train.stages import apply_stage

    torch.manual_seed(0)
    model = VLM.from_backbones(dataclasses.replace(model_cfg, connector=connector))
    apply_stage(model, TrainConfig(stage="sft", lm_mode=lm_mode))
    with torch.no_grad():  # move the weights away from their initial values
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    model.eval()
    b = _batch(model, data_dir)
    with torch.no_grad():
        before = model(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"]).logits
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "lm_adapter").is_dir() == (lm_mode == "lora")
    loaded = VLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        after = loaded(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"]).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert loaded.config.connector == connector and loaded.lm_mode == lm_mode


def test_batched_generation_equals_one_by_one(model, data_dir):
    from vlmforge.data.images import load_image

    recs = load_records(data_dir / "shapes_qa.json")[:4]
    images = [load_image(r.images[0]) for r in recs]
    questions = ["What color is the circle?", "How many shapes are there?", "Is there a red square?", "Describe it."]
    pixels = torch.stack([model.processor(im) for im in images])
    prompts = [model.build_prompt(q) for q in questions]
    assert len({len(p) for p in prompts}) > 1  # different lengths, so left padding is exercised
    batched = model.generate(prompts, pixel_values=pixels, max_new_tokens=6)
    single = [model.generate([p], pixel_values=pixels[i : i + 1], max_new_tokens=6)[0] for i, p in enumerate(prompts)]
    assert batched == single


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a vlmforge model"):
        VLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model": ')  # truncated
    with pytest.raises(ValueError, match=r"config.json: corrupt model config"):
        VLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')  # a transformers folder
    with pytest.raises(ValueError, match=r"config.json: not a vlmforge model config"):
        VLM.from_pretrained(tmp_path)
    from vlmforge.config import ModelConfig

    with pytest.raises(ValueError, match="cannot load a vision encoder"):
        VLM.from_backbones(ModelConfig(vision=str(tmp_path / "missing"), lm=str(tmp_path / "missing")))


def test_pooled_embedding_adds_one_visual_token(model_cfg, data_dir):
    import dataclasses

    m = VLM.from_backbones(dataclasses.replace(model_cfg, vision_pooled=True)).eval()
    assert m.tokens_per_image == m.vision.num_patches + 1
    b = _batch(m, data_dir, n=2)
    assert int((b["input_ids"] == m.image_token_id).sum()) == 2 * m.tokens_per_image
    with torch.no_grad():
        feats = m.encode_images(b["pixel_values"])
        pooled = m.vision.model(pixel_values=b["pixel_values"]).pooler_output
    torch.testing.assert_close(feats[:, 0], pooled)
    assert torch.isfinite(m(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b["pixel_values"]).loss)


def test_the_attention_pool_head_runs_only_for_the_pooled_token(model_cfg, data_dir, tmp_path):
    """SigLIP's head pools the patches into one embedding; without `vision_pooled` nothing reads it,
    so the tower does not run it (the features are the same), and its weights are still saved."""
    import dataclasses

    b = _batch(VLM.from_backbones(model_cfg), data_dir, n=2)
    for pooled in (False, True):
        m = VLM.from_backbones(dataclasses.replace(model_cfg, vision_pooled=pooled)).eval()
        core = vision_core(m.vision.model)
        calls = []
        core.head.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        with torch.no_grad():
            feats = m.encode_images(b["pixel_values"])
            states = core.post_layernorm(
                core.encoder(inputs_embeds=core.embeddings(b["pixel_values"])).last_hidden_state
            )
        torch.testing.assert_close(feats[:, int(pooled) :], states)
        assert len(calls) == int(pooled), (pooled, len(calls))
        if not pooled:
            m.save_pretrained(tmp_path / "m")  # the head's weights go with the tower all the same
            torch.testing.assert_close(
                vision_core(VLM.from_pretrained(tmp_path / "m").vision.model).head.state_dict(), core.head.state_dict()
            )


def _xattn(model_cfg, **kw):
    import dataclasses

    torch.manual_seed(0)
    return VLM.from_backbones(dataclasses.replace(model_cfg, architecture="cross_attention", **kw)).eval()


def test_cross_attention_with_zero_gates_is_exactly_the_text_only_lm(model_cfg, data_dir):
    m = _xattn(model_cfg, xattn_every=1)
    assert m.sequence_tokens_per_image == 0 and m.tokens_per_image == 16
    assert len(m.connector.layers) == len(m.causal_lm.get_decoder().layers)
    b = _batch(m, data_dir)
    assert int((b["input_ids"] == m.image_token_id).sum()) == 0  # no visual tokens in the sequence
    assert int((b["input_ids"] == m.image_start_id).sum()) == 3  # only the <image></image> markers
    with torch.no_grad():
        vlm = m(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"]).logits
        text_only = m.causal_lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        assert m.connector.context is None  # cleared after the forward pass
        assert torch.equal(vlm, text_only)
        for layer in m.connector.layers:  # open the gates: now the image matters
            layer.gate_attn.fill_(1.0)
        a = m(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"]).logits
        c = m(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"].flip(0)).logits
    assert not torch.allclose(a, text_only) and not torch.allclose(a, c)


def test_cross_attention_trains_in_align_splits_images_generates_and_round_trips(model_cfg, data_dir, tmp_path):
    from vlmforge.config import TrainConfig
    from vlmforge.train.stages import apply_stage

    m = _xattn(model_cfg, xattn_every=2, split_grid=2, connector="perceiver", connector_latents=4)
    assert len(m.connector.layers) == 1 and m.tokens_per_image == 5 * 4
    apply_stage(m, TrainConfig(stage="align"))
    m.train()
    b = _batch(m, data_dir, n=2)
    out = m(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b["pixel_values"])
    out.loss.backward()
    gates = [layer.gate_attn for layer in m.connector.layers]
    assert all(g.grad is not None for g in gates) and all(p.grad is None for p in m.causal_lm.parameters())
    with pytest.raises(ValueError, match="2 images x 5 views = 10 views, but 5 were given"):
        m(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"][:5])
    m.zero_grad()
    apply_stage(m, TrainConfig(stage="sft", lm_mode="lora"))  # LoRA on the LM, the bridge trains too
    m(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b["pixel_values"]).loss.backward()
    lora = [p for n, p in m.lm.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora) and all(g.grad is not None for g in gates)
    m.eval()
    with torch.no_grad():  # the feature-store seam: precomputed features give the same logits
        by_pixels = m(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"]).logits
        feats = m.encode_images(b["pixel_values"])
        assert torch.equal(by_pixels, m(b["input_ids"], b["attention_mask"], image_features=feats).logits)
    with torch.no_grad():
        for layer in m.connector.layers:
            layer.gate_attn.fill_(0.5)
            layer.gate_ffn.fill_(0.5)
    from vlmforge.data.images import load_image

    recs = load_records(data_dir / "shapes_qa.json")[:3]
    pixels = torch.cat([m.processor.views(load_image(r.images[0])) for r in recs])  # [3 * 5, 3, S, S]
    prompts = [m.build_prompt(q) for q in ("What color is the circle?", "How many shapes are there?", "Hi")]
    batched = m.generate(prompts, pixel_values=pixels, max_new_tokens=5)
    views = [pixels[5 * i : 5 * (i + 1)] for i in range(3)]
    single = [m.generate([p], pixel_values=v, max_new_tokens=5)[0] for p, v in zip(prompts, views)]
    assert batched == single
    with torch.no_grad():
        before = m(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"]).logits
    m.save_pretrained(tmp_path / "x")
    loaded = VLM.from_pretrained(tmp_path / "x")
    assert loaded.config.architecture == "cross_attention"
    with torch.no_grad():
        after = loaded(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"]).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_image_splitting_names_each_view_with_a_separator_token(model_cfg, data_dir):
    import dataclasses

    from vlmforge.data.prompts import IMAGE_PAD, view_tokens

    m = VLM.from_backbones(dataclasses.replace(model_cfg, split_grid=2))
    seps = view_tokens(2)
    assert seps == ["<row_1_col_1>", "<row_1_col_2>", "<row_2_col_1>", "<row_2_col_2>", "<global_img>"]
    ids = m.build_prompt("How many shapes are there?")
    text = m.tokenizer.convert_ids_to_tokens(ids)
    starts = [text.index(s) for s in seps]
    assert starts == sorted(starts)  # crops row-major, then the whole image
    pad = m.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    for a, b in zip(starts, starts[1:] + [text.index("</image>")]):
        assert ids[a + 1 : b] == [pad] * m.tokens_per_view  # each view's own placeholders
    b = _batch(m, data_dir, n=2)
    assert torch.isfinite(m(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b["pixel_values"]).loss)
