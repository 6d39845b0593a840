"""Streaming a corpus (`--train.streaming`): windows read back exactly from a saved position, ranks
read disjoint parts, a streamed run killed and resumed ends with the weights of an uninterrupted
one, and what cannot be streamed is refused by name."""

import json
import math

import datasets
import pytest
import torch

from vlmforge.config import TrainConfig
from vlmforge.data.formats import DataError, load_records
from vlmforge.data.stream import RecordStream
from vlmforge.model.vlm import VLM
from vlmforge.train.checkpoint import read_checkpoint
from vlmforge.train.loop import train


@pytest.fixture()
def shards(data_dir, tmp_path, monkeypatch):
    """The shapes sft records as 3 parquet shards written by `datasets` (LLaVA layout, image cells
    holding the PNG bytes): an `hf:` folder source."""
    monkeypatch.setenv("VLMFORGE_IMAGE_DIR", str(tmp_path / "image-cache"))
    records = load_records(data_dir / "shapes_sft.json")
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
        }
    )
    names = {"user": "human", "assistant": "gpt"}
    rows = [
        {
            "id": r.id,
            "image": {"bytes": r.images[0].read_bytes(), "path": r.images[0].name},
            "conversations": [{"from": names[m["role"]], "value": m["content"]} for m in r.messages],
        }
        for r in records
    ]
    (tmp_path / "corpus").mkdir()
    for k in range(3):
        part = rows[k * 16 : (k + 1) * 16]
        datasets.Dataset.from_list(part, features=features).to_parquet(str(tmp_path / "corpus" / f"part-{k}.parquet"))
    return f"hf:{tmp_path / 'corpus'}", records


def _ids(windows, n):
    return [(pos, [r.id for r in recs]) for pos, recs in (next(windows) for _ in range(n))]


def test_windows_come_back_from_a_saved_position_and_ranks_read_apart(shards):
    source, records = shards
    stream = RecordStream([source])
    first = _ids(stream.windows(10), 7)  # 48 records: windows of 10, 10, 10, 10, 8, then epoch 1
    assert [len(ids) for _, ids in first] == [10, 10, 10, 10, 8, 10, 10]
    assert sorted(i for _, ids in first[:5] for i in ids) == sorted(r.id for r in records)
    assert [p["epoch"] for p, _ in first] == [0, 0, 0, 0, 0, 1, 1]
    assert first[5][1] == first[0][1]  # the next epoch reads the corpus again from its start
    for k in (1, 3, 4, 6):  # from the position saved at the start of window k, the same windows again
        again = _ids(RecordStream([source]).windows(10, first[k][0]), len(first) - k)
        assert [ids for _, ids in again] == [ids for _, ids in first[k:]]
        assert [(p["epoch"], p["window"], p["row"]) for p, _ in again] == [
            (p["epoch"], p["window"], p["row"]) for p, _ in first[k:]
        ]
    # the records are the LLaVA file's, image cells written once as files
    streamed = next(RecordStream([source]).windows(48))[1]
    assert [r.messages for r in streamed] == [r.messages for r in records]
    assert [r.images[0].read_bytes() for r in streamed] == [r.images[0].read_bytes() for r in records]
    # two ranks (3 shards: every other row each) read disjoint halves that cover the corpus
    halves = [[r.id for r in next(RecordStream([source], rank, 2).windows(100))[1]] for rank in (0, 1)]
    assert not set(halves[0]) & set(halves[1]) and sorted(halves[0] + halves[1]) == sorted(r.id for r in records)


def _cfg(source, out, **kw):
    base = dict(
        stage="sft",
        data=[source],
        out=str(out),
        batch_size=4,
        lr=3e-3,
        lm_lr=3e-3,
        max_steps=16,
        warmup=0.1,
        save_every=3,
        log_every=1,
        seed=0,
        streaming=True,
        stream_window=20,
        threads=1,
    )
    return TrainConfig(**{**base, **kw})


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_streamed_run_stopped_and_resumed_equals_an_uninterrupted_one(shards, model_cfg, tmp_path, monkeypatch):
    """16 steps of 4 records from windows of 20 over 48 records: the run crosses windows and an
    epoch. Interrupted during step 8 (Ctrl-C: the checkpoint of step 7 is written), or stopped
    after step 6 (the periodic checkpoint), then resumed: the same losses and, bit for bit, the
    same weights as the run that never stopped."""
    source, _ = shards
    full = VLM.from_pretrained(train(_cfg(source, tmp_path / "full"), model_cfg))
    calls, original = {"n": 0}, VLM.forward

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(VLM, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(source, tmp_path / "cut"), model_cfg)
    monkeypatch.setattr(VLM, "forward", original)
    assert read_checkpoint(tmp_path / "cut" / "checkpoint")["progress"]["step"] == 7
    train(_cfg(source, tmp_path / "six", stop_at=6), model_cfg)
    position = read_checkpoint(tmp_path / "six" / "checkpoint")["progress"]["data"]
    assert position == [{"at": position[0]["at"], "taken": 1}] and position[0]["at"]["window"] == 1  # 24 records
    for out in ("cut", "six"):
        resumed = VLM.from_pretrained(train(_cfg(source, tmp_path / out), model_cfg, resume=True))
        assert _losses(tmp_path / out) == pytest.approx(_losses(tmp_path / "full"), abs=1e-6)
        for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
            assert torch.equal(a, b), (out, name)


