"""Images as they are: adaptive slicing (LLaVA-UHD) and native aspect ratio (Idefics2), whose
visual tokens vary from image to image, through prompts, batches, the feature store, the engine,
plan and the exports."""

import dataclasses

import pytest
import torch
from PIL import Image

from vlmforge.data.collate import VQADataset, collate, merge_image_inputs
from vlmforge.data.formats import Record
from vlmforge.data.images import ImageProcessor, adaptive_grid, native_size
from vlmforge.model.vlm import VLM

SETTINGS = {
    "none": {},
    "fixed 2x2": {"split_grid": 2},
    "adaptive": {"slicing": "adaptive", "max_slices": 4},
    "native": {"resize": "native"},
}
# wide, tall, square, tiny and odd sizes (the encoder of the tests is 32 px)
SIZES = [(96, 32), (32, 80), (40, 40), (20, 12), (150, 30), (33, 65)]


# (width, height, encoder size, budget) -> (rows, cols), worked by hand: N = ceil(W*H / size^2)
# capped at the budget; among grids of N-1, N, N+1 slices the one with cols/rows nearest W/H
GRIDS = [
    ((256, 64, 64, 4), (1, 4)),  # N = 4; 4:1 is exactly 1 x 4
    ((64, 192, 64, 4), (3, 1)),  # N = 3; 1:3 is exactly 3 x 1
    ((128, 128, 64, 4), (2, 2)),  # N = 4; square
    ((64, 64, 64, 4), (0, 0)),  # N = 1: one view, no slices
    ((40, 30, 64, 4), (0, 0)),  # smaller than one square
    ((640, 480, 64, 4), (2, 2)),  # N = 75 -> 4; 4:3 is nearest 2 x 2 (|log 4/3| = 0.29 < |log 4/9|)
    ((1000, 100, 64, 4), (1, 4)),  # 10:1 with 4 slices at most: 1 x 4 (1 x 3 is further)
    ((1344, 672, 384, 6), (2, 3)),  # N = ceil(6.1) = 7 -> 6; 2:1 -> 2 x 3 (|log 2/1.5| = 0.29 < |log 2/5| = 0.92)
    ((200, 130, 64, 9), (2, 3)),  # N = ceil(6.3) = 7; 1.54:1 -> 2 x 3 (0.025) over 2 x 4, 3 x 2
    ((130, 200, 64, 9), (3, 2)),  # the same turned: 3 x 2
]


@pytest.mark.parametrize("args, grid", GRIDS)
def test_adaptive_grid_for_a_table_of_sizes(args, grid):
    assert adaptive_grid(*args) == grid


def test_native_size_keeps_the_aspect_within_bounds():
    assert native_size(256, 64, 16, 32, 128) == (128, 32)  # the long side down to max_side
    assert native_size(64, 192, 16, 32, 128) == (48, 128)  # 42.7 -> a multiple of 16
    assert native_size(20, 10, 8, 16, 64) == (32, 16)  # the short side up to min_side
    assert native_size(400, 10, 8, 16, 64) == (64, 8)  # the long side wins: never past max_side
    with pytest.raises(ValueError, match="not with image splitting"):
        ImageProcessor(32, resize="native", grid=2)
    with pytest.raises(ValueError, match="max_slices >= 2"):
        ImageProcessor(32, slicing="adaptive", max_slices=1)


def _images():
    torch.manual_seed(0)
    return [Image.fromarray((torch.rand(h, w, 3) * 255).byte().numpy()) for w, h in SIZES]


@pytest.fixture(scope="module", params=list(SETTINGS))
def vlm(request, model_cfg):
    torch.manual_seed(0)
    m = VLM.from_backbones(dataclasses.replace(model_cfg, **SETTINGS[request.param])).eval()
    with torch.no_grad():  # random weights whose answers depend on the image (the tiny LM barely trained)
        for p in list(m.connector.parameters()) + list(m.causal_lm.parameters()):
            p.add_(torch.randn_like(p) * 0.5)
    return m


def test_token_counts_equal_what_the_connector_emits(vlm):
    images = _images()
    for img in images:
        views = vlm.processor.views(img)
        emitted = vlm.image_tokens([views])[0].shape[0]
        assert emitted == vlm.image_token_count(img.size)
        ids = vlm.build_prompt("what is it?", images=[img])
        assert ids.count(vlm.image_token_id) == emitted
        if vlm.processor.resize == "native":  # a row break between the rows of the patch grid
            row_break = vlm.tokenizer.convert_tokens_to_ids("<row_break>")
            assert ids.count(row_break) == vlm.processor.input_size(img.size)[1] // vlm.processor.unit - 1
        if vlm.processor.slicing == "adaptive":
            rows, cols = vlm.processor.grid_for(img.size)
            assert views.shape[0] == (rows * cols + 1 if rows else 1)
    counts = {vlm.image_token_count(im.size) for im in images}
    assert len(counts) > 1 if vlm.processor.variable else counts == {vlm.tokens_per_image}


