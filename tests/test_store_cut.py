"""The feature store serves the frozen part of a tower whose top blocks train: it keeps the states
below the cut, training runs only the blocks above from them, and the result equals training from
pixels (a ViT and a conv tower); the cut is in the store's key, and a store of another cut is
refused by name."""

import dataclasses

import pytest
import torch
from tests.test_cache import _cfg, _files, _losses
from tests.test_conv_towers import _save_tower

from vlmforge.cache.build import build, encoder_for, images_of
from vlmforge.cache.store import CacheError, FeatureStore
from vlmforge.model.vision import VisionTower
from vlmforge.model.vlm import VLM
from vlmforge.train.loop import train


@pytest.fixture(scope="module", params=["vit", "resnet"])
def tower_cfg(request, model_cfg, tmp_path_factory):
    if request.param == "vit":
        return model_cfg
    return dataclasses.replace(model_cfg, vision=_save_tower("resnet", tmp_path_factory.mktemp("resnet")))


def _build_cut(store, model_cfg, data, top, **kw):
    vision, proc, src = encoder_for(encoder=model_cfg.vision, feature_layer=model_cfg.feature_layer)
    return build(store, vision, proc, images_of(data), source=src, top=top, num_workers=0, progress=False, **kw)


def _tower_params(model_dir) -> dict:
    return dict(VLM.from_pretrained(model_dir).vision.model.named_parameters())


