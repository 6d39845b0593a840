"""The standard benchmarks: where their files are, how each record is asked, how it is scored.

Each benchmark is a small object registered by name (`BENCHMARKS`): it finds its files under a
data root, turns each record into a `Sample` (images, the prompt with the community's standard
suffix, the references), and scores a list of answered rows with the rules of `metrics`. Prompts
and scoring follow lmms-eval's task of the same name, so scores are comparable with published
ones.

Layouts read (nothing is downloaded):
- the Hugging Face `datasets` parquet files of the common releases, as `huggingface-cli download
  REPO --repo-type dataset --local-dir ROOT/NAME` leaves them (lmms-lab/VQAv2, lmms-lab/textvqa,
  lmms-lab/DocVQA, lmms-lab/MMMU, lmms-lab/POPE, Lin-Chen/MMStar, lmms-lab/COCO-Caption2017),
  read through `datasets` (`data.formats.load_files`: arrow-cached once, memory-mapped); images
  are `{bytes, path}` cells, not decoded until asked;
- LLaVA's eval layout (playground/data/eval/NAME): a `llava_*.jsonl` question file (`question_id`,
  `image`, `text`) with its image folder, and the answers either in each line (`answer`,
  `answers` or `label`), in `TextVQA_0.5.1_val.json` (TextVQA) or in `coco/coco_pope_*.json`
  (POPE, matched in order within each category, as LLaVA's `eval_pope.py` does). The question
  text of these files already carries LLaVA's prompt and is used as it is.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vlmforge.config import check_choice
from vlmforge.data.formats import DataError, dataset_rows, load_files, load_records, read_jsonl
from vlmforge.data.synthetic import question_type
from vlmforge.eval import metrics as M
from vlmforge.io import read_json

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."


@dataclass
class Sample:
    """One question: `images` are encoded bytes or file paths, `prompt` the text sent with them."""

    id: str
    prompt: str
    images: list
    answer: object
    meta: dict = field(default_factory=dict)


class Benchmark:
    """Base: a name, the folder names it may live under, its default split and how to score it."""

    name = ""
    folders: tuple[str, ...] = ()
    split = "validation"
    metric = ""  # the rule with `lmms-eval` scoring (the default)
    official = ""  # the rule with `official` scoring, where the benchmark's own code differs
    prompt_template = ""

    # -- finding and reading files ------------------------------------------------------------
    def locate(self, root: str | Path) -> Path:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{self.name}: data root {root} is not a folder")
        wanted = {n.lower() for n in (self.name, *self.folders)}
        for child in sorted(root.iterdir()):
            if child.is_dir() and child.name.lower() in wanted:
                return child
        tried = ", ".join(sorted(wanted))
        raise FileNotFoundError(f"{self.name}: no folder named one of [{tried}] under {root}")

    def rows(self, root: str | Path, split: str | None = None) -> tuple[int, Iterator[dict], str]:
        """(number of records, an iterator over them, a description of the source)."""
        folder = self.locate(root)
        split = split or self.split
        files = parquet_files(folder, split)
        if files:
            return parquet_rows(files) + (f"parquet: {', '.join(str(f) for f in files)}",)
        questions = sorted(folder.glob("llava_*.jsonl")) or sorted(folder.glob("*.jsonl"))
        if questions:
            rows = self.llava_rows(folder, questions[0])
            return len(rows), iter(rows), f"llava jsonl: {questions[0]}"
        raise FileNotFoundError(f"{self.name}: no '{split}' parquet files and no llava_*.jsonl under {folder}")

    def llava_rows(self, folder: Path, questions: Path) -> list[dict]:
        rows = read_jsonl(questions)
        images = ImageFinder(folder)
        for r in rows:
            missing = [k for k in ("question_id", "image", "text") if k not in r]
            if missing:
                raise DataError(
                    f"{questions}: a line lacks {missing} (LLaVA eval layout needs question_id, image, text)"
                )
            r["image_path"] = images.find(r["image"])
            r["llava"] = True
        return rows

    # -- records to samples, rows to scores ---------------------------------------------------
    def sample(self, row: dict) -> Sample:
        raise NotImplementedError

    def llava_sample(self, row: dict, answer) -> Sample:
        meta = {"category": row["category"]} if "category" in row else {}
        return Sample(
            str(row["question_id"]), row["text"].replace("<image>", "").strip(), [row["image_path"]], answer, meta
        )

    def score(self, rows: list[dict], scoring: str = "lmms-eval", seed: int | None = None) -> dict:
        """{"metric": name, "score": value in [0, 1] (x100 in reports), "n", "breakdown", ...};
        `scoring`: lmms-eval's rules or the benchmark's official ones (`metrics.SCORINGS`); `seed`:
        multiple choice's fallback letter (MMMU)."""
        raise NotImplementedError

    def describe(self, scoring: str = "lmms-eval") -> dict:
        rule = self.official if scoring == "official" and self.official else self.metric
        return {"scoring": rule, "prompt": self.prompt_template, "split": self.split}


