"""`vlmforge bench generate`: every figure beside the bound measured in the same run, and `--vs
llama.cpp` on a model llama.cpp cannot run (the engine's figures still come). llama.cpp itself on
the SmolLM2 model: tests/test_gguf.py."""

from __future__ import annotations

import dataclasses
import json

import pytest
from torch import nn

from vlmforge.model.vlm import VLM


@pytest.fixture(scope="module")
def vlm(model_cfg):
    return VLM.from_backbones(model_cfg).eval()


def _bench(model_dir, out, *extra):
    from vlmforge.cli import main

    args = ["bench", "generate", "--model", str(model_dir), "--tokens", "6", "--batch", "2", "--repeats", "1"]
    main([*args, "--out", str(out), *extra])
    return json.loads(out.read_text())


def test_bench_generate_puts_each_figure_beside_its_measured_bound(vlm, tmp_path, capsys):
    vlm.save_pretrained(tmp_path / "m")
    r = _bench(tmp_path / "m", tmp_path / "b.json", "--dtype", "int8")
    lm_linear = sum(m.in_features * m.out_features for m in vlm.causal_lm.modules() if isinstance(m, nn.Linear))
    assert r["costs"]["token_flops"] == 2 * lm_linear  # 2 FLOPs a weight of every linear layer and the head
    assert r["costs"]["step_bytes"] < lm_linear * 1.1  # int8: about a byte a weight (and the norms, scales)
    assert r["costs"]["prefill_flops"] > r["prompt_tokens"] * r["costs"]["token_flops"] * 0.5
    assert r["bounds"]["read_bytes_per_s"] > 1e9 and r["bounds"]["matmul_flops_per_s"] > 1e9
    # read before and after the engine's figures; each bound takes the higher reading
    b = r["bounds"]
    assert len(b["read_rates"]) == 2 and b["read_bytes_per_s"] == max(b["read_rates"])
    assert len(b["matmul_rates"]) == 2 and b["matmul_flops_per_s"] == max(b["matmul_rates"])
    for key in ("prefill", "decode_b1", "decode_batch"):
        assert 0 < r["engine"]["of_bound"][key] < 1.5, (key, r["engine"]["of_bound"])
    assert r["generate"]["b1"]["engine_tokens_per_s"] > 0 and "llama.cpp" not in r
    table = capsys.readouterr().out
    assert "| decode, batch 1 |" in table and "GB/s" in table and "of bound" in table
    assert "each the highest of the run's 2 readings" in table
    assert r["batch_kernels"] == "q/k/v, o, gate/up, down, head: torch's int8 kernel"
    assert f"engine's 2-sequence step, matmuls: {r['batch_kernels']}" in table
    assert f"engine's 2-sequence step, attention: {r['batch_attention']}" in table
    assert r["tower"] == "the engine's kernels, the encoder in one call (`kernels.Encoder`)"  # small: one call
    assert f"engine's vision tower: {r['tower']}" in table
    assert r["prefilled"].startswith("operation by operation")  # int8 weights: not the stack's
    assert f"engine's prefill, the LM: {r['prefilled']}" in table


def test_bench_generate_vs_llama_cpp_on_a_model_it_cannot_run_says_why_in_one_line(model_cfg, tmp_path, capsys):
    from vlmforge.cli import main

    cross = dataclasses.replace(model_cfg, architecture="cross_attention", xattn_every=1)
    VLM.from_backbones(cross).save_pretrained(tmp_path / "x")
    r = _bench(tmp_path / "x", tmp_path / "x.json", "--vs", "llama.cpp")
    why = r["llama.cpp"]["unavailable"]
    assert why.startswith("llama.cpp cannot run this model:") and "cross-attention" in why and "\n" not in why
    assert r["engine"]["decode_b1_tokens_per_s"] > 0  # the engine's own figures all the same
    out = capsys.readouterr().out
    assert why in out and "| decode, batch 1 |" in out
    for bad, name in (
        (["--dtype", "fp4"], "unknown weights dtype 'fp4'"),
        (["--vs", "vllm"], "unknown --vs 'vllm'"),
        (["--projections", "fast"], "unknown --projections 'fast'"),
    ):
        with pytest.raises(SystemExit):
            main(["bench", "generate", "--model", str(tmp_path / "x"), *bad])
        assert name in capsys.readouterr().err


@pytest.mark.parametrize("projections", ["mm", "rows"])
def test_bench_generate_compiles_the_step_first_and_says_how_it_projects(
    vlm, tmp_path, capsys, projections, monkeypatch
):
    """`--compile true`: the step is compiled before anything is timed, and the table says so, with
    the way of projecting asked for (`auto` measures it: tests/test_engine.py). And what ran the
    timed prefill's LM: one prompt, through the stack, though the batch's prefill after it is not."""
    from vlmforge.bench.generate import QUESTION
    from vlmforge.infer import decoder

    side = vlm.processor.size
    monkeypatch.setattr(decoder, "PREFILL_ROWS", 3 * len(vlm.build_prompt(QUESTION, images=[(side, side)])) // 2)
    vlm.save_pretrained(tmp_path / "m")
    r = _bench(tmp_path / "m", tmp_path / "c.json", "--compile", "true", "--projections", projections)
    assert (
        r["compiled"].startswith("compiled (first answer") and f"projections {projections}: as asked" in r["compiled"]
    )
    assert r["engine"]["decode_b1_tokens_per_s"] > 0
    assert f"projections {projections}: as asked" in capsys.readouterr().out
    assert r["prefilled"] == decoder.PREFILL_STACK