def test_the_top_blocks_get_the_same_gradients_from_states_as_from_pixels(tower_cfg):
    torch.manual_seed(0)
    tower = VLM.from_backbones(tower_cfg).vision
    depth = len(tower.blocks)
    pixels = torch.randn(3, 3, tower.image_size, tower.image_size)
    for top in range(1, depth + 1):
        tower.set_trainable("top", top)
        grads = []
        for run in ("pixels", "states"):
            tower.zero_grad()
            feats = tower(pixels) if run == "pixels" else tower.above(tower.below(pixels, top).detach(), top)
            feats.square().mean().backward()
            grads.append({n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for n, g in grads[0].items():
            torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6, msg=f"top {top}: {n}")
        # what lies below the cut is frozen, and the states do not depend on the blocks above it
        bottom = tuple(f"{n}." for n in tower.bottom(top))
        assert not any(n.startswith(bottom) for n in grads[0])


@pytest.mark.slow
def test_top_blocks_train_from_the_store_as_from_pixels(tower_cfg, data_dir, tmp_path):
    data = _files(data_dir, "shapes_sft.json")
    top = len(VLM.from_backbones(tower_cfg).vision.blocks) - 1  # all blocks but the lowest
    stats = _build_cut(tmp_path / "store", tower_cfg, data, top, dtype="fp32", shard_size=16)
    assert stats["encoded"] == stats["unique"] > 0 and stats["vision_top"] == top
    kw = dict(stage="sft", vision_mode="top", vision_top=top, vision_lr=1e-2)
    train(_cfg(data, tmp_path / "pix", **kw), tower_cfg)
    train(_cfg(data, tmp_path / "store-run", cache=str(tmp_path / "store"), **kw), tower_cfg)
    assert _losses(tmp_path / "store-run") == pytest.approx(_losses(tmp_path / "pix"), rel=1e-5, abs=1e-6)
    pix, stored = _tower_params(tmp_path / "pix" / "model"), _tower_params(tmp_path / "store-run" / "model")
    fresh = dict(VLM.from_backbones(tower_cfg).vision.model.named_parameters())
    assert any(not torch.equal(pix[n], fresh[n]) for n in pix)  # the top blocks trained
    for n, p in pix.items():
        torch.testing.assert_close(stored[n], p, rtol=1e-4, atol=1e-5, msg=n)  # moves of ~3e-2

    # the store's key is the weights below the cut: the trained model still finds it, with the
    # images it lacks encoded to states on the fly, and the whole tower's key has changed
    trained = VLM.from_pretrained(tmp_path / "store-run" / "model").vision
    start = VLM.from_backbones(tower_cfg).vision
    assert trained.settings(top) == start.settings(top) and trained.settings() != start.settings()
    both = _files(data_dir, "shapes_sft.json", "text_sft.json")
    init = str(tmp_path / "store-run" / "model")
    train(_cfg(both, tmp_path / "again-pix", max_steps=2, **kw), init=init)
    train(
        _cfg(both, tmp_path / "again", max_steps=2, cache=str(tmp_path / "store"), cache_missing="encode", **kw),
        init=init,
    )
    assert _losses(tmp_path / "again") == pytest.approx(_losses(tmp_path / "again-pix"), rel=1e-5, abs=1e-6)


def test_a_store_of_another_cut_is_refused_by_name_before_training(model_cfg, data_dir, tmp_path):
    data = _files(data_dir, "shapes_sft.json")
    store = tmp_path / "store"
    _build_cut(store, model_cfg, data, 1)
    info = FeatureStore(store).info()["namespaces"]
    assert [ns["settings"]["vision_top"] for ns in info] == [1]
    with pytest.raises(
        CacheError,
        match=r"holds the states below the top 1 blocks \(vision_top 1\) of this encoder, "
        r"not the states below the top 2 blocks.*--vision_top 2",
    ):
        train(_cfg(data, tmp_path / "two", stage="sft", vision_mode="top", vision_top=2, cache=str(store)), model_cfg)
    with pytest.raises(CacheError, match=r"holds the states below the top 1 blocks.*not the tower's output features"):
        train(_cfg(data, tmp_path / "frozen", cache=str(store)), model_cfg)
    for run in ("two", "frozen"):
        assert not (tmp_path / run / "checkpoint").exists() and not (tmp_path / run / "model").exists()
    # and the other way round: a store of the tower's output is not read as states
    _build_cut(store, model_cfg, data, 0)
    with pytest.raises(
        CacheError,
        match=r"holds the tower's output features and the states below the top 1 blocks "
        r".*not the states below the top 2 blocks",
    ):
        train(_cfg(data, tmp_path / "two", stage="sft", vision_mode="top", vision_top=2, cache=str(store)), model_cfg)


def test_bad_cuts_are_refused_by_name(model_cfg, data_dir, tmp_path):
    from vlmforge.cache.build import build_store

    depth = len(VisionTower.from_pretrained(model_cfg.vision).blocks)
    with pytest.raises(ValueError, match=f"vision_top {depth + 1}: this vision tower has {depth} blocks"):
        build_store(
            _files(data_dir, "shapes_sft.json"), str(tmp_path / "s"), encoder=model_cfg.vision, vision_top=depth + 1
        )
    assert not (tmp_path / "s").exists()
    below = VisionTower.from_pretrained(model_cfg.vision, feature_layer=-2)
    with pytest.raises(ValueError, match="feature_layer -2 lies below the top 1 blocks"):
        below.below(torch.zeros(1, 3, below.image_size, below.image_size), 1)
    with pytest.raises(ValueError, match="vision_mode full trains the whole vision tower.*vision_mode top"):
        train(
            _cfg(_files(data_dir, "shapes_sft.json"), tmp_path / "full", vision_mode="full", cache=str(tmp_path / "s")),
            model_cfg,
        )


@pytest.mark.parametrize("mode", ["lora", "top"])
def test_the_cross_attention_architecture_trains_the_tower_too(model_cfg, data_dir, tmp_path, mode):
    """Flamingo-style layers read the same tower: it trains there in each mode, and its top block
    from the store's states as from pixels."""
    cfg = dataclasses.replace(model_cfg, architecture="cross_attention", xattn_every=1)
    data = _files(data_dir, "shapes_sft.json")
    kw = dict(stage="sft", vision_mode=mode, vision_lr=1e-2, max_steps=3)
    out = train(_cfg(data, tmp_path / "pix", **kw), cfg)
    fresh, trained = VLM.from_backbones(cfg).vision, VLM.from_pretrained(out).vision
    top_prefix = next(n for n, m in fresh.model.named_modules() if m is fresh.blocks[-1])
    changed = {n for n, p in trained.model.named_parameters() if not torch.equal(p, fresh.model.get_parameter(n))}
    assert any(n.startswith(top_prefix) for n in changed), mode
    if mode == "top":
        _build_cut(tmp_path / "store", cfg, data, 1, dtype="fp32")
        train(_cfg(data, tmp_path / "store-run", cache=str(tmp_path / "store"), **kw), cfg)
        assert _losses(tmp_path / "store-run") == pytest.approx(_losses(tmp_path / "pix"), rel=1e-5, abs=1e-6)