# ---------------------------------------------------------------------------------------------
# file helpers


def parquet_files(folder: Path, split: str) -> list[Path]:
    """Parquet files of `split` under `folder`: named `SPLIT-*.parquet` / `SPLIT.parquet` or in a
    folder named SPLIT; a folder with parquet files but no split names (MMStar) is one split."""
    files = sorted(folder.rglob("*.parquet"))
    named = [f for f in files if f.stem == split or f.stem.startswith(f"{split}-") or f.parent.name == split]
    if named:
        return named
    splits = ("train", "validation", "val", "test", "dev", "testdev")
    unnamed = [f for f in files if not any(f.stem == s or f.stem.startswith(f"{s}-") for s in splits)]
    return unnamed if len(unnamed) == len(files) else []


def parquet_rows(files: list[Path]) -> tuple[int, Iterator[dict]]:
    """(rows, an iterator over them) of parquet files, read through `datasets`."""
    try:
        ds = load_files(files)
    except Exception as e:  # datasets raises many kinds; name the files and the first line
        first = (str(e).splitlines() or [""])[0][:300]
        raise DataError(f"{files[0].parent}: cannot read parquet ({type(e).__name__}: {first})") from e
    return len(ds), dataset_rows(ds)


class ImageFinder:
    """Resolves LLaVA eval image names against the benchmark folder and its subfolders."""

    def __init__(self, folder: Path):
        self.dirs = [folder] + sorted(d for d in folder.iterdir() if d.is_dir())

    def find(self, name: str) -> str:
        for d in self.dirs:
            if (d / name).is_file():
                self.dirs.remove(d)
                self.dirs.insert(0, d)  # the folder that matched is tried first next time
                return str(d / name)
        return str(self.dirs[0] / name)  # reported as missing when the image is loaded


def image_cell(cell, what: str):
    """A parquet image cell (`{bytes, path}`) as bytes; a missing cell raises naming the record."""
    if isinstance(cell, dict) and cell.get("bytes"):
        return cell["bytes"]
    if isinstance(cell, (bytes, bytearray)) and cell:
        return bytes(cell)
    raise DataError(f"{what}: no image bytes in the record")


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def by_key(rows: list[dict], key: str, fn) -> dict:
    groups = defaultdict(list)
    for r in rows:
        groups[r["meta"].get(key, "all")].append(r)
    return {k: {"n": len(v), "score": fn(v)} for k, v in sorted(groups.items())}


# ---------------------------------------------------------------------------------------------
# the benchmarks


class VQAv2(Benchmark):
    name, folders = "vqav2", ("VQAv2",)
    metric = "vqa_accuracy (lmms-eval 0.7.3: punctuation, digits and articles on every answer)"
    official = "vqa_accuracy (VQAv2's vqaEval.py: answers' punctuation processed only if they differ)"
    prompt_template = "{question}" + SHORT_ANSWER

    def sample(self, row):
        if row.get("llava"):
            answers = row.get("answers") or ([row["answer"]] if "answer" in row else None)
            return self.llava_sample(row, answers)
        answers = [a["answer"] if isinstance(a, dict) else a for a in row.get("answers") or []]
        qid = str(row["question_id"])
        meta = {"answer_type": row.get("answer_type", "all")}
        return Sample(qid, row["question"] + SHORT_ANSWER, [image_cell(row["image"], f"vqav2 {qid}")], answers, meta)

    def score(self, rows, scoring="lmms-eval", seed=None):
        check_choice("scoring", scoring, M.SCORINGS)
        rule = "vqaeval" if scoring == "official" else "vqav2"
        fn = lambda rs: mean(M.vqa_accuracy(r["prediction"], r["answer"], rule) for r in rs)
        return {"metric": "accuracy", "score": fn(rows), "breakdown": by_key(rows, "answer_type", fn)}


