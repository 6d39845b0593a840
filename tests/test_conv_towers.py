"""Convolutional vision towers (ResNet, ConvNeXt) everywhere a ViT goes: stages as feature layers,
H x W visual tokens in row-major order, every connector, splitting, cross-attention, the feature
store, the engine, save -> from_pretrained, export's refusal, and BatchNorm kept in eval mode."""

import dataclasses
import json

import pytest
import torch

from vlmforge.model.vlm import VLM


def _save_tower(kind: str, path) -> str:
    from transformers import ConvNextConfig, ConvNextImageProcessor, ConvNextModel, ResNetConfig, ResNetModel

    torch.manual_seed(0)
    if kind == "resnet":  # stem 32 -> 8x8, stages 8x8, 4x4, 2x2 at 32 px
        model = ResNetModel(
            ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24], depths=[1, 1, 1], layer_type="basic")
        )
        with torch.no_grad():  # BatchNorm statistics that are not the identity, so a change shows
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 1.5)
    else:  # patchify 4 -> 8x8, then 4x4
        model = ConvNextModel(ConvNextConfig(hidden_sizes=[16, 24], depths=[1, 1], num_stages=2, patch_size=4))
    model.save_pretrained(path)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["resnet", "convnext"])
def conv_cfg(request, model_cfg, tmp_path_factory):
    path = _save_tower(request.param, tmp_path_factory.mktemp(request.param))
    return dataclasses.replace(model_cfg, vision=path)


@pytest.fixture(scope="module")
def resnet_cfg(model_cfg, tmp_path_factory):
    return dataclasses.replace(model_cfg, vision=_save_tower("resnet", tmp_path_factory.mktemp("resnet")))


def test_stage_map_becomes_row_major_tokens(conv_cfg):
    from vlmforge.model.vision import VisionTower

    for layer in (-1, -2):
        tower = VisionTower.from_pretrained(conv_cfg.vision, layer)
        assert tower.convolutional and tower.image_size == 32  # from the saved image processor
        x = torch.randn(2, 3, 32, 32)
        out = tower.model(pixel_values=x, output_hidden_states=True)
        fmap = out.last_hidden_state if layer == -1 else out.hidden_states[layer]  # [2, C, H, W]
        feats = tower(x)
        h, w = tower.grid
        assert fmap.shape == (2, tower.hidden_size, h, w) and feats.shape == (2, h * w, tower.hidden_size)
        torch.testing.assert_close(feats[:, 1 * w + 0], fmap[:, :, 1, 0])  # token i*W + j is row i, column j
        torch.testing.assert_close(feats[:, h * w - 1], fmap[:, :, h - 1, w - 1])
    assert (
        VisionTower.from_pretrained(conv_cfg.vision, -2).num_patches
        > VisionTower.from_pretrained(conv_cfg.vision, -1).num_patches
    )  # an earlier stage is a finer grid
    big = VisionTower.from_pretrained(conv_cfg.vision, -1, image_size=64)
    assert big.num_patches == 4 * VisionTower.from_pretrained(conv_cfg.vision, -1).num_patches
    with pytest.raises(ValueError, match="feature_layer 9 is out of range"):
        VisionTower.from_pretrained(conv_cfg.vision, 9)


@pytest.mark.parametrize("connector", ["mlp", "attention", "perceiver", "pixel_shuffle"])
def test_every_connector_trains_on_the_map(conv_cfg, data_dir, connector):
    from tests.test_model import _batch

    m = VLM.from_backbones(dataclasses.replace(conv_cfg, connector=connector, connector_latents=8, feature_layer=-2))
    grid = m.vision.num_patches
    assert m.tokens_per_image == {"perceiver": 8, "pixel_shuffle": grid // 4}.get(connector, grid)
    b = _batch(m, data_dir, n=2)
    out = m(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b["pixel_values"])
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for p in m.connector.parameters())


