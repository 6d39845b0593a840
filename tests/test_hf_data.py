"""Hugging Face `datasets` as a source (`hf:WHERE[:SUBSET][@SPLIT]`): the_cauldron and messages
layouts, save_to_disk folders (and their splits) and parquet files, written here with `datasets`
itself; the records equal the LLaVA file's, images become files, bad rows are named."""

import json

import datasets
import pytest

from vlmforge.data.formats import DataError, load_records
from vlmforge.data.synthetic import synth


@pytest.fixture()
def shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFORGE_IMAGE_DIR", str(tmp_path / "image-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a name that is no folder is looked up as a Hub id: never online
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    synth(tmp_path / "src", "shapes", 3, seed=4, width=32, height=32, conversations="single")
    return load_records(tmp_path / "src" / "shapes_sft.json")


def _cell(record):
    return {"bytes": record.images[0].read_bytes(), "path": record.images[0].name}


def _turns(record):
    return [m["content"].replace("<image>\n", "") for m in record.messages]


def cauldron(records):
    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string")}],
        }
    )
    rows = {
        "images": [[_cell(r)] for r in records],
        "texts": [[dict(zip(("user", "assistant"), _turns(r)))] for r in records],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def messages(records):
    rows = {
        "images": [[_cell(r)] for r in records],
        "messages": [
            [
                {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": q}]},
                {"role": "assistant", "content": [{"type": "text", "text": a}]},
            ]
            for q, a in (_turns(r) for r in records)
        ],
    }
    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "messages": [
                {
                    "role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}],
                }
            ],
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


def test_cauldron_and_messages_layouts_read_as_the_llava_records(shapes, tmp_path):
    cauldron(shapes).save_to_disk(str(tmp_path / "cauldron"))
    messages(shapes).to_parquet(str(tmp_path / "messages.parquet"))
    datasets.DatasetDict({"train": cauldron(shapes[:2]), "test": cauldron(shapes[2:5])}).save_to_disk(
        str(tmp_path / "splits")
    )
    cases = [
        (f"hf:{tmp_path / 'cauldron'}", shapes),
        (f"hf:{tmp_path / 'messages.parquet'}", shapes),
        (f"hf:{tmp_path / 'splits'}", shapes[:2]),
        (f"hf:{tmp_path / 'splits'}@test", shapes[2:5]),
    ]
    for source, want in cases:
        got = load_records(source)
        assert [r.messages for r in got] == [r.messages for r in want], source
        assert [r.images[0].read_bytes() for r in got] == [r.images[0].read_bytes() for r in want], source
        assert got[1].where == f"{source} record 1"
    # the same sources without `hf:` are not data files: the error says what they are and what to write
    (tmp_path / "plain").mkdir()
    for path, hint in (
        (tmp_path / "cauldron", "datasets folder"),
        (tmp_path / "splits", "datasets folder"),
        (tmp_path / "messages.parquet", "parquet file"),
        (tmp_path / "plain", "a folder"),
    ):
        with pytest.raises(DataError, match="hf:") as err:
            load_records(str(path))
        assert str(err.value).startswith(str(path)) and hint in str(err.value)
    # an image is written once, named by its content
    cached = list((tmp_path / "image-cache").iterdir())
    assert len(cached) == len({r.images[0].read_bytes() for r in shapes})


def test_both_layouts_build_the_cache_train_and_evaluate_through_the_cli(shapes, tmp_path, model_cfg, capsys):
    """A the_cauldron dataset (save_to_disk) and a messages dataset (parquet), each through
    `cache build`, `train` from that store and `eval` on the same source, by the command line."""
    from vlmforge.cli import main

    cauldron(shapes).save_to_disk(str(tmp_path / "cauldron"))
    messages(shapes).to_parquet(str(tmp_path / "messages.parquet"))
    for name, source in (
        ("cauldron", f"hf:{tmp_path / 'cauldron'}"),
        ("messages", f"hf:{tmp_path / 'messages.parquet'}"),
    ):
        store, run = tmp_path / f"store-{name}", tmp_path / f"run-{name}"
        main(
            ["cache", "build", "--data", source, "--encoder", model_cfg.vision, "--out", str(store), "--dtype", "fp32"]
        )
        printed = capsys.readouterr().out
        assert json.loads(printed[printed.index("{") : printed.rindex("}") + 1])["unique"] == 3
        main(
            [
                "train",
                "--train.data",
                source,
                "--train.out",
                str(run),
                "--train.batch_size",
                "4",
                "--train.max_steps",
                "2",
                "--train.cache",
                str(store),
                "--model.vision",
                model_cfg.vision,
                "--model.lm",
                model_cfg.lm,
            ]
        )
        assert json.loads((run / "summary.json").read_text())["samples"] == 8
        main(["eval", "--model", str(run / "model"), "--data", source, "--out", str(tmp_path / f"eval-{name}")])
        report = json.loads((tmp_path / f"eval-{name}" / "report.json").read_text())["benchmarks"]
        assert [b["n"] for b in report.values()] == [len(shapes)]


def test_bad_rows_are_named_together_and_a_corrupt_image_is_skipped_by_name(shapes, tmp_path, model_cfg):
    from vlmforge.config import TrainConfig
    from vlmforge.train.loop import train

    ds = cauldron(shapes).to_list()
    ds[1]["texts"] = [{"user": None, "assistant": "x"}]
    ds[3]["texts"] = []
    bad = datasets.Dataset.from_list(ds, features=cauldron(shapes).features)
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError) as e:
        load_records(f"hf:{tmp_path / 'bad'}")
    assert "2 malformed records" in str(e.value) and "record 1" in str(e.value) and "record 3" in str(e.value)
    ds = cauldron(shapes).to_list()
    ds[0]["images"] = [{"bytes": b"not an image", "path": "broken.png"}]
    datasets.Dataset.from_list(ds, features=cauldron(shapes).features).save_to_disk(str(tmp_path / "corrupt"))
    source = f"hf:{tmp_path / 'corrupt'}"
    cfg = TrainConfig(data=[source], out=str(tmp_path / "run"), batch_size=len(ds), max_steps=1)
    train(cfg, model_cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped"] == 1 and f"{source} record 0" in summary["skipped_records"][0]
    with pytest.raises(DataError, match="no dataset|cannot open"):
        load_records(f"hf:{tmp_path / 'nothing-here'}")