class TextVQA(Benchmark):
    name, folders, metric = "textvqa", ("TextVQA",), "vqa_accuracy (EvalAI processing of every answer; lmms-eval 0.7.3)"
    prompt_template = "{question.capitalize()}" + SHORT_ANSWER

    def sample(self, row):
        if row.get("llava"):
            return self.llava_sample(row, row.get("answers"))
        qid = str(row["question_id"])
        img = image_cell(row["image"], f"textvqa {qid}")
        return Sample(qid, row["question"].capitalize() + SHORT_ANSWER, [img], list(row.get("answers") or []))

    def llava_rows(self, folder, questions):
        rows = super().llava_rows(folder, questions)
        ann_path = folder / "TextVQA_0.5.1_val.json"
        if ann_path.is_file():
            annotations = read_json(ann_path, "annotations", DataError)["data"]
            answers = {str(d["question_id"]): d["answers"] for d in annotations}
            for r in rows:
                r.setdefault("answers", answers.get(str(r["question_id"])))
        return rows

    def score(self, rows, scoring="lmms-eval", seed=None):
        check_choice("scoring", scoring, M.SCORINGS)
        return {"metric": "accuracy", "score": mean(M.vqa_accuracy(r["prediction"], r["answer"]) for r in rows)}


class DocVQA(Benchmark):
    name, folders, metric = "docvqa", ("DocVQA",), "anls (threshold 0.5; lmms-eval 0.7.3)"
    prompt_template = "{question}" + SHORT_ANSWER

    def sample(self, row):
        if row.get("llava"):
            return self.llava_sample(row, row.get("answers"))
        qid = str(row["questionId"])
        img = image_cell(row["image"], f"docvqa {qid}")
        return Sample(qid, row["question"] + SHORT_ANSWER, [img], list(row.get("answers") or []))

    def score(self, rows, scoring="lmms-eval", seed=None):
        check_choice("scoring", scoring, M.SCORINGS)
        return {"metric": "anls", "score": mean(M.anls(r["prediction"], r["answer"]) for r in rows)}


class MMMU(Benchmark):
    name, folders, metric = "mmmu", ("MMMU",), "accuracy (MMMU letter / open-answer parsing; lmms-eval 0.7.3)"
    prompt_template = (
        "{question}\n{A. option}\n{B. option}…\n\n" + LETTER_ANSWER + "  |  open: {question}\n\n" + SHORT_ANSWER.strip()
    )

    def sample(self, row):
        qid = str(row["id"])
        mc = row.get("question_type") == "multiple-choice"
        options = ast.literal_eval(row["options"]) if mc else []
        if mc:
            listed = "\n".join(f"{c}. {o}" for c, o in zip(M.option_letters(len(options)), options))
            prompt = f"{row['question']}\n{listed}\n\n{LETTER_ANSWER}"
        else:
            prompt = f"{row['question']}\n\n{SHORT_ANSWER.strip()}"
        # lmms-eval: the images are those the text names (<image k>), in k order, each once
        keys = sorted({t.strip("<>").replace(" ", "_") for t in re.findall(r"<image \d+>", prompt)})
        images = [image_cell(row.get(k), f"mmmu {qid} {k}") for k in keys]
        subject = re.match(rf"^{qid.split('_')[0]}_(.+?)_\d+$", qid)
        meta = {
            "question_type": row.get("question_type"),
            "options": options,
            "subject": subject.group(1) if subject else "all",
        }
        return Sample(qid, prompt, images, row["answer"], meta)

    def score(self, rows, scoring="lmms-eval", seed=None):
        check_choice("scoring", scoring, M.SCORINGS)

        def correct(r):
            if r["meta"]["question_type"] == "multiple-choice":
                return M.parse_multi_choice(r["prediction"], r["meta"]["options"], seed) == r["answer"]
            return M.open_answer_correct(r["prediction"], r["answer"])

        fn = lambda rs: mean(correct(r) for r in rs)
        return {"metric": "accuracy", "score": fn(rows), "breakdown": by_key(rows, "subject", fn)}


class POPE(Benchmark):
    name, folders = "pope", ("POPE",)
    metric = "f1 (yes = positive; lmms-eval 0.7.3: an answer counts as it is, lowercased and stripped)"
    official = "f1 (yes = positive; POPE's evaluate.py reading of free answers as yes / no)"
    split = "test"
    prompt_template = "{question}" + SHORT_ANSWER

    def sample(self, row):
        if row.get("llava"):
            return self.llava_sample(row, row.get("label", row.get("answer")))
        qid = str(row["question_id"])
        img = image_cell(row["image"], f"pope {qid}")
        return Sample(
            qid, row["question"].strip() + SHORT_ANSWER, [img], row["answer"], {"category": row.get("category", "all")}
        )

    def llava_rows(self, folder, questions):
        rows = super().llava_rows(folder, questions)
        if all("label" in r or "answer" in r for r in rows):
            return rows
        for label_file in sorted(folder.rglob("coco_pope_*.json")):
            category = label_file.stem.removeprefix("coco_pope_")
            labels = [line.get("label") for line in read_jsonl(label_file)]
            asked = [r for r in rows if r.get("category") == category]
            if len(asked) != len(labels):
                raise DataError(
                    f"{label_file}: {len(labels)} labels for {len(asked)} '{category}' questions in {questions}"
                )
            for r, label in zip(asked, labels):
                r["label"] = label
        unlabeled = [r["question_id"] for r in rows if "label" not in r and "answer" not in r]
        if unlabeled:
            raise DataError(f"{questions}: {len(unlabeled)} questions have no label (first: {unlabeled[0]})")
        return rows

    def score(self, rows, scoring="lmms-eval", seed=None):
        scores = lambda rs: M.pope_scores([r["prediction"] for r in rs], [r["answer"] for r in rs], scoring)  # noqa: E731
        overall = scores(rows)
        strict = mean(r["prediction"].lower().strip() == r["answer"].lower().strip() for r in rows)
        breakdown = by_key(rows, "category", lambda rs: scores(rs)["f1"])
        return {
            "metric": "f1",
            "score": overall["f1"],
            **{k: v for k, v in overall.items() if k != "f1"},
            "strict_accuracy": strict,
            "breakdown": breakdown,
        }