def test_a_batch_of_mixed_aspects_gives_the_logits_of_one_by_one(vlm, tmp_path):
    records = []
    for i, img in enumerate(_images()):
        img.save(tmp_path / f"{i}.png")
        msgs = [{"role": "user", "content": "<image>\nwhat is it?"}, {"role": "assistant", "content": "a picture"}]
        records.append(Record(f"r{i}", [str(tmp_path / f"{i}.png")], msgs, "test"))
    ds = VQADataset(records, vlm.prompts, vlm.processor)
    items = [ds[i] for i in range(len(records))]
    pad = vlm.tokenizer.pad_token_id
    with torch.no_grad():
        b = collate(items, pad)
        together = vlm(b["input_ids"], b["attention_mask"], **merge_image_inputs(vlm, b)).logits
        loss = vlm(b["input_ids"], b["attention_mask"], b["labels"], **merge_image_inputs(vlm, b)).loss
        assert torch.isfinite(loss)
        for i, it in enumerate(items):
            one = collate([it], pad)
            alone = vlm(one["input_ids"], one["attention_mask"], **merge_image_inputs(vlm, one)).logits[0]
            torch.testing.assert_close(together[i, : alone.shape[0]], alone, atol=1e-4, rtol=1e-4)


def test_engine_answers_equal_generate_for_mixed_sizes(vlm):
    from vlmforge.infer.engine import Engine
    from vlmforge.infer.request import SamplingParams

    images = _images()
    prompts = [vlm.build_prompt(q, images=[im]) for q, im in zip(["what?", "which word is first?"] * 3, images)]
    got = Engine(vlm, max_batch=4).generate(prompts, [[im] for im in images], SamplingParams(max_tokens=8))
    ref = [
        vlm.generate([p], image_features=[vlm.processor.views(im)], max_new_tokens=8)[0]
        for p, im in zip(prompts, images)
    ]
    assert [r.tokens for r in got] == ref
    assert len({tuple(t) for t in ref}) > 1  # the images change the answers
    again = Engine(vlm).generate(prompts[:2], [[images[0]], [images[1]]], SamplingParams(max_tokens=8))
    assert [r.tokens for r in again] == ref[:2]
    if vlm.processor.variable:  # a prompt built for another size is refused, naming the image
        with pytest.raises(ValueError, match=r"image 0 \(40x40\) makes \d+ visual tokens but its block"):
            Engine(vlm).submit(prompts[0], [images[2]])


def test_store_keys_change_with_the_slicing_settings(model_cfg, tmp_path):
    from vlmforge.cache.build import encoder_for
    from vlmforge.cache.store import feature_settings, settings_id

    ids = set()
    for kw in (
        {},
        {"split_grid": 2},
        {"slicing": "adaptive"},
        {"slicing": "adaptive", "max_slices": 6},
        {"resize": "native"},
        {"resize": "native", "max_side": 96},
    ):
        split = kw.pop("split_grid", 0)
        vision, proc, _ = encoder_for(encoder=model_cfg.vision, resize=kw.pop("resize", "pad"), split_grid=split, **kw)
        ids.add(settings_id(feature_settings(vision, proc, "fp32")))
    assert len(ids) == 6


