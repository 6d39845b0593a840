"""The vision tower trains as a stage option: frozen, full, its top blocks, or LoRA adapters, for a
ViT and a conv tower; resumed bit for bit; the saved tower is the trained one (adapters folded in);
BatchNorm statistics frozen or trained on purpose; bad settings refused by name before training."""

import dataclasses

import pytest
import torch
from tests.test_conv_towers import _save_tower
from tests.test_train import _cfg, _losses

from vlmforge.model.vlm import VLM
from vlmforge.train.loop import train


@pytest.fixture(scope="module", params=["vit", "resnet"])
def tower_cfg(request, model_cfg, tmp_path_factory):
    if request.param == "vit":
        return model_cfg
    return dataclasses.replace(model_cfg, vision=_save_tower("resnet", tmp_path_factory.mktemp("resnet")))


def _vision(model_dir) -> dict:
    return {k: v.clone() for k, v in VLM.from_pretrained(model_dir).vision.model.state_dict().items()}


@pytest.mark.parametrize("mode", ["full", "top", "lora"])
def test_each_mode_trains_what_it_says_and_saves_the_trained_tower(tower_cfg, data_dir, tmp_path, mode):
    fresh = VLM.from_backbones(tower_cfg)
    blocks = fresh.vision.blocks
    out = train(_cfg(data_dir, tmp_path / mode, max_steps=3, vision_mode=mode, vision_lr=1e-2), tower_cfg)
    before = {k: v for k, v in fresh.vision.model.state_dict().items()}
    after = _vision(out)
    assert set(after) == set(before)  # LoRA adapters folded in: the folder holds a plain tower
    changed = {k for k in before if not torch.equal(before[k], after[k]) and "running" not in k}
    # the bottom block's names: frozen in `top` (vision_top 1), trained in `full` and `lora`
    bottom_prefix = next(n for n, m in fresh.vision.model.named_modules() if m is blocks[0])
    top_prefix = next(n for n, m in fresh.vision.model.named_modules() if m is blocks[-1])
    assert any(k.startswith(top_prefix) for k in changed), mode
    assert any(k.startswith(bottom_prefix) for k in changed) == (mode != "top"), mode
    history = VLM.from_pretrained(out).history[-1]
    assert history["vision_mode"] == (mode if mode != "top" else "top 1")


def test_lora_tower_saved_model_answers_as_the_trained_one(tower_cfg, data_dir, tmp_path):
    """The saved (merged) tower computes what the tower with its adapters computed."""
    from vlmforge.config import TrainConfig
    from vlmforge.train.stages import apply_stage

    torch.manual_seed(0)
    model = VLM.from_backbones(tower_cfg)
    apply_stage(model, TrainConfig(vision_mode="lora", lora_r=4))
    with torch.no_grad():  # adapters that are not zero, so that merging them shows
        for n, p in model.vision.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    pixels = torch.randn(2, 3, model.vision.image_size, model.vision.image_size)
    with torch.no_grad():
        expected = model.vision(pixels)
        base = VLM.from_backbones(tower_cfg).vision(pixels)
    assert not torch.allclose(expected, base, atol=1e-4)
    model.save_pretrained(tmp_path / "m")
    loaded = VLM.from_pretrained(tmp_path / "m")
    assert not loaded.vision.has_lora
    with torch.no_grad():
        torch.testing.assert_close(loaded.vision(pixels), expected, rtol=1e-4, atol=1e-5)


def _cut_and_resume(cfg, model_cfg, monkeypatch):
    """Train with `cfg`, interrupted (Ctrl-C) in the forward of step 4, then resumed: the model folder."""
    calls, original = {"n": 0}, VLM.forward

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(VLM, "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, model_cfg)
    monkeypatch.setattr(VLM, "forward", original)
    return train(cfg, model_cfg, resume=True)


@pytest.mark.parametrize("mode", ["top", "lora"])  # full: the BatchNorm test below
def test_interrupted_tower_training_resumes_exactly(model_cfg, data_dir, tmp_path, monkeypatch, mode):
    kw = dict(max_steps=6, save_every=2, vision_mode=mode, vision_warmup=0.5)
    reference = VLM.from_pretrained(train(_cfg(data_dir, tmp_path / "full", **kw), model_cfg))
    resumed = VLM.from_pretrained(_cut_and_resume(_cfg(data_dir, tmp_path / "cut", **kw), model_cfg, monkeypatch))
    assert _losses(tmp_path / "cut") == pytest.approx(_losses(tmp_path / "full"), abs=1e-6)
    for (n, a), b in zip(reference.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_batchnorm_statistics_frozen_or_trained_and_resumed(data_dir, tmp_path, monkeypatch, model_cfg, bn):
    cfg = dataclasses.replace(model_cfg, vision=_save_tower("resnet", tmp_path / "resnet"))
    stats = {k: v.clone() for k, v in VLM.from_backbones(cfg).vision.model.state_dict().items() if "running" in k}
    kw = dict(max_steps=4, save_every=2, vision_mode="full", vision_bn=bn)
    full = train(_cfg(data_dir, tmp_path / "full", **kw), cfg)
    after = _vision(full)
    moved = [k for k in stats if not torch.equal(stats[k], after[k])]
    assert bool(moved) == (bn == "train")
    resumed = _vision(_cut_and_resume(_cfg(data_dir, tmp_path / "cut", **kw), cfg, monkeypatch))
    for k, v in after.items():  # the statistics too: a checkpoint keeps the moving ones
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=1e-6, msg=k)


def test_bad_tower_settings_are_refused_by_name_before_training(model_cfg, data_dir, tmp_path):
    from vlmforge.config import TrainConfig
    from vlmforge.train.stages import apply_stage

    model = VLM.from_backbones(model_cfg)
    depth = len(model.vision.blocks)
    with pytest.raises(ValueError, match="unknown vision_mode 'half'.*frozen, full, top, lora"):
        apply_stage(model, TrainConfig(vision_mode="half"))
    with pytest.raises(ValueError, match=f"vision_top {depth + 1}: this vision tower has {depth} blocks"):
        apply_stage(model, TrainConfig(vision_mode="top", vision_top=depth + 1))
    with pytest.raises(ValueError, match="vision_mode full trains the whole vision tower.*stale"):
        train(_cfg(data_dir, tmp_path / "c", vision_mode="full", cache=str(tmp_path / "store")), model_cfg)
    assert not (tmp_path / "c" / "checkpoint").exists()

    class NoLayers(torch.nn.Module):  # a tower of no linear or convolution layer: nothing for LoRA
        def forward(self, x):
            return x

    model.vision.model = NoLayers()
    with pytest.raises(ValueError, match="NoLayers has no linear or convolution layers for LoRA"):
        model.vision.set_trainable("lora")