def test_splitting_and_cross_attention(conv_cfg, data_dir):
    from tests.test_model import _batch

    for cfg in (
        dataclasses.replace(conv_cfg, split_grid=2),
        dataclasses.replace(conv_cfg, architecture="cross_attention", xattn_every=1),
    ):
        m = VLM.from_backbones(cfg)
        b = _batch(m, data_dir, n=2)
        assert b["pixel_values"].shape[0] == 2 * m.processor.num_views
        out = m(b["input_ids"], b["attention_mask"], b["labels"], pixel_values=b["pixel_values"])
        assert torch.isfinite(out.loss)


def test_save_load_engine_and_export_refusal(conv_cfg, data_dir, tmp_path):
    from vlmforge.data.images import load_image
    from vlmforge.export import ExportError, export

    m = VLM.from_backbones(conv_cfg).eval()
    m.save_pretrained(tmp_path / "m")
    back = VLM.from_pretrained(tmp_path / "m")
    assert type(back.vision.model) is type(m.vision.model) and back.vision.grid == m.vision.grid
    from tests.test_model import _batch

    b = _batch(m, data_dir, n=2)
    with torch.no_grad():
        a = m(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"]).logits
        c = back(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"]).logits
    torch.testing.assert_close(a, c)
    img = load_image(data_dir / "images" / "shapes_000000.png")
    prompt = back.build_prompt("How many shapes are there?")
    ref = back.generate([prompt], pixel_values=back.processor.views(img), max_new_tokens=4, ignore_eos=True)[0]
    from vlmforge.infer.engine import Engine
    from vlmforge.infer.request import SamplingParams

    got = Engine(back).generate([prompt], [[img]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert got.tokens == ref and len(ref) == 4
    with pytest.raises(ExportError, match="convolutional vision tower"):
        export(str(tmp_path / "m"), str(tmp_path / "hf"), "llava-hf")
    assert not (tmp_path / "hf").exists()
    fmt, notes = export(str(tmp_path / "m"), str(tmp_path / "own"), "auto")
    assert fmt == "vlmforge" and "convolutional vision tower" in notes[0]


def test_feature_store_keys_include_the_stage(resnet_cfg, data_dir, tmp_path):
    from vlmforge.cache.build import build, encoder_for, images_of

    images = images_of([data_dir / "shapes_captions.json"])[:6]
    spaces = set()
    for layer in (-1, -2):
        vision, proc, src = encoder_for(encoder=resnet_cfg.vision, feature_layer=layer)
        stats = build(str(tmp_path / "store"), vision, proc, images, "fp32", source=src)
        spaces.add(stats["namespace"])
        assert stats["encoded"] == 6
    assert len(spaces) == 2  # one namespace per stage: never a stale stage's features


def test_frozen_batchnorm_stays_in_eval_mode_while_training(resnet_cfg, data_dir, tmp_path):
    from vlmforge.config import TrainConfig
    from vlmforge.train.loop import train

    m = VLM.from_backbones(resnet_cfg)
    before = {k: v.clone() for k, v in m.vision.state_dict().items() if "running" in k}
    m.vision.requires_grad_(False)  # as every stage freezes it
    m.train()
    assert not m.vision.model.training and m.connector.training
    m.vision.requires_grad_(True)  # a tower that trains follows the model's mode
    assert m.train().vision.model.training
    cfg = TrainConfig(
        stage="sft",
        data=[str(data_dir / "shapes_sft.json")],
        out=str(tmp_path / "run"),
        max_steps=3,
        batch_size=4,
        save_every=2,
        threads=1,
    )
    out = train(cfg, resnet_cfg)
    after = VLM.from_pretrained(out).vision.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, msg=k)
    assert json.loads((out / "config.json").read_text())["model"]["vision"] == resnet_cfg.vision


def test_tiny_resnet_pretrains_with_the_sigmoid_loss_and_loads_as_a_tower(backbones, data_dir, tmp_path):
    """The demo's encoder: a ResNetModel pretrained with SigLIP's loss (phrases scored cell by cell),
    saved with `save_pretrained`, then a vision tower like any Hub checkpoint."""
    from tests.conftest import SMALL
    from transformers import AutoTokenizer

    from vlmforge.data.formats import load_records
    from vlmforge.model.vision import VisionTower
    from vlmforge.recipes.tiny import pretrain_siglip

    spec = dataclasses.replace(
        SMALL,
        vision_kind="resnet",
        conv_embedding=8,
        conv_hidden=[8, 16],
        conv_depths=[1, 1],
        siglip_steps=3,
        siglip_texts=8,
    )
    recs = load_records(data_dir / "shapes_captions.json")
    info = pretrain_siglip(recs, AutoTokenizer.from_pretrained(backbones["tokenizer"]), tmp_path / "v", spec)
    assert info["final_loss"] == info["final_loss"]  # finite, not NaN
    tower = VisionTower.from_pretrained(str(tmp_path / "v"))
    assert type(tower.model).__name__ == "ResNetModel" and tower.convolutional and tower.image_size == 32
    assert tower(torch.zeros(1, 3, 32, 32)).shape == (1, tower.num_patches, 16)


def test_greedy_ctc_merges_repeats_and_drops_blanks():
    from vlmforge.recipes.tiny import greedy_ctc

    # cells: a a _ a b b _ _ c -> "aabc"; all blank -> ""
    path = [1, 1, 0, 1, 2, 2, 0, 0, 3]
    logits = torch.full((2, len(path), 4), -5.0)
    for t, c in enumerate(path):
        logits[0, t, c] = 5.0
    logits[1, :, 0] = 5.0
    assert greedy_ctc(logits.log_softmax(-1), "abc") == ["aabc", ""]


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_the_tower_learns_to_read_beside_the_sigmoid_loss(backbones, data_dir, tmp_path, kind):
    """The reading objective (a CTC head on the last map, column by column) trains with SigLIP's loss
    and is scored on held-out images; a tower that reads one string learns it."""
    from tests.conftest import SMALL
    from transformers import AutoTokenizer

    from vlmforge.data.formats import load_records
    from vlmforge.model.vision import VisionTower
    from vlmforge.recipes.tiny import pretrain_siglip

    spec = dataclasses.replace(
        SMALL,
        vision_kind=kind,
        conv_embedding=8,
        conv_hidden=[8, 16],
        conv_depths=[1, 1],
        siglip_steps=2,
        siglip_texts=8,
        read_steps=40,
        read_batch=8,
        siglip_lr=1e-2,
    )
    texts = load_records(data_dir / "text_sft.json")
    same = [
        dataclasses.replace(texts[0], messages=[texts[0].messages[0], {**texts[0].messages[1], "content": "cab"}])
        for _ in range(20)
    ]
    tok = AutoTokenizer.from_pretrained(backbones["tokenizer"])
    info = pretrain_siglip(load_records(data_dir / "shapes_captions.json"), tok, tmp_path / "v", spec, reading=same)
    assert info["reading_exact"] == 1.0  # one string to learn: the objective reaches it
    assert VisionTower.from_pretrained(str(tmp_path / "v")).hidden_size == (16 if kind == "resnet" else 32)


def test_a_reading_file_with_nothing_to_read_is_refused_before_anything_is_made(data_dir, tmp_path):
    from tests.conftest import SMALL

    from vlmforge.recipes.tiny import pretrain

    multi = data_dir / "shapes_sft.json"  # multi-turn conversations: no (image, transcription) pair
    with pytest.raises(ValueError, match=r"reading files .*shapes_sft.json hold no one-turn image records"):
        pretrain([str(data_dir / "shapes_captions.json")], str(tmp_path / "bb"), SMALL, reading=[str(multi)])
    assert not (tmp_path / "bb").exists()
