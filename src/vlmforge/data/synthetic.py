"""Synthetic VQA data, deterministic by seed, written as LLaVA conversation JSON + PNG images.

Three tasks, with fixed question templates that evaluation code elsewhere relies on:

* `shapes`: 1-4 non-overlapping circles, squares and triangles in six colours on a light
  background, each of half-size 1/10-1/6 of the image's shorter side. Questions:
  "What color is the {shape}?" (only when that shape occurs once), "What shape is the {color}
  object?" (only when that colour occurs once), "How many shapes are there?", "Is there a
  {color} {shape}?" (yes/no, balanced). Each image also has a caption, listing its shapes from left
  to right, e.g. "a red circle, a blue square and a green triangle".
* `text`: a random lowercase string of 3-6 letters on a white image; "What does the text say?".
* `words`: 2-4 different words of `WORD_LIST` (16 animal names of 3-5 letters: a closed vocabulary a
  tiny LM can name, read off the glyphs), on one line when the canvas is wide (e.g. 256 x 64),
  one per line when it is tall (e.g. 64 x 192), where resolution and aspect matter: "What is the
  {first, second, third, fourth} word?" (in reading order), "How many letters does the {first,
  ...} word have?" (3, 4 or 5) and "How many words are there?".

For each task three files are written: `{task}_captions.json` (one caption per image, for the
align stage), `{task}_sft.json` (every question of every image, the caption request included) and
`{task}_qa.json` (one question per record, one record per question type, for evaluation).

In `{task}_sft.json` each question is a record of its own by default (`conversations="single"`).
With `"multi"` all questions of an image form one multi-turn conversation in random order; then
later answers can be read off earlier ones instead of the image (the caption names every colour
and shape, "What shape is the red object? circle" answers "What color is the circle?", the
second `exist` answer is the opposite of the first), and a model trained on them learns those
shortcuts: held-out `color` questions, asked alone, stayed near 60% where single-question records
reach 100% (docs/tiny-demo-experiments.md, section 7).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from vlmforge.io import atomic_write_text

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle")

COLOR_Q = "What color is the {shape}?"
SHAPE_Q = "What shape is the {color} object?"
COUNT_Q = "How many shapes are there?"
EXIST_Q = "Is there a {color} {shape}?"
TEXT_Q = "What does the text say?"
WORD_Q = "What is the {ordinal} word?"
WORDS_Q = "How many words are there?"
LETTERS_Q = "How many letters does the {ordinal} word have?"
ORDINALS = ("first", "second", "third", "fourth")
# six words of 3 letters, five of 4, five of 5
WORD_LIST = (
    "cat",
    "dog",
    "owl",
    "fox",
    "bee",
    "cow",
    "bear",
    "frog",
    "lion",
    "wolf",
    "duck",
    "tiger",
    "horse",
    "zebra",
    "camel",
    "sheep",
)
CAPTION_PROMPT = "Describe the image."
_TYPES = [
    ("color", re.compile(r"^What color is the \w+\?$")),
    ("shape", re.compile(r"^What shape is the \w+ object\?$")),
    ("count", re.compile(r"^How many shapes are there\?$")),
    ("exist", re.compile(r"^Is there an? \w+ \w+\?$")),
    ("text", re.compile(r"^What does the text say\?$")),
    ("word", re.compile(r"^What is the \w+ word\?$")),
    ("words", re.compile(r"^How many words are there\?$")),
    ("letters", re.compile(r"^How many letters does the \w+ word have\?$")),
]


def question_type(question: str) -> str:
    """The template a question was made from (color, shape, count, exist, text, word, words,
    letters), else `other`."""
    q = question.replace("<image>", "").strip()
    return next((name for name, rx in _TYPES if rx.match(q)), "other")


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cx: float
    cy: float
    r: float  # half-size

    def describe(self) -> str:
        return f"{self.color} {self.kind}"


def sample_scene(rng: random.Random, width: int, height: int, max_tries: int = 200) -> list[Shape]:
    """1-4 shapes whose bounding boxes (plus a 1-pixel gap) do not overlap."""
    side = min(width, height)
    n = rng.randint(1, 4)
    while True:
        shapes: list[Shape] = []
        for _ in range(max_tries):
            if len(shapes) == n:
                break
            r = rng.uniform(side / 10, side / 6)
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            if all(abs(cx - s.cx) > r + s.r + 1 or abs(cy - s.cy) > r + s.r + 1 for s in shapes):
                shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), cx, cy, r))
        if len(shapes) == n:
            return shapes


def draw_scene(shapes: list[Shape], width: int, height: int, background: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (width, height), background)
    d = ImageDraw.Draw(img)
    for s in shapes:
        box = (s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r)
        fill = COLORS[s.color]
        if s.kind == "circle":
            d.ellipse(box, fill=fill)
        elif s.kind == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(s.cx, s.cy - s.r), (s.cx - s.r, s.cy + s.r), (s.cx + s.r, s.cy + s.r)], fill=fill)
    return img


def caption(shapes: list[Shape]) -> str:
    """Shapes from left to right: "a red circle, a blue square and a green triangle"."""
    parts = [f"a {s.describe()}" for s in sorted(shapes, key=lambda s: s.cx)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def shape_questions(shapes: list[Shape], rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """Every valid question of each type; `exist` holds one "yes" and one "no" question."""
    kinds = [s.kind for s in shapes]
    colors = [s.color for s in shapes]
    present = {(s.color, s.kind) for s in shapes}
    absent = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in present]
    yes_c, yes_k = rng.choice(sorted(present))
    no_c, no_k = rng.choice(absent)
    return {
        "color": [(COLOR_Q.format(shape=k), colors[kinds.index(k)]) for k in SHAPES if kinds.count(k) == 1],
        "shape": [(SHAPE_Q.format(color=c), kinds[colors.index(c)]) for c in COLORS if colors.count(c) == 1],
        "count": [(COUNT_Q, str(len(shapes)))],
        "exist": [(EXIST_Q.format(color=yes_c, shape=yes_k), "yes"), (EXIST_Q.format(color=no_c, shape=no_k), "no")],
    }


def text_image(word: str, width: int, height: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font_size = max(8, int(min(height * 0.45, width * 1.6 / max(len(word), 1))))
    font = ImageFont.load_default(size=font_size)
    x0, y0, x1, y1 = d.textbbox((0, 0), word, font=font)
    tw, th = x1 - x0, y1 - y0
    x = rng.uniform(0, max(0, width - tw)) - x0
    y = rng.uniform(0, max(0, height - th)) - y0
    d.text((x, y), word, fill=(0, 0, 0), font=font)
    return img


def words_image(words: list[str], width: int, height: int, rng: random.Random) -> Image.Image:
    """Words in reading order: on one line when the canvas is wide (or square), one per line when
    it is tall; each line's text sized to fit its share of the canvas."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    lines = [" ".join(words)] if width >= height else words
    slot = height / len(lines)
    longest = max(len(line) for line in lines)
    font = ImageFont.load_default(size=max(8, int(min(slot * 0.6, width * 1.5 / longest))))
    for k, line in enumerate(lines):
        x0, y0, x1, y1 = d.textbbox((0, 0), line, font=font)
        x = rng.uniform(0, max(0, width - (x1 - x0))) - x0
        y = k * slot + rng.uniform(0, max(0, slot - (y1 - y0))) - y0
        d.text((x, y), line, fill=(0, 0, 0), font=font)
    return img


