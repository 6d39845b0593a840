"""`vlmforge export` / `vlmforge import`: transformers' LLaVA classes load what vlmforge writes and
compute the same thing, and LLaVA checkpoints load into vlmforge with the same logits."""

import copy
import dataclasses
import json

import pytest
import torch
from PIL import Image

from vlmforge.cli import main
from vlmforge.model.vlm import VLM

# Tolerances: the same float32 computations in a different order (fused vs separate ops); the
# logits of these tiny models are O(10).
ATOL = 1e-4


def _image(w=40, h=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr)


def _greedy_hf(hf, inputs, n):
    gc = copy.deepcopy(hf.generation_config)
    gc.max_new_tokens, gc.do_sample, gc.eos_token_id = n, False, None
    out = hf.generate(**inputs, generation_config=gc)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("layout,connector", [("llama3v", "mlp"), ("inline", "linear")])
def test_llava_hf_export_runs_in_transformers_with_the_same_outputs(model_cfg, tmp_path, capsys, layout, connector):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmforge.infer.engine import Engine
    from vlmforge.infer.request import SamplingParams

    torch.manual_seed(0)
    cfg = dataclasses.replace(model_cfg, resize="expand", layout=layout, connector=connector)
    vlm = VLM.from_backbones(cfg).eval()
    if connector == "linear":  # with LoRA adapters, which the export merges into the LM
        from vlmforge.config import TrainConfig
        from vlmforge.train.stages import apply_stage

        apply_stage(vlm, TrainConfig(stage="sft", lm_mode="lora"))
        vlm.eval()
    with torch.no_grad():  # a connector (and adapters) whose output matters (the fresh init is near zero)
        for n, p in vlm.named_parameters():
            if n.startswith("connector."):
                p.mul_(4.0)
            elif "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    vlm.save_pretrained(tmp_path / "m")
    vlm = VLM.from_pretrained(tmp_path / "m")  # as the export reads it (adapters and all)
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"benchmarks": {"shapes_test": {"metric": "accuracy", "score": 0.5, "n": 10}}}))
    main(
        [
            "export",
            "--model",
            str(tmp_path / "m"),
            "--out",
            str(tmp_path / "hf"),
            "--format",
            "llava-hf",
            "--eval",
            str(report),
        ]
    )
    assert "exported as llava-hf" in capsys.readouterr().out
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "library_name: transformers" in card and f"`{connector}` connector" in card
    assert "| shapes_test | accuracy | 50.0 | 10 |" in card

    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    im = _image()  # not square: the aspect-keeping padding is exercised
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[im], text=prompt, return_tensors="pt")
    ids = vlm.build_prompt("what is it?", 1)
    assert inputs["input_ids"][0].tolist() == ids  # the same prompt, visual tokens included
    pixels = vlm.processor.views(im)
    torch.testing.assert_close(inputs["pixel_values"], pixels, rtol=0, atol=1e-5)
    with torch.no_grad():
        want = vlm(torch.tensor([ids]), pixel_values=pixels).logits
        got = hf(**inputs).logits
    assert (want - vlm(torch.tensor([ids]), pixel_values=torch.zeros_like(pixels)).logits).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    ours = Engine(vlm).generate([ids], [[im]], SamplingParams(max_tokens=8, ignore_eos=True))[0].tokens
    assert _greedy_hf(hf, inputs, 8) == ours

    main(["import", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    back = VLM.from_pretrained(tmp_path / "back")
    assert back.config.layout == layout and back.config.resize == "expand"
    with torch.no_grad():
        torch.testing.assert_close(back(torch.tensor([ids]), pixel_values=pixels).logits, want, rtol=0, atol=ATOL)


def test_llava_checkpoint_from_transformers_imports_with_the_same_logits(backbones, tmp_path):
    """A LLaVA-1.5-shaped checkpoint made with transformers' own classes: CLIP tower (CLS token,
    feature layer -2, centre crop), Llama LM, `<image>` placeholder token."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = AutoTokenizer.from_pretrained(backbones["lm"])
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(cfg).eval()
    ip = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(tmp_path / "llava")
    hf.save_pretrained(tmp_path / "llava")

    main(["import", "--src", str(tmp_path / "llava"), "--out", str(tmp_path / "vf")])
    vlm = VLM.from_pretrained(tmp_path / "vf")
    assert vlm.config.resize == "crop" and vlm.config.feature_layer == -2 and vlm.tokens_per_image == 16
    im = _image(48, 32, seed=1)
    pixels = vlm.processor.views(im)
    torch.testing.assert_close(ip(im, return_tensors="pt")["pixel_values"], pixels, rtol=0, atol=1e-5)
    words = tok("the red square", add_special_tokens=False)["input_ids"]
    hf_ids = torch.tensor([words[:1] + [image_id] * 16 + words[1:]])
    vf_ids = torch.where(hf_ids == image_id, vlm.image_token_id, hf_ids)
    with torch.no_grad():
        want = hf(input_ids=hf_ids, pixel_values=pixels).logits
        got = vlm(vf_ids, pixel_values=pixels).logits[..., : want.shape[-1]]
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    # the imported model is a vlmforge model like any other: its prompts carry the placeholders bare
    assert vlm.build_prompt("what?", 1).count(vlm.image_token_id) == 16


def test_import_names_what_is_wrong_with_its_source(backbones, tmp_path, capsys):
    for src, msg in (
        (str(tmp_path / "nowhere"), "nowhere: no such folder"),
        (str(backbones["lm"]), "a 'llama' checkpoint, not llava"),
    ):
        with pytest.raises(SystemExit):
            main(["import", "--src", src, "--out", str(tmp_path / "out")])
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_connectors_without_a_transformers_class_export_in_vlmforge_format(model_cfg, tmp_path, capsys):
    torch.manual_seed(0)
    vlm = VLM.from_backbones(dataclasses.replace(model_cfg, connector="attention"))
    vlm.save_pretrained(tmp_path / "m")
    main(["export", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "x")])
    out = capsys.readouterr().out
    assert "written in vlmforge's own format, not llava-hf: connector 'attention' has no transformers class" in out
    assert "exported as vlmforge" in out
    card = (tmp_path / "x" / "README.md").read_text()
    assert "library_name: vlmforge" in card and "No evaluation was attached" in card
    again = VLM.from_pretrained(tmp_path / "x")
    assert again.config.connector == "attention"
    for fmt, msg in (
        ("llava-hf", "cannot export to llava-hf: connector 'attention'"),
        ("idefics2-hf", "idefics2-hf is not written"),
    ):
        with pytest.raises(SystemExit):
            main(["export", "--model", str(tmp_path / "m"), "--out", str(tmp_path / fmt), "--format", fmt])
        assert msg in capsys.readouterr().err
        assert not (tmp_path / fmt).exists()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit):
        main(
            [
                "export",
                "--model",
                str(tmp_path / "m"),
                "--out",
                str(tmp_path / "y"),
                "--eval",
                str(tmp_path / "bad.json"),
            ]
        )
    assert "bad.json: not a readable eval report" in capsys.readouterr().err


def test_a_preset_trained_here_exports_to_llava_hf(backbones, data_dir, tmp_path, capsys):
    """`train --preset llava-1.5` with local backbones (feature layer -2, LLaVA's pad-to-square,
    bare placeholders), then `export` (auto picks llava-hf), and transformers generates the same."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmforge.infer.engine import Engine
    from vlmforge.infer.request import SamplingParams

    out = tmp_path / "run"
    main(
        [
            "train",
            "--preset",
            "llava-1.5",
            "--model.vision",
            str(backbones["vision"]),
            "--model.lm",
            str(backbones["lm"]),
            "--train.data",
            str(data_dir / "shapes_sft.json"),
            "--train.stage",
            "align",
            "--train.max_steps",
            "2",
            "--train.batch_size",
            "4",
            "--train.out",
            str(out),
        ]
    )
    vlm = VLM.from_pretrained(out / "model")
    c = vlm.config
    assert (c.feature_layer, c.layout, c.resize, c.connector) == (-2, "bare", "expand", "mlp")
    assert vlm.history[-1]["stage"] == "align" and vlm.history[-1]["step"] == 2
    main(["export", "--model", str(out / "model"), "--out", str(tmp_path / "hf")])
    assert "exported as llava-hf" in capsys.readouterr().out
    assert "| align | shapes_sft.json |" in (tmp_path / "hf" / "README.md").read_text()
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    im = _image(24, 40, seed=2)
    messages = [{"role": "user", "content": "<image>\nwhat shape is it?"}]  # string content works too
    inputs = processor(
        images=[im], text=processor.apply_chat_template(messages, add_generation_prompt=True), return_tensors="pt"
    )
    ids = vlm.build_prompt("what shape is it?", 1)
    assert inputs["input_ids"][0].tolist() == ids
    ours = Engine(vlm).generate([ids], [[im]], SamplingParams(max_tokens=6, ignore_eos=True))[0].tokens
    assert _greedy_hf(hf, inputs, 6) == ours


def test_device_map_places_the_model_and_keeps_its_outputs(model, tmp_path):
    """`device_map` goes to transformers' loader (accelerate); on a machine without GPUs `auto`
    places everything on the CPU, which is all this test can check here."""
    model.save_pretrained(tmp_path / "m")
    placed = VLM.from_pretrained(tmp_path / "m", device_map="auto")
    assert placed.config.device_map == "auto"
    assert {p.device.type for p in placed.parameters()} == {"cpu"}
    ids = torch.tensor([model.build_prompt("what is it?", 1)])
    pixels = model.processor.views(_image())
    with torch.no_grad():
        torch.testing.assert_close(placed(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits)


def read_back_in_transformers(vlm, file, question: str):
    """(vlmforge's logits, the GGUF LM's logits as transformers' GGUF loader reads it) for a
    prompt, after checking that the file's tokenizer gives vlmforge's ids for it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name).eval()
    tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    ids = vlm.build_prompt(question, 0)
    assert tok(vlm.tokenizer.decode(ids), add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        return vlm(torch.tensor([ids])).logits, hf(torch.tensor([ids])).logits


@pytest.mark.parametrize("gguf_type,tol", [("f32", 1e-6), ("f16", 1e-2), ("q8_0", 0.1)])
def test_gguf_export_of_the_lm_reads_back_in_transformers(model_cfg, tmp_path, capsys, gguf_type, tol):
    """`export --format gguf`: the LM (LoRA merged) and its tokenizer as llama.cpp's GGUF, read back
    by transformers' own GGUF loader (which undoes llama.cpp's rotary permutation): the same token
    ids for a prompt and the same logits, to the precision of the stored type."""
    from vlmforge.config import TrainConfig
    from vlmforge.train.stages import apply_stage

    torch.manual_seed(0)
    vlm = VLM.from_backbones(model_cfg)
    apply_stage(vlm, TrainConfig(stage="sft", lm_mode="lora"))
    with torch.no_grad():
        for n, p in vlm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)  # adapters that change the function
    vlm.save_pretrained(tmp_path / "m")
    vlm = VLM.from_pretrained(tmp_path / "m")
    main(
        [
            "export",
            "--model",
            str(tmp_path / "m"),
            "--out",
            str(tmp_path / "g"),
            "--format",
            "gguf",
            "--gguf_type",
            gguf_type,
        ]
    )
    printed = capsys.readouterr().out
    assert "LoRA layers merged" in printed and "exported as gguf" in printed
    file = tmp_path / "g" / f"lm-{gguf_type}.gguf"
    assert (tmp_path / "g" / f"mmproj-{gguf_type}.gguf").is_file()  # run in llama.cpp by test_gguf.py
    card = (tmp_path / "g" / "README.md").read_text()
    assert "library_name: gguf" in card and "--mmproj PATH/mmproj-f16.gguf" in card
    want, got = read_back_in_transformers(vlm, file, "How many red circles are there?")
    scale = float(want.abs().max())
    assert float(want.std()) > 0.01  # logits that differ from token to token
    torch.testing.assert_close(got, want, rtol=0, atol=tol * scale)


def test_gguf_export_refuses_what_it_cannot_write(model_cfg, tmp_path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vlmforge.export.gguf import LLAMA3_SPLIT, GGUFError, tokenizer_pre

    def fast(pre):
        t = Tokenizer(models.BPE())
        t.pre_tokenizer = pre
        return PreTrainedTokenizerFast(tokenizer_object=t)

    assert tokenizer_pre(fast(pre_tokenizers.ByteLevel(add_prefix_space=False))) == "gpt-2"
    llama3 = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    assert tokenizer_pre(fast(llama3)) == "llama-bpe"
    with pytest.raises(GGUFError, match="has no llama.cpp name"):
        tokenizer_pre(fast(pre_tokenizers.Whitespace()))
    VLM.from_backbones(model_cfg).save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit):
        main(
            [
                "export",
                "--model",
                str(tmp_path / "m"),
                "--out",
                str(tmp_path / "g"),
                "--format",
                "gguf",
                "--gguf_type",
                "q4_k",
            ]
        )
    assert not (tmp_path / "g").exists()  # nothing left behind
    import dataclasses as dc

    for kw, reason in (
        ({"connector": "attention"}, "connector 'attention'"),
        ({"vision_pooled": True}, "pooled token"),
        ({"split_grid": 2}, "image splitting"),
    ):
        VLM.from_backbones(dc.replace(model_cfg, **kw)).save_pretrained(tmp_path / "x")
        with pytest.raises(ValueError, match=f"cannot export to gguf: .*{reason}"):
            from vlmforge.export import export

            export(str(tmp_path / "x"), str(tmp_path / "gx"), "gguf")
        assert not (tmp_path / "gx").exists()


def test_a_tower_trained_with_lora_exports_as_trained(model_cfg, tmp_path, capsys):
    """LoRA adapters on the vision tower: the saved tower holds them folded in, and transformers'
    LLaVA computes what the model with its adapters computed, not what the base tower would."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmforge.config import TrainConfig
    from vlmforge.train.stages import apply_stage

    torch.manual_seed(0)
    vlm = VLM.from_backbones(dataclasses.replace(model_cfg, resize="expand"))
    apply_stage(vlm, TrainConfig(stage="sft", lm_mode="frozen", vision_mode="lora", lora_r=4))
    with torch.no_grad():
        for n, p in vlm.named_parameters():
            if n.startswith("connector."):
                p.mul_(4.0)
            elif "lora_B" in n:
                p.normal_(0, 0.2)
    vlm.eval()
    im = _image()
    ids = vlm.build_prompt("what is it?", 1)
    pixels = vlm.processor.views(im)
    with torch.no_grad():
        want = vlm(torch.tensor([ids]), pixel_values=pixels).logits
        base = VLM.from_backbones(dataclasses.replace(model_cfg, resize="expand"))
        base.connector.load_state_dict(vlm.connector.state_dict())
        untrained = base(torch.tensor([ids]), pixel_values=pixels).logits
    assert (want - untrained).abs().max() > 1e-2  # the adapters change what the model computes
    vlm.save_pretrained(tmp_path / "m")
    main(["export", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "hf"), "--format", "llava-hf"])
    assert "exported as llava-hf" in capsys.readouterr().out
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    inputs = processor(
        images=[im], text=processor.apply_chat_template(messages, add_generation_prompt=True), return_tensors="pt"
    )
    with torch.no_grad():
        torch.testing.assert_close(hf(**inputs).logits, want, rtol=0, atol=ATOL)
