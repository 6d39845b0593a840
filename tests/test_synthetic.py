import json
import re

import pytest
from PIL import Image

from vlmforge.data.synthetic import (
    COLORS,
    SHAPES,
    WORD_LIST,
    caption,
    question_type,
    sample_scene,
    shape_questions,
    synth,
)


def test_deterministic_by_seed(tmp_path):
    a = synth(tmp_path / "a", "shapes", 12, seed=3)
    b = synth(tmp_path / "b", "shapes", 12, seed=3)
    c = synth(tmp_path / "c", "shapes", 12, seed=4)
    assert a["sft"].read_text() == b["sft"].read_text()
    assert a["sft"].read_text() != c["sft"].read_text()
    for i in range(12):
        name = f"images/shapes_{i:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_scene_rules():
    import random

    rng = random.Random(0)
    for _ in range(300):
        w, h = rng.choice([(64, 64), (96, 48), (40, 80)])
        shapes = sample_scene(rng, w, h)
        assert 1 <= len(shapes) <= 4
        side = min(w, h)
        for s in shapes:
            assert side / 10 <= s.r <= side / 6
            assert s.r <= s.cx <= w - s.r and s.r <= s.cy <= h - s.r
            assert s.kind in SHAPES and s.color in COLORS
        for i, s in enumerate(shapes):
            for t in shapes[i + 1 :]:  # bounding boxes apart
                assert abs(s.cx - t.cx) > s.r + t.r or abs(s.cy - t.cy) > s.r + t.r


def test_questions_follow_templates_and_are_correct():
    import random

    rng = random.Random(1)
    yes = no = 0
    for _ in range(200):
        shapes = sample_scene(rng, 64, 64)
        qs = shape_questions(shapes, rng)
        kinds = [s.kind for s in shapes]
        colors = [s.color for s in shapes]
        for q, a in qs["color"]:
            k = re.match(r"What color is the (\w+)\?$", q).group(1)
            assert kinds.count(k) == 1 and colors[kinds.index(k)] == a
        for q, a in qs["shape"]:
            c = re.match(r"What shape is the (\w+) object\?$", q).group(1)
            assert colors.count(c) == 1 and kinds[colors.index(c)] == a
        assert qs["count"] == [("How many shapes are there?", str(len(shapes)))]
        for q, a in qs["exist"]:
            c, k = re.match(r"Is there a (\w+) (\w+)\?$", q).groups()
            assert a == ("yes" if (c, k) in set(zip(colors, kinds)) else "no")
            yes += a == "yes"
            no += a == "no"
        for items in qs.values():
            for q, _ in items:
                assert question_type(q) in ("color", "shape", "count", "exist")
    assert yes == no  # balanced


def test_caption_lists_shapes_left_to_right():
    from vlmforge.data.synthetic import Shape

    shapes = [Shape("square", "blue", 40, 10, 5), Shape("circle", "red", 10, 30, 5)]
    shapes.append(Shape("triangle", "green", 55, 50, 5))
    assert caption(shapes) == "a red circle, a blue square and a green triangle"
    assert caption(shapes[:1]) == "a blue square"
    assert caption(shapes[:2]) == "a red circle and a blue square"


def test_files_written_in_llava_format(tmp_path):
    paths = synth(tmp_path, "text", 5, seed=0, width=80, height=40)
    recs = json.loads(paths["qa"].read_text())
    assert len(recs) == 5
    for r in recs:
        conv = r["conversations"]
        assert conv[0]["from"] == "human" and conv[0]["value"] == "<image>\nWhat does the text say?"
        assert re.fullmatch(r"[a-z]{3,6}", conv[1]["value"])
        img = Image.open(tmp_path / r["image"])
        assert img.size == (80, 40)
    sft = json.loads((tmp_path / "text_sft.json").read_text())
    assert all(len(r["conversations"]) == 2 for r in sft)


def test_caption_phrases_split_list_captions():
    from vlmforge.recipes.tiny import caption_phrases

    assert caption_phrases("a red circle, a blue square and a green triangle") == {
        "a red circle",
        "a blue square",
        "a green triangle",
    }
    assert caption_phrases("a red circle") == {"a red circle"}


def test_single_question_records_hold_every_turn_of_the_conversation(tmp_path):
    """By default each question is a record of its own (no answer can be read off another), and
    together they hold exactly the turns of the multi-turn conversation of the same seed."""
    single = json.loads(synth(tmp_path / "s", "shapes", 10, seed=5)["sft"].read_text())
    multi = json.loads(synth(tmp_path / "m", "shapes", 10, seed=5, conversations="multi")["sft"].read_text())
    assert len(multi) == 10 and len(single) > 10
    assert all(len(r["conversations"]) == 2 and r["conversations"][0]["value"].startswith("<image>\n") for r in single)

    def turns(records):
        out = []
        for r in records:
            c = r["conversations"]
            out += [(r["image"], q["value"].replace("<image>\n", ""), a["value"]) for q, a in zip(c[::2], c[1::2])]
        return out

    assert turns(single) == turns(multi)
    assert len({r["id"] for r in single}) == len(single)
    qa = [json.loads((tmp_path / d / "shapes_qa.json").read_text()) for d in ("s", "m")]
    assert qa[0] == qa[1]  # the evaluation file does not depend on the layout
    with pytest.raises(ValueError, match="'both'"):
        synth(tmp_path / "x", "shapes", 2, conversations="both")


def test_words_task_on_wide_and_tall_canvases_is_deterministic_and_typed(tmp_path):
    for size in ((256, 64), (64, 192)):
        a = synth(tmp_path / f"a{size}", "words", 6, seed=3, width=size[0], height=size[1])
        b = synth(tmp_path / f"b{size}", "words", 6, seed=3, width=size[0], height=size[1])
        assert a["sft"].read_text() == b["sft"].read_text()  # the same seed, the same data
        images = sorted((tmp_path / f"a{size}" / "images").iterdir())
        assert len(images) == 6 and Image.open(images[0]).size == size
        qa = json.loads(a["qa"].read_text())
        captions = {r["image"]: r["conversations"][1]["value"] for r in json.loads(a["captions"].read_text())}
        assert {question_type(r["conversations"][0]["value"]) for r in qa} == {"word", "words", "letters"}
        for r in qa:
            q, ans = r["conversations"][0]["value"], r["conversations"][1]["value"]
            words = re.split(r", | and ", captions[r["image"]])  # "cat, tiger and bee"
            assert set(words) <= set(WORD_LIST) and len(set(words)) == len(words)
            if question_type(q) == "words":
                assert ans == str(len(words)) and 2 <= len(words) <= 4
            else:  # "What is the second word?" -> the second word of the caption; its letters
                k = ["first", "second", "third", "fourth"].index(re.search(r"the (\w+) word", q).group(1))
                assert ans == (words[k] if question_type(q) == "word" else str(len(words[k])))
        # ink spans the canvas's long side: words sit side by side when wide, stacked when tall
        ink = (Image.open(images[0]).convert("L").point(lambda v: v < 128)).getbbox()
        long_side = 0 if size[0] > size[1] else 1
        assert ink[long_side + 2] - ink[long_side] > size[long_side] * 0.3