@pytest.mark.parametrize("setting", ["adaptive", "native"])
def test_training_from_the_store_equals_training_from_pixels(model_cfg, tmp_path, setting):
    import json

    from vlmforge.cache.build import build_for
    from vlmforge.cache.store import FeatureReader, FeatureStore
    from vlmforge.config import TrainConfig
    from vlmforge.data.synthetic import synth
    from vlmforge.train.loop import train

    data = tmp_path / "data"
    synth(data, "words", 6, seed=0, width=96, height=32, prefix="wide")
    synth(data, "words", 6, seed=1, width=32, height=80, prefix="tall")
    files = [str(data / "wide_sft.json"), str(data / "tall_sft.json")]
    cfg = dataclasses.replace(model_cfg, **SETTINGS[setting])
    stats = build_for(tmp_path / "store", cfg, files, "fp32", num_workers=0, progress=False)
    assert stats["encoded"] == 12
    ns = FeatureStore(tmp_path / "store").namespaces()[0][0]
    reader = FeatureReader(ns)
    m = VLM.from_backbones(cfg)
    for f in files:  # each image's stored features make the tokens its prompt holds
        for rec in json.loads(open(f).read())[:3]:
            path = str(data / rec["image"])
            feats = reader.get(path)
            assert m.image_tokens([feats])[0].shape[0] == m.image_token_count(reader.image_size(reader.key(path)))

    def run(out, **kw):
        tc = TrainConfig(
            stage="sft",
            data=files,
            out=str(tmp_path / out),
            batch_size=4,
            max_steps=3,
            lr=3e-3,
            save_every=100,
            log_every=1,
            seed=0,
            **kw,
        )
        train(tc, cfg)
        lines = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines]

    assert run("cache", cache=str(tmp_path / "store")) == pytest.approx(run("pixels"), rel=1e-5, abs=1e-6)


def test_conv_tower_takes_native_sizes(tmp_path, model_cfg):
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    torch.manual_seed(0)
    tower = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"))
    tower.save_pretrained(tmp_path / "resnet")
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(tmp_path / "resnet")
    m = VLM.from_backbones(dataclasses.replace(model_cfg, vision=str(tmp_path / "resnet"), resize="native")).eval()
    assert m.processor.unit == 8  # the stem /4, the second stage /2: a token per 8 x 8 pixels
    shapes = set()
    for img in _images():
        w, h = m.processor.input_size(img.size)
        feats = m.encode_images(m.processor.views(img))
        assert feats.shape[1] == (w // 8) * (h // 8) == m.image_token_count(img.size)
        shapes.add((w, h))
    assert len(shapes) == len(SIZES)


def test_prompts_refuse_missing_or_miscounted_sizes(model_cfg):
    m = VLM.from_backbones(dataclasses.replace(model_cfg, slicing="adaptive"))
    msgs = [{"role": "user", "content": "<image>\nwhat?"}]
    with pytest.raises(ValueError, match="depend on each image's size"):
        m.prompts.encode_prompt(msgs)
    with pytest.raises(ValueError, match="1 <image> markers but 2 images"):
        m.prompts.encode_prompt(msgs, [(40, 40), (50, 50)])
    with pytest.raises(ValueError, match="need the <image> markers"):
        VLM.from_backbones(dataclasses.replace(model_cfg, slicing="adaptive", layout="bare"))
    with pytest.raises(ValueError, match="fixed number of views"):
        VLM.from_backbones(dataclasses.replace(model_cfg, resize="native", architecture="cross_attention"))
    with pytest.raises(ValueError, match="square patch grid"):
        VLM.from_backbones(dataclasses.replace(model_cfg, resize="native", connector="pixel_shuffle"))


def test_exports_refuse_with_the_reason_and_plan_counts_the_slices(model_cfg, tmp_path):
    from vlmforge.export import llava_obstacles
    from vlmforge.export.gguf import mmproj_obstacles
    from vlmforge.presets import plan

    for kw, why in (({"slicing": "adaptive"}, "anyres"), ({"resize": "native"}, "one fixed square")):
        m = VLM.from_backbones(dataclasses.replace(model_cfg, **kw))
        assert any(why in o for o in llava_obstacles(m))
        assert any(("splitting" if "slicing" in kw else "native") in o for o in mmproj_obstacles(m))
    one = plan("llama3-v")
    sliced = plan("llama3-v", max_slices=6, image=(1344, 672))  # 2 x 3 slices + the whole at 384 px
    assert sliced["views_per_image"] == 7 and sliced["visual_tokens_per_image"] == 7 * one["visual_tokens_per_image"]
    assert plan("llama3-v", max_slices=6, image=(300, 200))["views_per_image"] == 1


def test_server_prompts_follow_each_image_size(vlm):
    """The server renders each image's block from its size, also for an image it has seen before
    (whose pixels it does not decode again)."""
    import base64
    import io

    from vlmforge.infer.engine import Engine
    from vlmforge.serve.app import Server
    from vlmforge.serve.protocol import ServeLimits, parse_chat

    srv = Server(Engine(vlm), "tiny", ServeLimits())
    for img in _images()[:3]:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = {
            "model": "tiny",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}],
                }
            ],
        }
        for _ in range(2):  # the second time the image is known by its hash
            prompt, images = srv.prepare(parse_chat(body, srv.limits))
            assert images[0].size == img.size
            assert prompt.count(vlm.image_token_id) == vlm.image_token_count(img.size)