@pytest.mark.multiproc
def test_a_streamed_run_sigkilled_and_resumed_ends_with_the_same_weights(shards, model_cfg, tmp_path):
    """SIGKILL of a streamed `vlmforge train` (no handler runs: only the last periodic checkpoint
    stands), then --resume: bit for bit the weights of the uninterrupted run (30 steps: windows of
    16 over 48 records, several epochs)."""
    import sys

    from test_train import sigkill_and_resume

    source, _ = shards

    def cmd(out, *extra):
        return [
            sys.executable,
            "-m",
            "vlmforge",
            "train",
            "--train.stage",
            "sft",
            "--train.data",
            source,
            "--train.out",
            str(out),
            "--train.batch_size",
            "8",
            "--train.max_steps",
            "30",
            "--train.streaming",
            "true",
            "--train.stream_window",
            "16",
            "--train.save_every",
            "2",
            "--train.threads",
            "1",
            "--train.lr",
            "3e-3",
            "--model.vision",
            model_cfg.vision,
            "--model.lm",
            model_cfg.lm,
            *extra,
        ]

    sigkill_and_resume(cmd, tmp_path)


def test_what_cannot_be_streamed_is_refused_by_name(data_dir, model_cfg, tmp_path):
    with pytest.raises(DataError, match=r"shapes_sft.json: a streamed corpus is a Hugging Face dataset"):
        train(_cfg(str(data_dir / "shapes_sft.json"), tmp_path / "a"), model_cfg)
    with pytest.raises(ValueError, match="--train.streaming needs --train.max_steps"):
        train(TrainConfig(data=["hf:x"], out=str(tmp_path / "b"), streaming=True), model_cfg)


@pytest.mark.multiproc
def test_two_ranks_stream_their_own_parts_and_resume_where_each_stopped(shards, backbones, tmp_path, capsys):
    """torchrun, 2 ranks (DDP), streamed: stopped after step 3 and resumed on 2 ranks, the run ends
    with the losses and weights of the run never stopped; the checkpoint holds each rank's place
    and refuses to resume on 1 rank."""
    from safetensors.torch import load_file

    from test_distributed import train as cli
    from test_distributed import train_here

    source, _ = shards
    args = lambda out: [
        "--train.data",
        source,
        "--train.batch_size",
        "4",
        "--train.log_every",
        "1",  # noqa: E731
        "--train.max_steps",
        "6",
        "--train.stream_window",
        "8",
        "--train.streaming",
        "true",
        "--train.threads",
        "1",
        "--train.out",
        str(out),
        "--model.vision",
        str(backbones["vision"]),
        "--model.lm",
        str(backbones["lm"]),
        "--nproc",
        "2",
    ]
    full, cut = tmp_path / "full", tmp_path / "cut"
    for r in (cli(*args(full)), cli(*args(cut), "--train.stop_at", "3")):
        assert r.returncode == 0, r.stderr[-3000:]
    position = read_checkpoint(cut / "checkpoint")["progress"]["data"]
    assert [p["taken"] for p in position] == [1, 1]  # each rank: 3 batches of 4 = window 1 (of 8), batch 1
    with pytest.raises(SystemExit) as e:  # on 1 rank, in this process
        train_here(*args(cut)[:-2], "--resume", "true")
    assert e.value.code != 0 and "saved on 2 ranks; resume it on 2" in capsys.readouterr().err
    r = cli(*args(cut), "--resume", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(cut) == pytest.approx(_losses(full), abs=1e-6)
    a, b = (load_file(out / "model" / "connector.safetensors") for out in (full, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cache_build_streams_the_corpus_and_training_reads_its_features(shards, model_cfg, tmp_path, capsys):
    """`cache build --streaming true` over the hf: corpus, then a streamed run from the store with
    the encoder released; a store that lacks an image stops the run naming it, the finished steps
    kept in a checkpoint."""
    from vlmforge.cache.store import FeatureStore
    from vlmforge.cli import main

    source, records = shards
    store = tmp_path / "store"
    main(
        [
            "cache",
            "build",
            "--data",
            source,
            "--streaming",
            "true",
            "--encoder",
            model_cfg.vision,
            "--out",
            str(store),
            "--dtype",
            "fp32",
        ]
    )
    ns = FeatureStore(store).info()["namespaces"][0]
    assert ns["images"] == len({r.images[0].read_bytes() for r in records})
    capsys.readouterr()
    train(_cfg(source, tmp_path / "run", max_steps=4, cache=str(store)), model_cfg)
    assert f"features: from {store} as the stream's records come ({ns['images']} images" in capsys.readouterr().out
    assert all(math.isfinite(x) for x in _losses(tmp_path / "run")) and len(_losses(tmp_path / "run")) == 4
    # a store of the first shard only: the first window (16 records, that shard) trains, the
    # second meets an image the store lacks and stops the run naming it, the 4 steps kept
    half = tmp_path / "half"
    main(
        [
            "cache",
            "build",
            "--data",
            f"{source}/part-0.parquet",
            "--streaming",
            "true",
            "--encoder",
            model_cfg.vision,
            "--out",
            str(half),
            "--dtype",
            "fp32",
        ]
    )
    with pytest.raises(DataError, match=r"\.png: the feature store has no features of this image"):
        train(_cfg(source, tmp_path / "halfrun", stream_window=16, save_every=100, cache=str(half)), model_cfg)
    assert read_checkpoint(tmp_path / "halfrun" / "checkpoint")["progress"]["step"] == 4
