"""torchrun with 2 CPU processes (gloo), DDP and FSDP2: the same global batch gives the same run;
a checkpoint of 2 ranks resumes on 1; a rank that fails stops the job, named, instead of hanging
the others; a rank whose micro-batch was all bad images does not hang the others either."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.multiproc


def train(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vlmforge", "train", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def train_here(*args):
    """`vlmforge train` in this process (a single-process run: no interpreter to start)."""
    from vlmforge.cli import main

    main(["train", *args])


def common(data, backbones, out):
    return [
        "--train.data",
        str(data),
        "--train.batch_size",
        "4",
        "--train.log_every",
        "1",
        "--train.stage",
        "sft",
        "--train.lm_mode",
        "lora",
        "--train.max_steps",
        "4",
        "--train.threads",
        "1",
        "--train.out",
        str(out),
        "--model.vision",
        str(backbones["vision"]),
        "--model.lm",
        str(backbones["lm"]),
    ]


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def with_bad_images(data_dir, tmp_path, victims: int = 4):
    """The shapes data with the first `victims` records of rank 1's first micro-batch (of 4)
    pointing at a missing image; all 4: that rank has nothing to train on in step 1, and must still
    take part in every collective."""
    from vlmforge.train.batches import epoch_batches

    rows = json.loads((data_dir / "shapes_sft.json").read_text())
    for row in rows:
        row["image"] = str((data_dir / row["image"]).resolve())
    for victim in epoch_batches(len(rows), 4, 0, 0)[1][:victims]:
        rows[victim]["image"] = str(tmp_path / "gone.png")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    return data


@pytest.mark.parametrize(
    "strategy,lm_mode,lm_part,vision",
    [
        ("ddp", "lora", "lm_adapter/adapter_model.safetensors", "frozen"),
        ("ddp", "lora", "lm_adapter/adapter_model.safetensors", "full"),  # the tower trains too
        ("fsdp", "full", "lm/model.safetensors", "frozen"),
        ("fsdp", "full", "lm/model.safetensors", "top"),  # the tower's top block sharded with the root
    ],
)
def test_two_ranks_match_one_and_resume_on_one(data_dir, backbones, tmp_path, strategy, lm_mode, lm_part, vision):
    """2 ranks (DDP, also with the vision tower training; FSDP2 sharding the fully trained LM, also
    with the tower's top block training), one
    with a wholly bad micro-batch, stopped, then resumed on 1 process from the checkpoint (gathered
    by name under FSDP): the same run as 1 process with the same global batch, losses to 1e-5 and
    saved weights to 1e-4."""
    data = with_bad_images(data_dir, tmp_path)
    two, one = tmp_path / "two", tmp_path / "one"
    mode = ["--train.lm_mode", lm_mode, "--train.vision_mode", vision]
    # 2 ranks x 1 micro-batch per step, stopped after step 2 ...
    r = train(
        *common(data, backbones, two),
        *mode,
        "--nproc",
        "2",
        "--train.strategy",
        strategy,
        "--train.grad_accum",
        "1",
        "--train.stop_at",
        "2",
        "--train.dist_timeout",
        "60",
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"2 ranks ({strategy})" in r.stdout + r.stderr and len(losses(two)) == 2
    assert json.loads((two / "run_config.json").read_text())["world_size"] == 2
    assert json.loads((two / "summary.json").read_text())["skipped"] == 4
    # ... resumed on 1 rank x 2 micro-batches per step (the same global batch of 8)
    train_here(*common(data, backbones, two), *mode, "--train.grad_accum", "2", "--resume", "true")
    train_here(*common(data, backbones, one), *mode, "--train.grad_accum", "2")
    assert losses(two) == pytest.approx(losses(one), rel=1e-5) and len(losses(one)) == 4
    for part in ["connector.safetensors", lm_part] + (["vision/model.safetensors"] if vision != "frozen" else []):
        a, b = load_file(str(two / "model" / part)), load_file(str(one / "model" / part))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_a_failing_rank_stops_the_job_with_its_name(data_dir, backbones, tmp_path):
    data = with_bad_images(data_dir, tmp_path, victims=1)
    t0 = time.time()
    r = train(
        *common(data, backbones, tmp_path / "out"),
        "--nproc",
        "2",
        "--train.bad_images",
        "fail",
        "--train.dist_timeout",
        "60",
    )
    assert r.returncode != 0 and time.time() - t0 < 120
    log = r.stdout + r.stderr
    assert "rank 1 of 2 failed" in log and "gone.png" in log


def test_bench_train_writes_its_figures(tmp_path, capsys):
    from vlmforge.cli import main

    out = tmp_path / "bench.json"
    main(
        [
            "bench",
            "train",
            "--work",
            str(tmp_path / "w"),
            "--batch_size",
            "4",
            "--steps",
            "1",
            "--process_steps",
            "2",
            "--compile",
            "false",
            "--out",
            str(out),
        ]
    )
    r = json.loads(out.read_text())
    assert r["matmul_peak_flops"] > 1e8
    for stage in ("align", "sft"):
        m = r["mfu"][stage]
        assert m["flops_per_step"] > 0 and 0 < m["mfu"] < 1.5
    assert r["processes"]["2"]["steps"] == r["processes"]["1"]["steps"] == r["processes"]["2-fsdp"]["steps"] == 2
    assert r["two_vs_one_process"] > 0 and r["fsdp_two_vs_one_process"] > 0
    assert "MFU" in capsys.readouterr().out
