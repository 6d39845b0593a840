import json
import shutil
from pathlib import Path

import pytest
import torch

from vlmforge.config import TrainConfig
from vlmforge.data.formats import DataError
from vlmforge.model.vlm import VLM
from vlmforge.train.checkpoint import read_checkpoint
from vlmforge.train.loop import train


def _cfg(data_dir, out, **kw):
    base = dict(
        stage="sft",
        data=[str(data_dir / "shapes_sft.json")],
        out=str(out),
        batch_size=8,
        lr=3e-3,
        lm_lr=3e-3,
        max_steps=12,
        epochs=10,
        warmup=0.1,
        save_every=4,
        log_every=1,
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_short_training_run_loss_falls_and_saves_everything(model_cfg, data_dir, tmp_path):
    model_dir = train(_cfg(data_dir, tmp_path / "run", max_steps=25), model_cfg)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 25
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    for name in ("checkpoint", "loss.png", "run_config.json", "summary.json"):
        assert (tmp_path / "run" / name).exists()
    loaded = VLM.from_pretrained(model_dir)
    assert loaded.lm_mode == "full"


def test_align_stage_trains_only_the_connector(model_cfg, data_dir, tmp_path):
    cfg = _cfg(data_dir, tmp_path / "align", stage="align", data=[str(data_dir / "shapes_captions.json")], max_steps=2)
    model_dir = train(cfg, model_cfg)
    trained = VLM.from_pretrained(model_dir)
    fresh = VLM.from_backbones(model_cfg)
    for a, b in zip(trained.causal_lm.parameters(), fresh.causal_lm.parameters()):
        assert torch.equal(a, b)
    assert trained.lm_mode == "frozen"


def test_lora_stage_from_an_aligned_model(model_cfg, data_dir, tmp_path):
    align = train(_cfg(data_dir, tmp_path / "a", stage="align", max_steps=1), model_cfg)
    model_dir = train(_cfg(data_dir, tmp_path / "s", lm_mode="lora", max_steps=2), init=str(align))
    loaded = VLM.from_pretrained(model_dir)
    assert loaded.lm_mode == "lora"
    assert (model_dir / "lm_adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("cached", [False, True])
def test_interrupted_run_resumes_exactly(model_cfg, data_dir, tmp_path, monkeypatch, cached):
    """Also from the feature store, where the encoder is released (its weights on the meta device):
    resuming must go on training the very parameters the optimizer holds."""
    extra = {}
    if cached:
        from vlmforge.cache.build import build, encoder_for, images_of

        vision, proc, src = encoder_for(encoder=model_cfg.vision)
        build(str(tmp_path / "store"), vision, proc, images_of([data_dir / "shapes_sft.json"]), "fp32", source=src)
        extra = {"cache": str(tmp_path / "store")}
    full = train(_cfg(data_dir, tmp_path / "full", max_steps=8, save_every=3, **extra), model_cfg)
    reference = VLM.from_pretrained(full)

    calls = {"n": 0}
    original = VLM.forward

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # during step 6: the checkpoint of step 5 must be written, nothing lost
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(VLM, "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(data_dir, tmp_path / "cut", max_steps=8, save_every=3, **extra), model_cfg)
    assert read_checkpoint(tmp_path / "cut" / "checkpoint")["progress"]["step"] == 5
    monkeypatch.setattr(VLM, "forward", original)
    resumed = VLM.from_pretrained(
        train(_cfg(data_dir, tmp_path / "cut", max_steps=8, save_every=3, **extra), model_cfg, resume=True)
    )
    assert _losses(tmp_path / "cut") == pytest.approx(_losses(tmp_path / "full"), abs=1e-6)
    for (n, a), b in zip(reference.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)


def sigkill_and_resume(cmd, tmp_path, at_step: int = 6):
    """Run `cmd(out, *extra)` (a `python -m vlmforge train` command line) to the end; run it again
    as a process of its own, SIGKILL it once its checkpoint is at step `at_step` or later, then
    `--resume`: the final weights must be, bit for bit, those of the uninterrupted run. The run to
    the end and the resumed one go through the same command line in this process."""
    import signal
    import subprocess
    import time

    from vlmforge.cli import main

    def here(argv):
        main(argv[argv.index("vlmforge") + 1 :])

    here(cmd(tmp_path / "full"))
    proc = subprocess.Popen(cmd(tmp_path / "cut"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "cut" / "checkpoint" / "state.json"
    deadline = time.time() + 120

    def step():  # -1 while none is there or it is being replaced
        try:
            return read_checkpoint(state.parent)["progress"]["step"]
        except (ValueError, OSError):
            return -1

    while step() < at_step:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "model").exists()
    here(cmd(tmp_path / "cut", "--resume", "true"))
    full, cut = VLM.from_pretrained(tmp_path / "full" / "model"), VLM.from_pretrained(tmp_path / "cut" / "model")
    for (name, a), b in zip(full.named_parameters(), cut.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.multiproc
def test_sigkilled_run_resumes_to_the_same_weights(model_cfg, data_dir, tmp_path):
    """SIGKILL (no handler runs, a checkpoint may be half written) during a `vlmforge train`
    process, then `--resume`: the final weights are bit for bit those of an uninterrupted run."""
    import sys

    def cmd(out, *extra):
        return [
            sys.executable,
            "-m",
            "vlmforge",
            "train",
            "--train.stage",
            "sft",
            "--train.data",
            str(data_dir / "shapes_sft.json"),
            "--train.out",
            str(out),
            "--train.batch_size",
            "8",
            "--train.max_steps",
            "30",
            "--train.epochs",
            "20",
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


def test_pickled_checkpoint_of_an_earlier_version_is_refused_unread(model_cfg, data_dir, tmp_path):
    """`checkpoint.pt` was a pickle: unpickling runs whatever the file says. It is not read."""
    marker = tmp_path / "ran"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"payload": _Touch(marker)}, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint\.pt: a checkpoint of an earlier vlmforge.*without --resume"):
        train(_cfg(data_dir, out, max_steps=2), model_cfg, resume=True)
    assert not marker.exists()


class _Touch:
    """Unpickling it creates a file: what a hostile checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_corrupt_checkpoint_is_named(model_cfg, data_dir, tmp_path):
    train(_cfg(data_dir, tmp_path / "run", max_steps=4, save_every=2, stop_at=2), model_cfg)
    (tmp_path / "run" / "checkpoint" / "tensors.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match=r"run/checkpoint: corrupt checkpoint"):
        train(_cfg(data_dir, tmp_path / "run", max_steps=4, save_every=2), model_cfg, resume=True)


def _with_bad_images(data_dir, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    (d / "images" / "shapes_000001.png").write_bytes(b"garbage")
    png = (d / "images" / "shapes_000002.png").read_bytes()
    (d / "images" / "shapes_000002.png").write_bytes(png[: len(png) // 2])
    (d / "images" / "shapes_000003.png").unlink()
    return d


def test_bad_images_are_skipped_and_counted(model_cfg, tmp_path, data_dir):
    d = _with_bad_images(data_dir, tmp_path)
    train(_cfg(d, tmp_path / "run", max_steps=6, epochs=1, batch_size=8), model_cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped"] == 3
    assert summary["samples"] == 48 - 3
    assert any("shapes_000002.png" in s and "cannot decode" in s for s in summary["skipped_records"])
    assert any("shapes_000003.png" in s and "not found" in s for s in summary["skipped_records"])


def test_bad_image_with_fail_policy_names_the_file_and_keeps_progress(model_cfg, tmp_path, data_dir):
    d = _with_bad_images(data_dir, tmp_path)
    cfg = _cfg(d, tmp_path / "run", max_steps=6, epochs=1, batch_size=8, bad_images="fail", save_every=100)
    with pytest.raises(DataError, match=r"shapes_sft.json record \d+ \(id=shapes_00000[123]\).*shapes_00000[123].png"):
        train(cfg, model_cfg)
    # the steps done before the bad batch are kept
    assert read_checkpoint(tmp_path / "run" / "checkpoint")["progress"]["step"] >= 1


def test_malformed_record_fails_before_training(model_cfg, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "conversations": [{"from": "gpt", "value": "a"}]}]))
    with pytest.raises(DataError, match="bad.json record 0 \\(id=x\\)"):
        train(TrainConfig(data=[str(bad)], out=str(tmp_path / "run")), model_cfg)
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_gradient_accumulation_matches_one_big_batch(model_cfg, data_dir, tmp_path):
    # 2 micro-batches of 4 cover the same records as one batch of 8 (same permutation), and the
    # loss is normalised over all label tokens of the accumulated batch, so the update is the same.
    big = VLM.from_pretrained(train(_cfg(data_dir, tmp_path / "big", batch_size=8, max_steps=2), model_cfg))
    acc = VLM.from_pretrained(
        train(_cfg(data_dir, tmp_path / "acc", batch_size=4, grad_accum=2, max_steps=2), model_cfg)
    )
    assert _losses(tmp_path / "big") == pytest.approx(_losses(tmp_path / "acc"), rel=1e-5)
    # The losses (to 1e-5) check the normalisation. The weights differ by summation order only:
    # Adam divides by sqrt(v), so an element whose gradients are near zero carries that noise up to
    # ~1e-5 after two steps (one step moves a weight by up to lr = 3e-3): 1.2e-5 for one of 8,192
    # weights on a 362 GFLOP/s machine whose kernels sum in another order than where 1e-5 was set.
    for (n, a), b in zip(big.named_parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=3e-5, msg=n)


def test_activation_checkpointing_changes_memory_not_results_and_bf16_trains(
    model_cfg, data_dir, tmp_path, monkeypatch
):
    """Recomputing the LM's activations in the backward pass (each layer runs twice) gives the
    very same run; bf16 autocast gives one within bf16's precision (relative 2e-2 on the loss)."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls, forward = [0], LlamaMLP.forward  # inside each decoder layer: runs again in the recompute

    def counted(self, *a, **k):
        calls[0] += 1
        return forward(self, *a, **k)

    monkeypatch.setattr(LlamaMLP, "forward", counted)
    runs, layer_calls = {}, {}
    for name, kw in (("plain", {}), ("ckpt", {"activation_checkpointing": True}), ("bf16", {"precision": "bf16"})):
        calls[0] = 0
        train(_cfg(data_dir, tmp_path / name, max_steps=3, lm_mode="full", **kw), model_cfg)
        runs[name], layer_calls[name] = _losses(tmp_path / name), calls[0]
    assert layer_calls["ckpt"] == 2 * layer_calls["plain"] > 0
    assert runs["ckpt"] == pytest.approx(runs["plain"], rel=1e-6)
    assert runs["bf16"] == pytest.approx(runs["plain"], rel=2e-2) and runs["bf16"] != runs["plain"]


@pytest.mark.slow
def test_compiled_layers_train_the_same(model_cfg, data_dir, tmp_path):
    """`--train.compile`: the compiled decoder and encoder layers compute the same run (losses to
    1e-4). With the `aot_eager` backend: dynamo captures the layers and AOT autograd their backward,
    as with inductor, without generating kernels (inductor's code generation costs 90 s on a cold
    cache here; `vlmforge bench train` runs it)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    runs = {}
    for name, kw in (("eager", {}), ("compiled", {"compile": True, "compile_backend": "aot_eager"})):
        counters.clear()
        train(_cfg(data_dir, tmp_path / name, max_steps=3, lm_mode="full", **kw), model_cfg)
        runs[name], graphs = _losses(tmp_path / name), counters["stats"]["unique_graphs"]
    torch._dynamo.reset()  # the compiled layers are gone; free their graphs
    assert graphs >= 2  # a decoder layer and an encoder layer, compiled
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-4)


@pytest.mark.parametrize("arch", ["autoregressive", "cross_attention", "split", "eager"])
def test_shared_and_packed_sequences_give_the_loss_and_gradients_of_the_records_apart(model_cfg, tmp_path, arch):
    """`group_by_image`: one-question records of an image in one sequence (shared prefix, block
    mask, positions as if alone); `packing`: several records or groups to a sequence up to a token
    budget (block-diagonal). Each gives the loss and gradients of the records apart, with fewer
    tokens or rows; the LM's sdpa and eager attention alike."""
    import dataclasses

    from vlmforge.data.collate import VQADataset, collate, merge_image_inputs
    from vlmforge.data.formats import load_records
    from vlmforge.data.synthetic import synth
    from vlmforge.train.batches import epoch_batches, image_groups

    synth(tmp_path, "shapes", 4, seed=1, width=32, height=32, conversations="single")
    records = load_records(tmp_path / "shapes_sft.json")
    records = [r for r in records if r.images != records[-1].images] + records[-1:]  # the last image: 1 record
    kw = {"cross_attention": {"architecture": "cross_attention"}, "split": {"split_grid": 2}}.get(arch, {})
    torch.manual_seed(0)
    m = VLM.from_backbones(dataclasses.replace(model_cfg, **kw))
    m.lm_mode = "full"
    if arch == "eager":
        m.causal_lm.set_attn_implementation("eager")
    if arch == "cross_attention":  # open the zero-initialised gates, so the images matter
        for p in m.connector.parameters():
            if p.dim() == 1 and p.numel() == 1:
                p.data.fill_(0.5)
    groups = image_groups(records)
    assert len(groups) == 4 and sum(map(len, groups)) == len(records) > 8  # 3 images, 1 record alone
    order = epoch_batches(len(records), len(records), 0, 0, groups)[0]
    assert sorted(order) == list(range(len(records)))
    assert all(sorted(order[order.index(g[0]) : order.index(g[0]) + len(g)]) == g for g in groups)  # contiguous
    ds = VQADataset(records, m.prompts, m.processor)
    items = [ds[i] for i in order]
    longest = max(len(it["input_ids"]) for it in items)
    budget = 3 * longest  # about three records to a packed row
    variants = {"apart": {}, "shared": {"share_images": m.image_token_ids}}
    if arch != "cross_attention":  # packing is refused there (a text token would see every image of its row)
        widest = collate(items, m.tokenizer.pad_token_id, m.image_token_ids)["input_ids"].shape[1]  # an image's group
        variants["packed"] = {"pack": budget}
        variants["shared+packed"] = {"share_images": m.image_token_ids, "pack": 2 * widest}
    grads, outs = {}, {}
    for name, kw in variants.items():
        batch = collate(items, m.tokenizer.pad_token_id, **kw)
        m.zero_grad()
        out = m(
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            **merge_image_inputs(m, batch),
            position_ids=batch.get("position_ids"),
        )
        out.loss_sum.backward()
        outs[name] = (batch, out)
        grads[name] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    apart, a = outs["apart"]
    assert len(grads["apart"]) > 4
    for name in variants:
        batch, o = outs[name]
        assert batch["ids"] and sorted(batch["ids"]) == sorted(apart["ids"]), name
        assert o.n_tokens == a.n_tokens and o.loss_sum.item() == pytest.approx(a.loss_sum.item(), rel=1e-5), name
        assert grads[name].keys() == grads["apart"].keys(), name
        for n, g in grads["apart"].items():
            torch.testing.assert_close(grads[name][n], g, rtol=1e-4, atol=1e-5, msg=f"{name}: {n}")
    shared = outs["shared"][0]
    assert shared["attention_mask"].dim() == 4 and len(shared["input_ids"]) == 3 + 1  # 3 images, 1 record alone
    limit = 0.9 if arch == "cross_attention" else 0.75  # without visual tokens in the sequence, less to share
    assert shared["tokens"] < limit * apart["tokens"]
    if "packed" in outs:
        packed = outs["packed"][0]
        assert packed["tokens"] == apart["tokens"] and packed["input_ids"].shape[1] <= budget
        assert len(packed["input_ids"]) <= len(items) // 2
        assert outs["shared+packed"][0]["tokens"] == shared["tokens"]
        assert len(outs["shared+packed"][0]["input_ids"]) < len(shared["input_ids"])


def test_attention_never_crosses_the_records_of_a_packed_row(model_cfg, tmp_path):
    """A probe: two records packed in one row; change every text token of the first and the second
    record's logits do not move (while the first's do). The same row with a plain causal mask
    (attention across the records) does move them: the probe can see a leak."""
    import dataclasses

    from vlmforge.data.collate import VQADataset, collate, merge_image_inputs
    from vlmforge.data.formats import load_records
    from vlmforge.data.synthetic import synth

    synth(tmp_path, "shapes", 2, seed=3, width=32, height=32, conversations="single")
    records = load_records(tmp_path / "shapes_sft.json")
    first, second = records[0], next(r for r in records if r.images != records[0].images)
    torch.manual_seed(0)
    m = VLM.from_backbones(dataclasses.replace(model_cfg)).eval()
    ds = VQADataset([first, second], m.prompts, m.processor)
    items = [ds[0], ds[1]]
    n0 = len(items[0]["input_ids"])
    image_ids = set(m.image_token_ids)

    def logits(a: dict, causal: bool = False):
        batch = collate([a, items[1]], m.tokenizer.pad_token_id, pack=10_000)
        assert len(batch["input_ids"]) == 1  # one row holds both
        mask = batch["attention_mask"]
        if causal:
            mask = torch.ones_like(mask).tril()
        with torch.no_grad():
            return m(
                batch["input_ids"], mask, **merge_image_inputs(m, batch), position_ids=batch["position_ids"]
            ).logits[0]

    changed = dict(
        items[0], input_ids=[t if t in image_ids else (t + 7) % m.tokenizer.vocab_size for t in items[0]["input_ids"]]
    )
    before, after = logits(items[0]), logits(changed)
    assert not torch.allclose(before[:n0], after[:n0])  # the first record's own logits move
    torch.testing.assert_close(after[n0:], before[n0:], rtol=0, atol=1e-6)  # the second's do not
    leaky_before, leaky_after = logits(items[0], causal=True), logits(changed, causal=True)
    assert (leaky_after[n0:] - leaky_before[n0:]).abs().max() > 1e-3  # without the block mask they would


def test_grouped_and_packed_training_runs_and_resumes_exactly(model_cfg, tmp_path):
    import dataclasses

    from vlmforge.data.synthetic import synth

    synth(tmp_path, "shapes", 12, seed=2, width=32, height=32, conversations="single")
    cfg = dict(
        data=[str(tmp_path / "shapes_sft.json")],
        batch_size=8,
        max_steps=4,
        group_by_image=True,
        packing=True,
        max_len=300,
    )
    straight = _cfg(tmp_path, tmp_path / "straight", **cfg)
    train(straight, model_cfg)
    train(_cfg(tmp_path, tmp_path / "halves", stop_at=2, **cfg), model_cfg)
    train(_cfg(tmp_path, tmp_path / "halves", **cfg), model_cfg, resume=True)
    assert _losses(tmp_path / "halves") == pytest.approx(_losses(tmp_path / "straight"), rel=1e-6)
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["samples"] == 32 and 0 < summary["tokens"]
    ca = dataclasses.replace(model_cfg, architecture="cross_attention")
    with pytest.raises(ValueError, match="packing does not work with the cross-attention"):
        train(_cfg(tmp_path, tmp_path / "ca", **cfg), ca)


@pytest.mark.slow
def test_bench_data_packs_the_same_labels_into_fewer_tokens(tmp_path, capsys):
    from vlmforge.cli import main

    out = tmp_path / "data.json"
    main(
        [
            "bench",
            "data",
            "--work",
            str(tmp_path / "w"),
            "--n_images",
            "16",
            "--batch_size",
            "8",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--cap_mb",
            "0.05",
            "--multiples",
            "1",
            "4",
            "--stream_batches",
            "3",
            "--out",
            str(out),
        ]
    )
    r = json.loads(out.read_text())
    for name in ("demo mix", "long tail"):
        padded, packed = r["sets"][name]["padded"], r["sets"][name]["packed"]
        assert padded["label_tokens_per_step"] == packed["label_tokens_per_step"] > 0
        assert padded["tokens_per_step"] == packed["tokens_per_step"]  # the same records, no padding counted
        assert packed["computed_per_step"] <= padded["computed_per_step"]  # packed rows hold less padding
        assert r["sets"][name]["packed_vs_padded"] > 0
    tail = r["sets"]["long tail"]
    assert tail["packed"]["computed_per_step"] < tail["padded"]["computed_per_step"]
    printed = capsys.readouterr().out
    assert "packed / padded" in printed and "| 4x cap |" in printed
    st = r["streaming"]  # each corpus read both ways by fresh processes
    assert [c["records"] for c in st["corpora"].values()] == [44, 178]  # 0.05 and 0.2 MB of ~1.1 KB records
    assert st["corpora"]["4x"]["text_mb"] == pytest.approx(4 * st["corpora"]["1x"]["text_mb"], rel=0.05)
    for c in st["corpora"].values():
        for mode in ("streamed", "loaded"):
            assert c[mode]["samples_per_s"] > 0 and c[mode]["peak_rss_mb"] > c[mode]["data_rss_mb"]


def test_tensorboard_events_match_the_metrics_across_a_resume(model_cfg, data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(_cfg(data_dir, out, max_steps=4, stop_at=2, report_to=["tensorboard"]), model_cfg)
    train(_cfg(data_dir, out, max_steps=4, report_to=["tensorboard"]), model_cfg, resume=True)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(events.Tags()["scalars"])
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx(_losses(out), rel=1e-6)
    assert all(e.value > 0 for e in events.Scalars("train/tokens_per_s"))
