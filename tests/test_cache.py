import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from vlmforge.cache.build import build, encoder_for, images_of
from vlmforge.cache.store import CacheError, FeatureReader, FeatureStore
from vlmforge.config import TrainConfig
from vlmforge.model.vlm import VLM
from vlmforge.train.loop import train


def _files(data_dir, *names):
    return [str(data_dir / n) for n in names]


def _build(store, model_cfg, data, **kw):
    split = kw.pop("split_grid", 0)
    vision, proc, src = encoder_for(
        encoder=model_cfg.vision, feature_layer=model_cfg.feature_layer, resize=model_cfg.resize, split_grid=split
    )
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    return build(store, vision, proc, images_of(data), source=src, **kw)


def _features(store) -> dict:
    """Every stored feature by content key, over all namespaces."""
    out = {}
    for ns, _ in FeatureStore(store).namespaces():
        r = FeatureReader(ns)
        for key, (name, row) in r.index.items():
            out[(ns.id, key)] = r._shard(name)[row].clone()
    return out


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _cfg(data, out, **kw):
    base = dict(
        stage="align",
        data=data,
        out=str(out),
        batch_size=8,
        lr=3e-3,
        max_steps=4,
        epochs=10,
        warmup=0.1,
        save_every=100,
        log_every=1,
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("split_grid", [0, 2])
def test_training_from_the_cache_matches_training_from_pixels(model_cfg, data_dir, tmp_path, split_grid):
    cfg_model = dataclasses.replace(model_cfg, split_grid=split_grid)
    data = _files(data_dir, "shapes_sft.json")
    stats = _build(tmp_path / "store", cfg_model, data, dtype="fp32", shard_size=16, split_grid=split_grid)
    assert stats["encoded"] == stats["unique"] > 0
    view_shape = FeatureStore(tmp_path / "store").info()["namespaces"][0]["view_shape"]
    assert view_shape[0] == (5 if split_grid else 1)  # crops + whole image cached per view
    for stage in ("align", "sft"):
        train(_cfg(data, tmp_path / f"pix-{stage}", stage=stage), cfg_model)
        train(_cfg(data, tmp_path / f"cache-{stage}", stage=stage, cache=str(tmp_path / "store")), cfg_model)
        pix, cached = _losses(tmp_path / f"pix-{stage}"), _losses(tmp_path / f"cache-{stage}")
        assert len(pix) == 4
        assert cached == pytest.approx(pix, rel=1e-5, abs=1e-6)
    # the encoder was released during training, yet the saved model has it, equal to the source
    saved = VLM.from_pretrained(tmp_path / "cache-sft" / "model")
    fresh = VLM.from_backbones(cfg_model)
    for a, b in zip(saved.vision.parameters(), fresh.vision.parameters()):
        assert torch.equal(a, b)


def test_missing_features_fail_before_training_or_are_encoded(model_cfg, data_dir, tmp_path):
    store = tmp_path / "store"
    _build(store, model_cfg, _files(data_dir, "shapes_captions.json"), dtype="fp32")
    both = _files(data_dir, "shapes_captions.json", "text_captions.json")
    with pytest.raises(CacheError, match=r"8 of 56 images have no features.*text_captions\.json record"):
        train(_cfg(both, tmp_path / "fail", cache=str(store)), model_cfg)
    assert not (tmp_path / "fail" / "checkpoint").exists()
    train(_cfg(both, tmp_path / "enc", cache=str(store), cache_missing="encode"), model_cfg)
    train(_cfg(both, tmp_path / "pix"), model_cfg)
    assert _losses(tmp_path / "enc") == pytest.approx(_losses(tmp_path / "pix"), rel=1e-5, abs=1e-6)


def test_a_key_change_misses_and_build_fills_only_what_is_missing(model_cfg, data_dir, tmp_path):
    store = tmp_path / "store"
    data = _files(data_dir, "text_captions.json")
    first = _build(store, model_cfg, data)
    assert first["encoded"] == 8
    assert _build(store, model_cfg, data)["encoded"] == 0  # everything already there
    # another feature layer, resize policy, split grid or stored dtype: a different namespace
    for change in ({"feature_layer": -2}, {"resize": "squash"}):
        other = dataclasses.replace(model_cfg, **change)
        with pytest.raises(CacheError, match="no features for this encoder and these settings"):
            train(_cfg(data, tmp_path / f"t{len(change)}", cache=str(store)), other)
        assert _build(store, other, data)["encoded"] == 8
    assert _build(store, model_cfg, data, split_grid=2)["encoded"] == 8
    assert _build(store, model_cfg, data, dtype="bf16")["encoded"] == 8
    assert len(FeatureStore(store).namespaces()) == 5
    # other weights: the encoder's fingerprint changes
    vision, proc, _ = encoder_for(encoder=model_cfg.vision)
    with torch.no_grad():
        next(vision.parameters()).add_(1e-3)
    vision._fingerprint.clear()
    assert FeatureStore(store).find(vision, proc) is None
    # an edited image gets a new content key: only it is encoded again, the stale entry is not served
    from PIL import Image

    recs = json.loads((data_dir / "text_captions.json").read_text())
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    img = copy / recs[0]["image"]
    Image.new("RGB", (48, 32), (250, 0, 0)).save(img)
    reader = FeatureStore(store).reader(*encoder_for(encoder=model_cfg.vision)[:2], dtype="fp16")
    assert not reader.has(img) and reader.has(copy / recs[1]["image"])
    assert _build(store, model_cfg, [str(copy / "text_captions.json")])["encoded"] == 1


def test_duplicate_images_are_stored_once(model_cfg, data_dir, tmp_path):
    recs = json.loads((data_dir / "text_captions.json").read_text())
    dup = tmp_path / "dup"
    shutil.copytree(data_dir, dup)
    for i, r in enumerate(list(recs)):  # every image also under a second name
        shutil.copy(dup / r["image"], dup / f"copy{i}.png")
        recs.append({**r, "id": f"copy{i}", "image": f"copy{i}.png"})
    (dup / "both.json").write_text(json.dumps(recs))
    stats = _build(tmp_path / "store", model_cfg, [str(dup / "both.json")])
    assert (stats["images"], stats["unique"], stats["encoded"]) == (16, 8, 8)
    reader = FeatureStore(tmp_path / "store").reader(*encoder_for(encoder=model_cfg.vision)[:2])
    assert torch.equal(reader.get(dup / recs[0]["image"]), reader.get(dup / "copy0.png"))


def _killed_build(store, vision_path, data):
    """Child process: build, SIGKILL itself right after the second shard is written."""
    from vlmforge.cache.build import build, encoder_for, images_of

    done = []

    def on_shard(name):
        done.append(name)
        if len(done) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    vision, proc, src = encoder_for(encoder=vision_path)
    build(store, vision, proc, images_of(data), shard_size=8, num_workers=0, progress=False, on_shard=on_shard)


@pytest.mark.multiproc
def test_a_killed_build_resumes_and_ends_identical(model_cfg, data_dir, tmp_path):
    data = _files(data_dir, "shapes_captions.json")
    whole = _build(tmp_path / "whole", model_cfg, data, shard_size=8)
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=_killed_build, args=(str(tmp_path / "killed"), model_cfg.vision, data))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    assert "unfinished_build" in json.dumps(FeatureStore(tmp_path / "killed").info())
    assert FeatureStore(tmp_path / "killed").info()["namespaces"][0]["unfinished_build"]
    resumed = _build(tmp_path / "killed", model_cfg, data, shard_size=8)
    assert resumed["already_cached"] == 16 and resumed["encoded"] == whole["encoded"] - 16
    a, b = _features(tmp_path / "whole"), _features(tmp_path / "killed")
    assert a.keys() == b.keys() and len(a) == 48
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert FeatureStore(tmp_path / "killed").verify(progress=False)["bad"] == []


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_shard_is_detected_never_read_and_rebuilt(model_cfg, data_dir, tmp_path, damage):
    store = tmp_path / "store"
    data = _files(data_dir, "shapes_captions.json")
    _build(store, model_cfg, data, shard_size=16, dtype="fp32")
    before = _features(store)
    shard = sorted((next(store.glob("ns-*")) / "shards").glob("*.safetensors"))[1]
    raw = bytearray(shard.read_bytes())
    if damage == "flip":
        raw[-5] ^= 0xFF  # inside the feature values: the file still parses
    shard.write_bytes(bytes(raw if damage == "flip" else raw[: len(raw) // 2]))
    report = FeatureStore(store).verify(progress=False)
    assert [b["shard"] for b in report["bad"]] == [str(shard)]
    with pytest.raises(CacheError, match="corrupted or truncated shard"):
        train(_cfg(data, tmp_path / "t", cache=str(store), max_steps=20), model_cfg)
    stats = _build(store, model_cfg, data, shard_size=16, dtype="fp32")
    assert stats["dropped_shards"] == [shard.stem] and stats["encoded"] == 16
    assert FeatureStore(store).verify(progress=False)["bad"] == []
    after = _features(store)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.multiproc
def test_two_process_build_equals_one_process_build(model_cfg, data_dir, tmp_path):
    data = _files(data_dir, "shapes_captions.json", "text_captions.json")
    _build(tmp_path / "one", model_cfg, data, shard_size=8, dtype="fp32")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "vlmforge",
        "cache",
        "build",
        "--encoder",
        model_cfg.vision,
        "--data",
        *data,
        "--out",
        str(tmp_path / "two"),
        "--shard_size",
        "8",
        "--dtype",
        "fp32",
        "--num_workers",
        "0",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"processes": 2' in proc.stdout
    one, two = _features(tmp_path / "one"), _features(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 56
    # the same shards and batches on each side; only the thread count may differ
    assert all(torch.allclose(one[k], two[k], rtol=1e-5, atol=1e-6) for k in one)


def test_bad_images_are_skipped_and_listed(model_cfg, data_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    recs = json.loads((copy / "text_captions.json").read_text())
    (copy / recs[0]["image"]).write_bytes(b"not a png")
    (copy / recs[1]["image"]).unlink()
    data = [str(copy / "text_captions.json")]
    stats = _build(tmp_path / "store", model_cfg, data)
    assert stats["encoded"] == 6 and len(stats["skipped"]) == 2
    assert any("cannot decode" in s for s in stats["skipped"]) and any("not found" in s for s in stats["skipped"])
    with pytest.raises(ValueError, match=r"cannot be read, e\.g\. .*text_000001\.png: image file not found"):
        _build(tmp_path / "store2", model_cfg, data, bad_images="fail")
    shutil.copy(data_dir / recs[1]["image"], copy / recs[1]["image"])
    with pytest.raises(ValueError, match=r"text_000000\.png: cannot decode image"):
        _build(tmp_path / "store2", model_cfg, data, bad_images="fail")


def test_store_refuses_foreign_folders(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a feature store"):
        FeatureStore(tmp_path / "x", create=True)
    with pytest.raises(CacheError, match="no feature store here"):
        FeatureStore(tmp_path / "nothing")


def test_cli_build_info_verify(model_cfg, data_dir, tmp_path, capsys):
    from vlmforge.cli import main

    data = _files(data_dir, "text_captions.json", "text_sft.json")
    main(
        [
            "cache",
            "build",
            "--encoder",
            model_cfg.vision,
            "--data",
            *data,
            "--out",
            str(tmp_path / "s"),
            "--num_workers",
            "0",
        ]
    )
    assert '"encoded": 8' in capsys.readouterr().out
    main(["cache", "info", "--store", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert "8 images in 1 shards" in out and "fp16" in out
    main(["cache", "verify", "--store", str(tmp_path / "s")])
    assert "1 shards checked, 0 bad" in capsys.readouterr().out
    shard = next((tmp_path / "s").glob("ns-*/shards/*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(SystemExit):
        main(["cache", "verify", "--store", str(tmp_path / "s")])
    assert "BAD" in capsys.readouterr().out
