"""`vlmforge merge-lora`: LoRA folded into the LM, same outputs, a plain model on disk."""

import pytest
import torch

from vlmforge.config import TrainConfig
from vlmforge.model.vlm import VLM
from vlmforge.train.stages import apply_stage


def test_merge_lora_gives_the_same_model_without_adapters(model_cfg, data_dir, tmp_path, capsys):
    from test_model import _batch
    from vlmforge.cli import main
    from vlmforge.infer.engine import Engine
    from vlmforge.infer.request import SamplingParams

    torch.manual_seed(0)
    model = VLM.from_backbones(model_cfg)
    apply_stage(model, TrainConfig(stage="sft", lm_mode="lora"))
    with torch.no_grad():  # adapters that change the function (B starts at zero)
        for n, p in model.lm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    model.save_pretrained(tmp_path / "lora")
    adapter = VLM.from_pretrained(tmp_path / "lora")
    main(["merge-lora", "--model", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")])
    n_lora = sum(1 for n, _ in adapter.lm.named_modules() if n.endswith("lora_A"))
    assert n_lora == 2 * 7  # 2 layers x (q k v o gate up down)
    assert f"merged {n_lora} LoRA layers" in capsys.readouterr().out
    assert not (tmp_path / "merged" / "lm_adapter").exists()
    merged = VLM.from_pretrained(tmp_path / "merged")
    assert merged.lm_mode == "full" and not hasattr(merged.lm, "peft_config")
    b = _batch(merged, data_dir)
    with torch.no_grad():
        want = adapter(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"]).logits
        got = merged(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"]).logits
        torch.manual_seed(0)
        plain = VLM.from_backbones(model_cfg).eval()  # the same connector init, no adapters
        base = plain(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert (want - base).abs().max() > 1e-2  # the adapters mattered, so the check is not vacuous
    from PIL import Image

    im = Image.new("RGB", (32, 32), "red")
    p = merged.build_prompt("what is it?", 1)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    same = [Engine(m).generate([p], [[im]], params)[0].tokens for m in (merged, adapter)]
    assert same[0] == same[1]
    with pytest.raises(SystemExit):
        main(["merge-lora", "--model", str(tmp_path / "merged"), "--out", str(tmp_path / "again")])
    assert "no LoRA adapters to merge" in capsys.readouterr().err
