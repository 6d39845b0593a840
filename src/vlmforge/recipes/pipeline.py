"""What the recipes share: the two training stages in a row (align, when there is caption data,
then sft from the aligned model, both in one run folder), which the demo, ablate's cells and the
cache bench's accuracy runs train; and the synthetic data and tiny backbones that ablate and the
cache bench make once and share."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from vlmforge.config import ModelConfig, TinySpec, TrainConfig


def align_then_sft(
    model_cfg: ModelConfig,
    align: TrainConfig,
    sft: TrainConfig,
    out: str | Path,
    align_data: list[str],
    sft_data: list[str],
    phase=None,
    warm_data: list[str] | None = None,
    warm_steps: int = 0,
    **common,
) -> Path:
    """Train `out/align` then `out/sft` (`common`: TrainConfig fields both stages share, e.g. seed,
    cache: not the sft stage's when it trains the vision tower); returns the final model folder.
    Without align data, sft starts from the backbones. With `warm_data` and `warm_steps`, an sft
    stage of `warm_steps` on `warm_data` alone (`out/warm`) comes before the sft on all of
    `sft_data` (a curriculum: what must form first gets steps of its own).
    `phase(name, fn)`: runs each stage (the demo's, to time and record it); default: calls fn."""
    from vlmforge.train.loop import train

    phase = phase or (lambda name, fn: fn())
    out = Path(out)
    sft_common = dict(common)
    if sft.vision_mode != "frozen":  # the shared store holds the tower's output: stale once it trains
        sft_common.update(cache=None, cache_dtype=None)
    sft = dataclasses.replace(sft, data=sft_data, out=str(out / "sft"), **sft_common)
    init = None
    if align_data:
        align = dataclasses.replace(align, data=align_data, out=str(out / "align"), **common)
        init = phase("align", lambda: str(train(align, model_cfg, None, resume=True)))
    if warm_data and warm_steps:
        warm = dataclasses.replace(sft, data=warm_data, out=str(out / "warm"), max_steps=warm_steps)
        init = phase("warm", lambda: str(train(warm, None if init else model_cfg, init, resume=True)))
    return Path(phase("sft", lambda: str(train(sft, None if init else model_cfg, init, resume=True))))


@dataclasses.dataclass
class SyntheticSetup:
    """The synthetic data and tiny backbones `synthetic_setup` made: the files by the names
    `data.synthetic.split_key` gives them, the training data of each stage, and the backbones'
    folders (`small`, and `large` when asked for)."""

    files: dict[str, str]
    align_data: list[str]
    sft_data: list[str]
    small: dict[str, str]
    large: dict[str, str] | None = None

    def qa(self, task: str) -> str:
        """The held-out questions of a task (`shapes`, `text`, `words`, `letters`, `count`)."""
        from vlmforge.data.synthetic import split_key

        return self.files[split_key("test", task, "qa")]


# the words task's canvases: a line of words on a wide one, a word per line on a tall one
WORDS_CANVASES = {"wide": (256, 64), "tall": (64, 192)}


def words_setup(folder: Path, n: int, n_test: int) -> dict[str, str]:
    """The synthetic `words` task on wide and tall canvases (`WORDS_CANVASES`, `n` images of each
    to train on, `n_test` of each held out): `train_words_{captions,sft}` and the held-out
    questions as three QA files, `test_words_qa` (which word is k-th), `test_letters_qa` (how many
    letters it has) and `test_count_qa` (how many words). Each canvas and split has its own seed
    (train 0 and 1, test 2 and 3). The captions also hold `n` single words drawn large
    (`synthetic.word_glyphs`): the scale at which a slice shows a word, so that the tiny encoder
    learns to read at both scales."""
    from vlmforge.data.synthetic import question_type, split_key, synth, word_glyphs
    from vlmforge.io import atomic_write_text

    task_of = {"word": "words", "letters": "letters", "words": "count"}  # question type -> QA file
    paths, test = {}, {"words": [], "letters": [], "count": []}
    for split, count, seed in (("train", n, 0), ("test", n_test, 1)):
        files = {kind: [] for kind in ("captions", "sft", "qa")}
        for k, (canvas, (w, h)) in enumerate(WORDS_CANVASES.items()):  # images relative to folder/split
            made = synth(folder / split, "words", count, 2 * seed + k, w, h, prefix=f"words_{canvas}")
            for kind, path in made.items():
                files[kind] += json.loads(Path(path).read_text())
        if split == "train":  # single words, large, beside the captions (and what the encoder reads)
            paths["train_glyphs_captions"] = str(word_glyphs(folder / split, n, seed))
            files["captions"] += json.loads(Path(paths["train_glyphs_captions"]).read_text())
        for kind in ("captions", "sft") if split == "train" else ():
            paths[split_key("train", "words", kind)] = str(folder / split / f"words_{kind}.json")
            atomic_write_text(Path(paths[split_key("train", "words", kind)]), json.dumps(files[kind], indent=1))
        for r in files["qa"] if split == "test" else ():
            test[task_of[question_type(r["conversations"][0]["value"])]].append(r)
    for task, records in test.items():
        paths[split_key("test", task, "qa")] = str(folder / "test" / f"{task}_qa.json")
        atomic_write_text(Path(paths[split_key("test", task, "qa")]), json.dumps(records, indent=1))
    return paths


def synthetic_setup(
    out: str | Path,
    n_shapes: int,
    n_text: int,
    n_test: int,
    spec: TinySpec,
    large: TinySpec | None = None,
    data: dict | None = None,
    n_words: int = 0,
    read: bool = False,
) -> SyntheticSetup:
    """The synthetic train and test data (seeds 0 and 1) and the tiny backbones made from them, in
    `out`, made once (`out/shared.json` records them; a second call reads it): what ablate's cells
    and the cache bench's accuracy runs share. `large`: also an LM of that spec beside the small
    one (same tokenizer and encoder). `data`: `{"align": [...], "sft": [...]}`, training files of
    the caller's own, trained on instead of the synthetic ones (and in the tokenizer). `n_words`:
    also the `words` task (`words_setup`, `n_test` held out per canvas), trained on instead of
    shapes and text unless `data` says otherwise. `read`: the encoder also learns to read
    (`pretrain --reading`) the text task's images and the words task's single large words."""
    import shutil

    from vlmforge.config import save_json
    from vlmforge.data.synthetic import split_key, synth_splits
    from vlmforge.recipes.tiny import pretrain

    out = Path(out)
    done = out / "shared.json"
    if done.exists():
        made = json.loads(done.read_text())
        fields = {f.name for f in dataclasses.fields(SyntheticSetup)}
        if not isinstance(made, dict) or not {"files", "align_data", "sft_data", "small"} <= set(made) <= fields:
            raise ValueError(f"{done}: not the record of a synthetic setup this vlmforge reads; use a new folder")
        return SyntheticSetup(**made)
    paths = synth_splits(out / "data", [("train", n_shapes, n_text, 0), ("test", n_test, n_test, 1)])
    if n_words:
        paths.update(words_setup(out / "data", n_words, n_test))
    tasks = [t for t in ("shapes", "text", "words") if split_key("train", t, "sft") in paths]
    synthetic = [paths[split_key("train", t, k)] for t in tasks for k in ("captions", "sft")]
    if data:
        align_data, sft_data = data.get("align", []), data["sft"]
    else:
        align_data, sft_data = synthetic[0::2], synthetic[1::2]
    # the tiny backbones stand in for pretrained checkpoints: made from the synthetic corpus plus
    # the caller's own data (so that the tokenizer covers its words)
    train_files = list(dict.fromkeys(synthetic + align_data + sft_data))
    # SigLIP learns from captions only: the sft files hold one-question records that look like caption pairs
    captions = list(dict.fromkeys(synthetic[0::2] + align_data))
    reading = [paths[k] for k in ("train_text_sft", "train_glyphs_captions") if read and k in paths]
    small = pretrain(train_files, out / "backbones" / "small", spec, 0, captions=captions, reading=reading or None)
    made = SyntheticSetup(paths, align_data, sft_data, {k: str(v) for k, v in small.items()})
    if large is not None:
        large_dir = out / "backbones" / "large"
        for part in ("tokenizer", "vision"):
            if not (large_dir / part).exists():
                shutil.copytree(small[part], large_dir / part)
        made.large = {k: str(v) for k, v in pretrain(train_files, large_dir, large, 0).items()}
    save_json(dataclasses.asdict(made), done)
    return made
