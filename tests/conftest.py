"""Shared fixtures: tiny synthetic data and tiny backbones, made once per test session, offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from vlmforge.config import ModelConfig, TinySpec  # noqa: E402

SMALL = TinySpec(
    image_size=32,
    vision_kind="vit",  # the path of real SigLIP checkpoints; conv towers have tests of their own
    patch_size=8,
    vision_hidden=32,
    vision_layers=2,
    vision_heads=2,
    text_hidden=32,
    text_layers=1,
    text_len=16,
    lm_hidden=64,
    lm_layers=2,
    lm_heads=2,
    lm_intermediate=128,
    vocab_size=300,
    siglip_steps=2,
    siglip_batch=16,
    read_steps=3,
    lm_steps=2,
    lm_batch=8,
)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from vlmforge.data.synthetic import synth

    d = tmp_path_factory.mktemp("data")
    synth(d, "shapes", 48, seed=0, width=32, height=32, conversations="multi")  # multi-turn label masks
    synth(d, "text", 8, seed=0, width=48, height=32)
    return d


@pytest.fixture(scope="session")
def backbones(data_dir, tmp_path_factory):
    from vlmforge.recipes.tiny import pretrain

    out = tmp_path_factory.mktemp("backbones")
    files = [data_dir / f for f in ("shapes_captions.json", "shapes_sft.json", "text_captions.json", "text_sft.json")]
    return pretrain([str(f) for f in files], out, SMALL, seed=0)


@pytest.fixture(scope="session")
def model_cfg(backbones) -> ModelConfig:
    return ModelConfig(vision=str(backbones["vision"]), lm=str(backbones["lm"]), connector="mlp")


@pytest.fixture()
def model(model_cfg):
    import torch

    from vlmforge.model.vlm import VLM

    torch.manual_seed(0)
    return VLM.from_backbones(model_cfg).eval()
