import dataclasses
import json

from conftest import SMALL
from vlmforge.config import DemoConfig
from vlmforge.data.synthetic import question_type
from vlmforge.recipes.demo import run


def test_demo_end_to_end_small_with_the_feature_cache(tmp_path, capsys):
    base = DemoConfig()
    cfg = DemoConfig(
        out=str(tmp_path / "demo"),
        n_shapes=48,
        n_text=8,
        n_test=8,
        n_other=4,
        spec=SMALL,
        train_sizes=["80x64", "64x80", "96x96"],
        n_shapes_other=12,
        align=dataclasses.replace(base.align, max_steps=2, batch_size=8, log_every=1),
        sft=dataclasses.replace(base.sft, max_steps=2, batch_size=8, log_every=1),
        sft_warm=2,
    )
    summary = run(cfg)
    out = tmp_path / "demo"
    assert list(summary["phase_seconds"]) == ["data", "backbones", "cache", "align", "warm", "sft", "model", "eval"]
    state = json.loads((out / "state.json").read_text())
    assert state["phases"]["cache"]["result"]["encoded"] == state["phases"]["cache"]["result"]["unique"] > 0
    # both stages trained from the store, with the encoder released
    for stage in ("align", "warm", "sft"):
        run_cfg = json.loads((out / stage / "run_config.json").read_text())["train"]
        assert run_cfg["cache"] == str(out / "cache") and run_cfg["cache_dtype"] == "fp16"
    assert (out / "model" / "vision" / "model.safetensors").is_file()
    assert 0.0 <= summary["scores"]["shapes"]["accuracy"] <= 1.0
    assert summary["matmul_gflops"] > 0.1
    assert summary["targets"]["text"] == 0.80 and isinstance(summary["targets_met"]["text"], bool)
    # three shapes samples of three question types, then the text one
    assert [s["task"] for s in summary["samples"]] == ["shapes"] * 3 + ["text"]
    assert len({question_type(s["question"]) for s in summary["samples"][:3]}) == 3
    # held out at other sizes, each scored and together; the extra training canvases were used
    for size in ("96x64", "64x96", "128x128"):
        assert (out / "eval" / f"shapes_{size}" / "predictions.jsonl").is_file()
        assert summary["scores"][f"shapes_{size}"]["n"] > 0
    assert summary["scores"]["shapes_other_sizes"]["n"] == sum(
        summary["scores"][f"shapes_{s}"]["n"] for s in ("96x64", "64x96", "128x128")
    )
    sft_data = json.loads((out / "sft" / "run_config.json").read_text())["train"]["data"]
    assert any("train_80x64" in f for f in sft_data) and len(sft_data) == 5
    assert all(isinstance(s["right"], bool) for s in summary["samples"])
    printed = capsys.readouterr().out
    assert "GFLOP/s on 2 threads" in printed
    assert "vlmforge demo summary" in printed and f"report: {out / 'report.html'}" in printed
    page = (out / "report.html").read_text()
    tasks = ("shapes", "text", "shapes_96x64", "shapes_64x96", "shapes_128x128")
    answered = sum(summary["scores"][t]["n"] for t in tasks)
    assert page.count("<tr class='q ") == answered  # every held-out answer, right or wrong
    assert page.count("<polyline") == 3 and "data:image/png;base64," in page and "model card: stage sft" in page
    # a second run, from the command line with the same settings as a YAML file, continues: every
    # phase is reported as done earlier
    import yaml

    from vlmforge.cli import main

    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    main(["demo", "--config", str(tmp_path / "demo.yaml")])
    again = json.loads((out / "summary.json").read_text())
    assert again["phases_done_earlier"] == ["data", "backbones", "cache", "align", "warm", "sft", "model", "eval"]
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out


def test_demo_sizes_are_checked():
    import pytest

    from vlmforge.recipes.demo import _size

    assert _size("96x64") == (96, 64)
    with pytest.raises(ValueError, match="'96by64' is not WIDTHxHEIGHT"):
        _size("96by64")
    with pytest.raises(ValueError, match="at least 16 pixels"):
        _size("8x64")
