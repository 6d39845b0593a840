import dataclasses
import json

from conftest import SMALL
from vlmforge.config import DemoConfig
from vlmforge.demo import run


def test_demo_end_to_end_small_with_the_feature_cache(tmp_path, capsys):
    base = DemoConfig()
    cfg = DemoConfig(
        out=str(tmp_path / "demo"), n_shapes=48, n_text=8, n_test=8, spec=SMALL,
        align=dataclasses.replace(base.align, max_steps=2, batch_size=8),
        sft=dataclasses.replace(base.sft, max_steps=2, batch_size=8),
    )  # fmt: skip
    summary = run(cfg)
    out = tmp_path / "demo"
    assert list(summary["phase_seconds"]) == ["data", "backbones", "cache", "align", "sft", "model", "eval"]
    state = json.loads((out / "state.json").read_text())
    assert state["phases"]["cache"]["result"]["encoded"] == state["phases"]["cache"]["result"]["unique"] > 0
    # both stages trained from the store, with the encoder released
    for stage in ("align", "sft"):
        run_cfg = json.loads((out / stage / "run_config.json").read_text())["train"]
        assert run_cfg["cache"] == str(out / "cache") and run_cfg["cache_dtype"] == "fp16"
    assert (out / "model" / "vision" / "model.safetensors").is_file()
    assert 0.0 <= summary["scores"]["shapes"]["accuracy"] <= 1.0 and len(summary["samples"]) == 3
    assert "vlmforge demo summary" in capsys.readouterr().out
    # a second run continues: every phase is reported as done earlier
    again = run(cfg)
    assert again["phases_done_earlier"] == ["data", "backbones", "cache", "align", "sft", "model", "eval"]
