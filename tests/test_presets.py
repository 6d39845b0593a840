"""Presets and `vlmforge plan`: the arithmetic checked by hand for LLaVA-1.5."""

import json

import pytest

from vlmforge.presets import PRESETS, get_preset, plan


def test_plan_matches_a_hand_calculation_for_llava_15(tmp_path, capsys):
    from vlmforge.cli import main

    # CLIP ViT-L/14-336: 24 blocks of 4·1024² + 2·1024·4096, patch embedding 3·14²·1024; 24² patches
    vision = 24 * (4 * 1024**2 + 2 * 1024 * 4096) + 3 * 14**2 * 1024
    assert vision == 302_592_000
    # Vicuna-7B: 32 layers of q, k, v, o (4096² each, no GQA) + gate, up, down (4096 x 11008)
    n = 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    assert n + 2 * 32000 * 4096 == 6_738_149_376  # the published 6.74B
    mlp = (1024 * 4096 + 4096) + (4096 * 4096 + 4096)  # vlmforge's 2-layer MLP connector
    length = 576 + 30  # visual tokens + caption tokens
    align = 2 * (2 * n * length + 2 * 32 * length**2 * 4096) + 3 * 2 * 32000 * 4096 * 25 + 6 * mlp * 576
    length2 = 576 + 150
    sft = 2 * (2 * n * length2 + 2 * 32 * length2**2 * 4096) + 3 * 2 * 32000 * 4096 * 100 + 6 * mlp * 576
    encoder = 2 * vision * 576
    total = 600_000 * (align + encoder) + 1_000_000 * (sft + encoder)
    hours = total / (989e12 * 0.4) / 3600

    r = plan("llava-1.5", (600_000, 1_000_000), "h100", 2.5, 0.4, 8)
    assert r["visual_tokens_per_image"] == 576 and r["params"]["connector"] == mlp
    assert r["params"]["vision"] == vision and r["params"]["lm_non_embedding"] == n
    assert r["stages"]["align"]["flops_per_sample"] == align and r["stages"]["sft"]["flops_per_sample"] == sft
    assert r["without_feature_cache"]["gpu_hours_per_run"] == pytest.approx(hours)
    assert r["without_feature_cache"]["dollars_per_run"] == pytest.approx(hours * 2.5)
    # LoRA r=16 on 7 projections per layer: r x (in + out)
    lora = 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert r["stages"]["sft"]["trainable_params"] == mlp + lora
    # two epochs of stage 2 and 3 runs sharing one store: the store encodes each image once
    r2 = plan("llava-1.5", (600_000, 1_000_000), epochs=(1.0, 2.0), runs=3)
    saved = r2["without_feature_cache"]["flops_per_run"] - r2["with_feature_cache"]["flops_per_run"]
    assert saved == pytest.approx((600_000 + 2_000_000) * encoder - (600_000 + 1_000_000) * encoder / 3)

    main(["plan", "--preset", "llama3-v", "--data-sizes", "600000", "1000000", "--out", str(tmp_path / "p.json")])
    text = capsys.readouterr().out
    assert "visual tokens per image 729" in text and "under $500: yes" in text and "GPU-hours" in text
    assert json.loads((tmp_path / "p.json").read_text())["under_500_dollars"] is True


def test_presets_list_and_errors(capsys):
    from vlmforge.cli import main

    main(["presets"])
    out = capsys.readouterr().out
    for name in ("llama3-v", "idefics2", "llava-1.5", "smol", "tiny"):
        assert name in out
    assert "64 tokens/image" in out and "perceiver" in out  # idefics2's resampler
    main(["presets", "--show", "llama3-v"])
    assert "google/siglip-so400m-patch14-384" in capsys.readouterr().out
    assert get_preset("idefics2").model_config().connector_latents == 64
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        plan("gpt5")
    with pytest.raises(ValueError, match="unknown gpu"):
        plan("smol", gpu="tpu")
    for flag, values in (("--data-sizes", ["1"]), ("--epochs", ["1", "2", "3"]), ("--image", ["640"])):
        with pytest.raises(SystemExit) as e:  # a pair per flag, checked by its type before any arithmetic
            main(["plan", flag, *values])
        err = capsys.readouterr().err
        assert e.value.code == 2 and flag[2:].replace("-", "_") in err and "2 elements" in err, err
    assert set(PRESETS) == {"llama3-v", "idefics2", "llava-1.5", "smol", "tiny"}