def word_glyphs(out: str | Path, n: int, seed: int = 0, size: int = 64) -> Path:
    """`n` images of one `WORD_LIST` word each, large on a `size` square (the scale a slice of a
    words image shows), captioned with the word: `glyphs_captions.json` under `out`, what a tiny
    encoder learns to read from beside the words images' own captions."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"glyphs-{seed}")
    records = []
    for i in range(n):
        word, name = rng.choice(WORD_LIST), f"images/glyph_{i:06d}.png"
        text_image(word, size, size, rng).save(out / name)
        records.append(_record(f"glyph_{i:06d}", name, [(CAPTION_PROMPT, word)]))
    path = out / "glyphs_captions.json"
    atomic_write_text(path, json.dumps(records, indent=1))
    return path


def _record(rid: str, image: str, turns: list[tuple[str, str]]) -> dict:
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" + q) if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {"id": rid, "image": image, "conversations": conv}


def synth(
    out: str | Path,
    task: str = "shapes",
    n: int = 1000,
    seed: int = 0,
    width: int = 64,
    height: int = 64,
    prefix: str | None = None,
    conversations: str = "single",
) -> dict[str, Path]:
    """Write `n` images of `task` and its three JSON files under `out`; return the JSON paths."""
    if task not in ("shapes", "text", "words"):
        raise ValueError(f"unknown synthetic task {task!r} (use 'shapes', 'text' or 'words')")
    if conversations not in ("single", "multi"):
        raise ValueError(f"unknown conversations {conversations!r} (use 'single' or 'multi')")
    out = Path(out)
    prefix = prefix or task
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{task}-{seed}")
    captions, sft, qa = [], [], []
    for i in tqdm(range(n), desc=f"synth {prefix}", unit="img", leave=False):
        name = f"images/{prefix}_{i:06d}.png"
        rid = f"{prefix}_{i:06d}"
        if task == "shapes":
            shapes = sample_scene(rng, width, height)
            bg = tuple(rng.randint(225, 255) for _ in range(3))
            img = draw_scene(shapes, width, height, bg)
            cap = caption(shapes)
            qs = shape_questions(shapes, rng)
            turns = [q for qtype in qs.values() for q in qtype] + [(CAPTION_PROMPT, cap)]
            rng.shuffle(turns)
            for qtype, items in qs.items():
                if not items:  # e.g. no colour occurs exactly once
                    continue
                q, a = rng.choice(items)
                qa.append(_record(f"{rid}_{qtype}", name, [(q, a)]))
        elif task == "words":
            words = rng.sample(WORD_LIST, rng.randint(2, 4))
            img = words_image(words, width, height, rng)
            cap = ", ".join(words[:-1]) + " and " + words[-1]  # a list caption: one phrase per word
            asks = [(WORD_Q.format(ordinal=ORDINALS[k]), w) for k, w in enumerate(words)]
            lengths = [(LETTERS_Q.format(ordinal=ORDINALS[k]), str(len(w))) for k, w in enumerate(words)]
            turns = asks + lengths + [(WORDS_Q, str(len(words)))]
            qa.append(_record(f"{rid}_word", name, [rng.choice(asks)]))
            qa.append(_record(f"{rid}_letters", name, [rng.choice(lengths)]))
            qa.append(_record(f"{rid}_words", name, [(WORDS_Q, str(len(words)))]))
        else:
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
            img = text_image(word, width, height, rng)
            cap = f'the text "{word}"'
            turns = [(TEXT_Q, word)]
            qa.append(_record(f"{rid}_text", name, [(TEXT_Q, word)]))
        img.save(out / name)
        captions.append(_record(rid, name, [(CAPTION_PROMPT, cap)]))
        if conversations == "multi" or len(turns) == 1:
            sft.append(_record(rid, name, turns))
        else:
            sft += [_record(f"{rid}_{k}", name, [turn]) for k, turn in enumerate(turns)]
    paths = {}
    for kind, records in (("captions", captions), ("sft", sft), ("qa", qa)):
        paths[kind] = out / f"{prefix}_{kind}.json"
        atomic_write_text(paths[kind], json.dumps(records, indent=1))
    return paths


def synth_command(
    out: str,
    task: str = "shapes",
    n: int = 1000,
    seed: int = 0,
    width: int = 64,
    height: int = 64,
    prefix: str | None = None,
    conversations: Literal["single", "multi"] = "single",
) -> None:
    """Write deterministic synthetic VQA data (LLaVA JSON + PNGs).

    Args:
        out: output folder (JSON files and images/).
        task: shapes, text, or words (a line of words on a wide canvas, a word per line on a tall one).
        n: number of images.
        seed: random seed; the same seed gives the same data.
        width: image width in pixels.
        height: image height in pixels.
        prefix: file-name prefix (default: the task name).
        conversations: `single`: each question of the sft file is a record of its own; `multi`:
            all questions of an image in one multi-turn conversation (answers can then be read
            off earlier turns instead of the image).
    """
    for kind, path in synth(out, task, n, seed, width, height, prefix, conversations).items():
        print(f"{kind}: {path}")


def split_key(split: str, task: str, kind: str) -> str:
    """The name `synth_splits` gives a split's file: `{split}_{task}_{kind}` (kind: captions, sft, qa)."""
    return f"{split}_{task}_{kind}"


def synth_splits(folder: str | Path, splits: list[tuple], conversations: str = "single") -> dict[str, str]:
    """Several splits of both tasks: `splits` holds (split, n_shapes, n_text, seed) or (split,
    n_shapes, n_text, seed, width, height); returns {"{split}_{task}_{kind}": path} for every file
    written (a count of 0 writes nothing). Images are 64 x 64 unless a split says otherwise."""
    paths = {}
    for split, n_shapes, n_text, seed, *size in splits:
        width, height = size or (64, 64)
        for task, n in (("shapes", n_shapes), ("text", n_text)):
            if n == 0:
                continue
            written = synth(Path(folder) / split, task, n, seed, width, height, conversations=conversations)
            paths.update({split_key(split, task, kind): str(p) for kind, p in written.items()})
    return paths
