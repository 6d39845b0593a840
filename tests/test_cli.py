import json
import subprocess
import sys

import pytest

from vlmforge.cli import COMMANDS, main


def _verbs(table: dict, path: tuple = ()) -> list[list[str]]:
    return [v for k, e in table.items() for v in (_verbs(e, (*path, k)) if isinstance(e, dict) else [[*path, k]])]


VERBS = _verbs(COMMANDS)  # every verb of the table


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: " ".join(v))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([*verb, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_a_verb_prints_what_it_made(tmp_path, capsys):
    main(["data", "synth", "--out", str(tmp_path), "--n", "2", "--width", "32", "--height", "32"])
    printed = capsys.readouterr().out
    for kind in ("captions", "sft", "qa"):
        assert f"{kind}: {tmp_path}" in printed
    assert len(json.loads((tmp_path / "shapes_qa.json").read_text())) > 0


def test_a_verb_that_takes_a_config_has_its_fields_as_flags(tmp_path, capsys):
    """`bench data` runs `run(cfg: DataBench)`: the fields are the flags, their docstrings the help;
    the config's own checks refuse a bad value by name before any work."""
    with pytest.raises(SystemExit):
        main(["bench", "data", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--multiples" in shown and "corpus sizes in caps." in shown and "--stream_batches" in shown
    with pytest.raises(SystemExit) as e:
        main(["bench", "cache", "--presets", "tiny", "nope", "--work", str(tmp_path / "w")])
    assert e.value.code == 2 and "unknown preset 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


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


def _wrong_folders(root, backbones) -> dict:
    """Folders vlmforge cannot use as a vision encoder, a causal LM or a model: each made here."""
    import os

    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    small = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64)
    BertModel(BertConfig(hidden_size=16, **small)).save_pretrained(root / "bert")
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(root / "gpt2")
    os.remove(root / "gpt2" / "model.safetensors")  # the weights are gone
    for name, text in (("junk", None), ("corrupt", "{not json"), ("unknown", '{"model_type": "nosuchmodel"}')):
        (root / name).mkdir()
        (root / name / ("config.json" if text else "notes.txt")).write_text(text or "hello")
    vision, lm = str(backbones["vision"]), str(backbones["lm"])
    return {  # (vision, lm, tokenizer) -> what the one line must say
        (str(root / "bert"), lm, lm): "a 'bert' checkpoint (BertModel) takes no images",
        (lm, lm, lm): "a 'llama' checkpoint (LlamaModel) takes no images",
        (str(root / "junk"), lm, lm): "cannot load a vision encoder",
        (str(root / "corrupt"), lm, lm): "cannot load a vision encoder",
        (str(root / "unknown"), lm, lm): "nosuchmodel",
        (vision, str(root / "gpt2"), lm): "cannot load a causal LM",
        (vision, lm, vision): "cannot load a tokenizer",
    }


def test_checkpoints_vlmforge_cannot_use_are_one_line_errors(tmp_path, backbones, data_dir, capsys):
    cases = _wrong_folders(tmp_path, backbones)
    capsys.readouterr()
    for (vision, lm, tokenizer), message in cases.items():
        with pytest.raises(SystemExit) as e:
            main(
                [
                    "train",
                    "--train.data",
                    str(data_dir / "shapes_sft.json"),
                    "--train.out",
                    str(tmp_path / "run"),
                    "--model.vision",
                    vision,
                    "--model.lm",
                    lm,
                    "--model.tokenizer",
                    tokenizer,
                ]
            )
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert e.value.code == 2 and "Traceback" not in err, err
        assert len(lines) == 1 and message in lines[0], (vision, lm, err)
        named = {"LM": lm, "tokenizer": tokenizer}
        assert next((v for k, v in named.items() if k in message), vision) in lines[0]
    for folder in ("junk", "bert"):  # not a vlmforge model folder
        with pytest.raises(SystemExit) as e:
            main(["chat", "--model", str(tmp_path / folder), "--question", "hi"])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert e.value.code == 2 and "Traceback" not in err and len(lines) == 1 and str(tmp_path / folder) in lines[0]
    assert not (tmp_path / "run" / "model").exists()


def test_synth_train_eval_chat_end_to_end(tmp_path, backbones, capsys, monkeypatch):
    main(["data", "synth", "--task", "shapes", "--n", "8", "--width", "32", "--height", "32", "--out", str(tmp_path)])
    sft = tmp_path / "shapes_sft.json"
    main(
        [
            "train",
            "--train.stage",
            "sft",
            "--train.data",
            f"[{sft}]",
            "--train.out",
            str(tmp_path / "run"),
            "--train.max_steps",
            "2",
            "--train.batch_size",
            "4",
            "--model.vision",
            str(backbones["vision"]),
            "--model.lm",
            str(backbones["lm"]),
        ]
    )
    model = tmp_path / "run" / "model"
    capsys.readouterr()
    main(
        [
            "eval",
            "--model",
            str(model),
            "--data",
            str(tmp_path / "shapes_qa.json"),
            "--out",
            str(tmp_path / "r"),
            "--html",
            str(tmp_path / "r.html"),
        ]
    )
    out = capsys.readouterr().out
    assert "| shapes_qa | all | accuracy |" in out and "  - count: " in out
    report = json.loads((tmp_path / "r" / "report.json").read_text())["benchmarks"]["shapes_qa"]
    assert report["n"] == len(json.loads((tmp_path / "shapes_qa.json").read_text()))
    assert set(report["breakdown"]) <= {"color", "shape", "count", "exist"}
    assert len((tmp_path / "r" / "shapes_qa" / "predictions.jsonl").read_text().splitlines()) == report["n"]
    page = (tmp_path / "r.html").read_text()
    assert page.count("<tr class='q ") == report["n"] and page.count("data:image/png;base64,") == 8  # 8 images
    image = tmp_path / "images" / "shapes_000000.png"
    main(["chat", "--model", str(model), "--image", str(image), "--question", "How many shapes are there?"])
    flagged = capsys.readouterr().out
    assert len(flagged.splitlines()) == 1  # one answer line (an untrained model's may be empty)
    main(["chat", "--model", str(model), "--image", str(image), "How many shapes are there?"])
    assert capsys.readouterr().out == flagged  # the question may also be given positionally
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("What color is the circle?\nHow many shapes?\n"))
    main(["chat", "--model", str(model), "--image", str(image), "--max_new_tokens", "3"])
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_chat_names_a_bad_image_before_loading_the_model(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    for image in (bad, tmp_path / "missing.png"):
        with pytest.raises(SystemExit) as e:  # no model folder either: the image is refused first
            main(["chat", "--model", str(tmp_path / "no-model"), "--image", str(image), "--question", "hi"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err and str(image) in err and "no-model" not in err, err


def test_eval_html_without_out_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "m"),
                "--data",
                str(tmp_path / "qa.json"),
                "--html",
                str(tmp_path / "p.html"),
            ]
        )
    assert e.value.code == 2 and "--html needs --out DIR" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "p.html").exists()
