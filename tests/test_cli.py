import json
import subprocess
import sys

import pytest

from vlmforge.cli import main

VERBS = [["data", "synth"], ["pretrain"], ["train"], ["eval"], ["chat"], ["demo"]]


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: " ".join(v))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([*verb, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_cli_help_does_not_import_torch():
    code = "import sys; from vlmforge.cli import main; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_data_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(SystemExit) as e:
        main(["train", "--train.data", f"[{bad}]", "--model.vision", "x", "--model.lm", "y"])
    assert e.value.code == 2
    assert "bad.json: malformed JSON" in capsys.readouterr().err


def test_synth_train_eval_chat_end_to_end(tmp_path, backbones, capsys, monkeypatch):
    main(["data", "synth", "--task", "shapes", "--n", "8", "--width", "32", "--height", "32", "--out", str(tmp_path)])
    sft = tmp_path / "shapes_sft.json"
    main([
        "train", "--train.stage", "sft", "--train.data", f"[{sft}]", "--train.out", str(tmp_path / "run"),
        "--train.max_steps", "2", "--train.batch_size", "4",
        "--model.vision", str(backbones["vision"]), "--model.lm", str(backbones["lm"]),
    ])  # fmt: skip
    model = tmp_path / "run" / "model"
    capsys.readouterr()
    main(["eval", "--model", str(model), "--data", str(tmp_path / "shapes_qa.json"), "--out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "shapes_qa.json: accuracy" in out and "count" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n"] == len(json.loads((tmp_path / "shapes_qa.json").read_text()))
    assert set(report["per_type"]) <= {"color", "shape", "count", "exist"}
    image = tmp_path / "images" / "shapes_000000.png"
    main(["chat", "--model", str(model), "--image", str(image), "--question", "How many shapes are there?"])
    flagged = capsys.readouterr().out
    assert len(flagged.splitlines()) == 1  # one answer line (an untrained model's may be empty)
    main(["chat", "--model", str(model), "--image", str(image), "How many shapes are there?"])
    assert capsys.readouterr().out == flagged  # the question may also be given positionally
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("What color is the circle?\nHow many shapes?\n"))
    main(["chat", "--model", str(model), "--image", str(image), "--max_new_tokens", "3"])
    assert len(capsys.readouterr().out.splitlines()) == 2