class MMStar(Benchmark):
    name, folders = "mmstar", ("MMStar",)
    metric = "accuracy (lmms-eval 0.7.3's choice-letter extraction; mean over l2 categories)"
    official = "accuracy (MMStar's first-character matcher; mean over l2 categories)"
    split = "val"
    # lmms-eval's MMStar suffix has no final period; " Please answer yes or no." is removed first
    suffix = "\nAnswer with the option's letter from the given choices directly"
    prompt_template = "{question}" + suffix

    def sample(self, row):
        qid = str(row["index"])
        img = image_cell(row["image"], f"mmstar {qid}")
        meta = {"category": row.get("category", "all"), "l2_category": row.get("l2_category", "all")}
        question = row["question"].strip().replace(" Please answer yes or no.", "")
        return Sample(qid, question + self.suffix, [img], row["answer"], meta)

    def score(self, rows, scoring="lmms-eval", seed=None):
        fn = lambda rs: mean(M.mmstar_correct(r["prediction"], r["answer"], scoring) for r in rs)
        l2 = by_key(rows, "l2_category", fn)
        # lmms-eval's "average": the mean of the per-l2-category accuracies
        return {"metric": "accuracy", "score": mean(v["score"] for v in l2.values()), "breakdown": l2}


class COCOCaption(Benchmark):
    name, folders, metric = (
        "coco_cap",
        ("COCO-Caption2017", "coco_caption", "COCO-Caption"),
        "CIDEr-D (x100 = CIDEr x100; coco-caption's scorer, as lmms-eval 0.7.3 calls it)",
    )
    split = "val"
    prompt_template = "Provide a one-sentence caption for the provided image."

    def sample(self, row):
        qid = str(row.get("question_id", row.get("id")))
        img = image_cell(row["image"], f"coco_cap {qid}")
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        return Sample(qid, self.prompt_template, [img], answers)

    def score(self, rows, scoring="lmms-eval", seed=None):
        check_choice("scoring", scoring, M.SCORINGS)
        cands = [M.ptb_tokenize(r["prediction"]) for r in rows]
        refs = [[M.ptb_tokenize(a) for a in r["answer"]] for r in rows]
        corpus, _ = M.cider_d(cands, refs)
        return {"metric": "cider_d", "score": corpus}


class QAFile(Benchmark):
    """A LLaVA-format QA file as a task: the first user turn asked as written, the first assistant
    turn the reference; exact match after VQA normalisation, broken down by question type (the
    synthetic templates'; other questions are `other`)."""

    metric, prompt_template, split = "exact match (VQA normalisation)", "the file's question as written", "all"

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.stem

    def rows(self, root=None, split=None):
        records = load_records(self.path)
        return len(records), iter(records), f"QA file: {self.path}"

    def sample(self, record):
        question = next(m["content"] for m in record.messages if m["role"] == "user")
        reference = next((m["content"] for m in record.messages if m["role"] == "assistant"), "")
        images = [str(p) for p in record.images]
        return Sample(record.id, question, images, reference, {"type": question_type(question)})

    def score(self, rows, scoring="lmms-eval", seed=None):
        check_choice("scoring", scoring, M.SCORINGS)
        fn = lambda rs: mean(M.exact_match(r["prediction"], r["answer"]) for r in rs)
        return {"metric": "accuracy", "score": fn(rows), "breakdown": by_key(rows, "type", fn)}


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b for b in (VQAv2(), TextVQA(), DocVQA(), MMMU(), POPE(), MMStar(), COCOCaption())
}


def get_benchmark(name: str | Benchmark) -> Benchmark:
    """A registered benchmark by name (a task object is returned as it is)."""
    if isinstance(name, Benchmark):
        return name
    try:
        return BENCHMARKS[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})") from None
