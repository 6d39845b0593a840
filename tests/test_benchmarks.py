"""Benchmark loaders on tiny files in each real layout, scoring end to end, resume, endpoint."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmforge.cli import main
from vlmforge.data.formats import DataError
from vlmforge.eval.benchmarks import BENCHMARKS, Sample
from vlmforge.eval.harness import EndpointError, EndpointGenerator, evaluate_benchmarks

SUFFIX = "\nAnswer the question using a single word or phrase."


def png(color, size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def cell(color):
    return {"bytes": png(color), "path": None}


COLORS = ["red", "green", "blue", "yellow"]


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One folder per benchmark, as `huggingface-cli download` / LLaVA's playground leave them."""
    root = tmp_path_factory.mktemp("benchdata")
    answers = lambda a, b: (
        [{"answer": a, "answer_confidence": "yes", "answer_id": i} for i in range(1, 8)]
        + [{"answer": b, "answer_confidence": "maybe", "answer_id": i} for i in range(8, 11)]
    )
    write_parquet(
        root / "VQAv2/data/validation-00000-of-00001.parquet",
        [
            {
                "question_type": "what color",
                "multiple_choice_answer": c,
                "answers": answers(c, "white"),
                "image_id": i,
                "answer_type": "other",
                "question_id": 100 + i,
                "question": "What color is it?",
                "image": cell(c),
            }
            for i, c in enumerate(COLORS)
        ],
    )
    write_parquet(
        root / "textvqa/data/validation-00000-of-00001.parquet",
        [
            {
                "image_id": str(i),
                "question_id": i,
                "question": "what does it say?",
                "image": cell(c),
                "answers": [c] * 9 + ["sign"],
                "ocr_tokens": [c],
            }
            for i, c in enumerate(COLORS)
        ],
    )
    write_parquet(
        root / "textvqa/data/train-00000-of-00001.parquet",
        [  # another split: never read
            {
                "image_id": "x",
                "question_id": 99,
                "question": "q",
                "image": cell("red"),
                "answers": ["x"] * 10,
                "ocr_tokens": [],
            }
        ],
    )
    write_parquet(
        root / "DocVQA/DocVQA/validation-00000-of-00001.parquet",
        [
            {
                "questionId": str(50 + i),
                "question": "What is the title?",
                "question_types": ["layout"],
                "image": cell(c),
                "docId": i,
                "answers": [f"{c} report", f"the {c} report"],
                "data_split": "val",
            }
            for i, c in enumerate(COLORS)
        ],
    )
    mmmu = []
    for i, c in enumerate(COLORS):
        mmmu.append(
            {
                "id": f"validation_Art_{i + 1}",
                "question": "<image 1> Which color is shown?",
                "options": str(COLORS),
                "answer": "ABCD"[i],
                "question_type": "multiple-choice",
                "image_1": cell(c),
                "image_2": None,
                "subfield": "x",
            }
        )
    mmmu.append(
        {
            "id": "validation_Math_1",
            "question": "How many shapes? <image 1> <image 2>",
            "options": "[]",
            "answer": "3",
            "question_type": "open",
            "image_1": cell("red"),
            "image_2": cell("blue"),
            "subfield": "y",
        }
    )
    write_parquet(root / "MMMU/data/validation-00000-of-00001.parquet", mmmu)
    write_parquet(
        root / "POPE/data/test-00000-of-00001.parquet",
        [
            {
                "id": str(i),
                "question_id": str(i),
                "question": f"Is there a {c} square in the image?",
                "answer": "yes" if i % 2 == 0 else "no",
                "image_source": "x",
                "image": cell(c),
                "category": "random" if i < 2 else "popular",
            }
            for i, c in enumerate(COLORS)
        ],
    )
    write_parquet(
        root / "MMStar/mmstar.parquet",
        [
            {
                "index": i,
                "question": "Which color?\nOptions: A: red, B: green, C: blue, D: yellow",
                "image": cell(c),
                "answer": "ABCD"[i],
                "category": "coarse perception",
                "l2_category": "color" if i < 3 else "other",
                "meta_info": {"source": "x"},
            }
            for i, c in enumerate(COLORS)
        ],
    )
    write_parquet(
        root / "COCO-Caption2017/data/val-00000-of-00001.parquet",
        [
            {
                "question_id": f"{i}.jpg",
                "image": cell(c),
                "question": "Provide a one-sentence caption.",
                "answer": [f"a plain {c} picture", f"an image that is all {c}", f"{c} everywhere"],
                "id": i,
            }
            for i, c in enumerate(COLORS)
        ],
    )
    return root


@pytest.fixture(scope="module")
def llava_root(tmp_path_factory):
    """LLaVA's eval layout: question jsonl + image folder + answers in separate files."""
    root = tmp_path_factory.mktemp("llava")
    tv = root / "textvqa"
    (tv / "train_images").mkdir(parents=True)
    pope = root / "pope"
    (pope / "val2014").mkdir(parents=True)
    (pope / "coco").mkdir()
    q_tv, ann, q_pope = [], [], []
    for i, c in enumerate(COLORS):
        (tv / "train_images" / f"{c}.jpg").write_bytes(png(c))
        (pope / "val2014" / f"{c}.jpg").write_bytes(png(c))
        q_tv.append({"question_id": i, "image": f"{c}.jpg", "text": f"what is it?\nReference OCR token: {c}{SUFFIX}"})
        ann.append({"question_id": i, "answers": [c] * 10, "image_id": c})
        q_pope.append(
            {
                "question_id": 10 + i,
                "image": f"{c}.jpg",
                "text": f"Is there a {c} thing?",
                "category": "adversarial" if i < 2 else "random",
            }
        )
    (tv / "llava_textvqa_val_v051_ocr.jsonl").write_text("".join(json.dumps(q) + "\n" for q in q_tv))
    (tv / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": ann}))
    (pope / "llava_pope_test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in q_pope))
    for cat, labels in (("adversarial", ["yes", "no"]), ("random", ["no", "yes"])):
        lines = [json.dumps({"question_id": k, "image": "x", "label": lab}) for k, lab in enumerate(labels)]
        (pope / "coco" / f"coco_pope_{cat}.json").write_text("\n".join(lines) + "\n")
    return root


def reference_answer(s: Sample) -> str:
    return s.answer if isinstance(s.answer, str) else s.answer[0]


class Scripted:
    """A generator that answers with `fn(sample)` and counts what it was asked."""

    def __init__(self, fn):
        self.fn, self.asked = fn, []

    def describe(self):
        return {"model": "scripted"}

    def __call__(self, samples, images):
        assert all(len(ims) == len(s.images) and all(im.mode == "RGB" for im in ims) for s, ims in zip(samples, images))
        self.asked += [s.id for s in samples]
        return [self.fn(s) for s in samples]


ALL = ["vqav2", "textvqa", "docvqa", "mmmu", "pope", "mmstar", "coco_cap"]


def test_reference_answers_score_full_marks_in_every_layout(data_root, tmp_path):
    oracle = Scripted(reference_answer)
    report = evaluate_benchmarks(ALL, oracle, data_root, tmp_path / "oracle", batch_size=3)
    b = report["benchmarks"]
    for name in ("vqav2", "textvqa", "docvqa", "mmmu", "pope", "mmstar"):
        assert b[name]["score"] == pytest.approx(1.0), name
    assert b["vqav2"]["n"] == 4 and b["mmmu"]["n"] == 5 and b["textvqa"]["n"] == 4  # the train split is not read
    assert b["pope"]["breakdown"] == {"popular": {"n": 2, "score": 1.0}, "random": {"n": 2, "score": 1.0}}
    assert set(b["mmmu"]["breakdown"]) == {"Art", "Math"}
    # the prompt carries the community's suffix; MMMU lists the options
    rows = [json.loads(x) for x in (tmp_path / "oracle/textvqa/predictions.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] == "What does it say?" + SUFFIX
    mmmu = [json.loads(x) for x in (tmp_path / "oracle/mmmu/predictions.jsonl").read_text().splitlines()]
    assert "\nA. red\nB. green\nC. blue\nD. yellow\n\nAnswer with the option's letter" in mmmu[0]["prompt"]
    star = json.loads((tmp_path / "oracle/mmstar/predictions.jsonl").read_text().splitlines()[0])
    assert star["prompt"].endswith("D: yellow\nAnswer with the option's letter from the given choices directly")
    oracle_cider = b["coco_cap"]["score"]
    assert oracle_cider > 0.5
    md = (tmp_path / "oracle/report.md").read_text()
    assert "| vqav2 | validation | accuracy | 100.00 | 4 | 0 |" in md

    wrong = Scripted(lambda s: "purple elephant")
    report = evaluate_benchmarks(ALL, wrong, data_root, tmp_path / "wrong")
    b = report["benchmarks"]
    for name in ("vqav2", "textvqa", "docvqa", "mmmu", "mmstar"):
        assert b[name]["score"] == 0.0, name
    assert b["pope"]["score"] == 0.0  # lmms-eval: "purple elephant" is neither yes nor no
    assert b["coco_cap"]["score"] == 0.0 < oracle_cider
    # POPE's own reading: "purple elephant" reads as yes: tp 2, fp 2, fn 0; scored again from the
    # saved answers, nothing generated
    official = evaluate_benchmarks(["pope"], wrong, data_root, tmp_path / "wrong", scoring="official")
    assert official["benchmarks"]["pope"]["score"] == pytest.approx(2 / 3)
    assert official["scoring"] == "official" and "POPE's evaluate.py" in official["benchmarks"]["pope"]["scoring"]
    assert official["benchmarks"]["pope"]["answered_this_run"] == 0
    with pytest.raises(ValueError, match="unknown scoring 'lmms'"):
        evaluate_benchmarks(["pope"], wrong, data_root, tmp_path / "wrong", scoring="lmms")


def test_vqav2_partial_agreement_and_llava_layout(data_root, llava_root, tmp_path):
    gen = Scripted(lambda s: "white" if s.id == "100" else reference_answer(s))
    b = evaluate_benchmarks(["vqav2"], gen, data_root, tmp_path / "a")["benchmarks"]["vqav2"]
    # question 100: 3 of 10 humans said white -> (3 * 2/3 + 7 * 1) / 10 = 0.9; the other three 1.0
    assert b["score"] == pytest.approx((0.9 + 3) / 4)
    oracle = Scripted(reference_answer)
    report = evaluate_benchmarks(["textvqa", "pope"], oracle, llava_root, tmp_path / "b")
    tv, pope = report["benchmarks"]["textvqa"], report["benchmarks"]["pope"]
    assert tv["score"] == 1.0 and tv["n"] == 4 and tv["source"].startswith("llava jsonl")
    assert pope["score"] == 1.0 and pope["n"] == 4
    rows = [json.loads(x) for x in (tmp_path / "b/pope/predictions.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["yes", "no", "no", "yes"]  # labels matched in order per category
    assert rows[0]["prompt"] == "Is there a red thing?"  # LLaVA's question text is used as it is


def test_resume_answers_only_the_rest_and_torn_lines_are_cut(data_root, tmp_path):
    first = Scripted(reference_answer)
    evaluate_benchmarks(["docvqa"], first, data_root, tmp_path, limit=2, batch_size=1)
    assert first.asked == ["50", "51"]
    pred = tmp_path / "docvqa/predictions.jsonl"
    with open(pred, "a") as fh:
        fh.write('{"id": "52", "predic')  # a write killed half-way
    again = Scripted(reference_answer)
    b = evaluate_benchmarks(["docvqa"], again, data_root, tmp_path, batch_size=1)["benchmarks"]["docvqa"]
    assert again.asked == ["52", "53"] and b["n"] == 4 and b["answered_this_run"] == 2
    assert len(pred.read_text().splitlines()) == 4
    none = Scripted(reference_answer)
    evaluate_benchmarks(["docvqa"], none, data_root, tmp_path)
    assert none.asked == []


def test_bad_input_is_named_and_finished_work_kept(data_root, tmp_path):
    root = tmp_path / "root"
    write_parquet(
        root / "DocVQA/validation-00000-of-00001.parquet",
        [
            {"questionId": "1", "question": "q", "image": cell("red"), "answers": ["red"]},
            {"questionId": "2", "question": "q", "image": {"bytes": b"not an image", "path": None}, "answers": ["x"]},
            {"questionId": "3", "question": "q", "image": cell("blue"), "answers": ["blue"]},
        ],
    )
    b = evaluate_benchmarks(["docvqa"], Scripted(reference_answer), root, tmp_path / "o")["benchmarks"]["docvqa"]
    assert b["n"] == 2 and b["score"] == 1.0
    assert b["image_errors"][0]["id"] == "2" and "cannot decode image" in b["image_errors"][0]["error"]
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        evaluate_benchmarks(["docvqa", "nope"], Scripted(reference_answer), root, tmp_path / "o2")
    with pytest.raises(FileNotFoundError, match="no folder named one of .*textvqa"):
        evaluate_benchmarks(["textvqa"], Scripted(reference_answer), root, tmp_path / "o3")
    # a malformed question file names its line; the report of a finished benchmark is kept
    (root / "textvqa").mkdir()
    (root / "textvqa/llava_textvqa_val.jsonl").write_text('{"question_id": 1, "image": "a.png", "text": "q"}\n{oops\n')
    with pytest.raises(DataError, match=r"llava_textvqa_val.jsonl:2: malformed JSON"):
        evaluate_benchmarks(["docvqa", "textvqa"], Scripted(reference_answer), root, tmp_path / "o4")
    assert json.loads((tmp_path / "o4/report.json").read_text())["benchmarks"]["docvqa"]["n"] == 2
    # a damaged parquet file is named, not a traceback from deep inside the reader
    (root / "POPE").mkdir()
    (root / "POPE/test-00000-of-00001.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"POPE: cannot read parquet"):
        evaluate_benchmarks(["pope"], Scripted(reference_answer), root, tmp_path / "o5")
    # a saved answer that is no answer (no id, not a string, not JSON) is named by its line and the
    # file left as it is: nothing is scored silently as zero
    pred = tmp_path / "o/docvqa/predictions.jsonl"
    good = pred.read_text()
    for bad, why in (
        ('{"prediction": "red"}', "no question id"),
        ('{"id": "1", "prediction": 7}', "question 1: its prediction is a int, not a string"),
        ('{"id": "1"}', "question 1: its prediction is missing"),
        ("[1, 2]", "a list, not an object"),
        ("{broken", "not a JSON line"),
    ):
        pred.write_text(bad + "\n" + good)
        with pytest.raises(DataError, match=rf"predictions.jsonl:1: {re.escape(why)}"):
            evaluate_benchmarks(["docvqa"], Scripted(reference_answer), root, tmp_path / "o")
        assert pred.read_text() == bad + "\n" + good


def test_every_registered_benchmark_has_a_layout_here():
    assert sorted(BENCHMARKS) == sorted(ALL)


# ---------------------------------------------------------------------------------------------
# the real model: locally and behind an OpenAI-compatible endpoint


@pytest.fixture(scope="module")
def saved_model(backbones, tmp_path_factory):
    import torch

    from vlmforge.config import ModelConfig
    from vlmforge.model.vlm import VLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("evalmodel") / "model"
    cfg = ModelConfig(vision=str(backbones["vision"]), lm=str(backbones["lm"]), connector="mlp")
    VLM.from_backbones(cfg).save_pretrained(out)
    return out


class OpenAIStub(BaseHTTPRequestHandler):
    """The two routes of the OpenAI API that `--endpoint` uses, answering with a local model."""

    generator = None
    key = None
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    def do_POST(self):
        from vlmforge.data.images import load_image_bytes

        if self.key and self.headers.get("Authorization") != f"Bearer {self.key}":
            return self._send(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        parts = body["messages"][0]["content"]
        text = next(p["text"] for p in parts if p["type"] == "text")
        urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        images = [load_image_bytes(base64.b64decode(u.split(",", 1)[1]), "request") for u in urls]
        with self.lock:
            answer = self.generator([Sample("r", text, urls, None)], [images])[0]
        self._send(
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            },
        )


def color_namer(samples, images):
    """Names the colour of each question's first image, and echoes the prompt's first word: a
    reply that is right only when images and prompt arrive intact and in order."""
    names = {(255, 0, 0): "red", (0, 128, 0): "green", (0, 0, 255): "blue", (255, 255, 0): "yellow"}
    return [f"{names.get(ims[0].getpixel((0, 0)), 'other')} {s.prompt.split()[0]}" for s, ims in zip(samples, images)]


color_namer.describe = lambda: {"model": "color-namer"}


@pytest.fixture()
def endpoint():
    OpenAIStub.generator = staticmethod(color_namer)
    server = ThreadingHTTPServer(("127.0.0.1", 0), OpenAIStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    OpenAIStub.key = None


def test_cli_eval_of_a_saved_model_in_every_layout(saved_model, data_root, llava_root, tmp_path, capsys):
    common = ["--model", str(saved_model), "--limit", "3", "--max-new-tokens", "6"]
    main(
        [
            "eval",
            *common,
            "--bench",
            ",".join(ALL),
            "--data-root",
            str(data_root),
            "--out",
            str(tmp_path / "hf"),
            "--html",
            str(tmp_path / "hf.html"),
        ]
    )
    out = capsys.readouterr().out
    page = (tmp_path / "hf.html").read_text()  # parquet images are bytes: shown from thumbnails beside the answers
    assert page.count("<tr class='q ") == 3 * len(ALL) and page.count("data:image/jpeg;base64,") >= 3 * len(ALL)
    # right and wrong by each benchmark's own rule (an empty answer is no "A", though VQA normalisation
    # would make both empty); captions, scored as a corpus, are neither
    assert page.count("<tr class='q wrong' data-type='mmmu/") == 3 and page.count("q unscored") == 3
    assert "| textvqa | validation | accuracy |" in out and "report:" in out
    report = json.loads((tmp_path / "hf/report.json").read_text())
    assert report["generation"] == {"model": str(saved_model), "decoding": "greedy", "max_new_tokens": 6}
    assert report["metrics_version"] and [b["n"] for b in report["benchmarks"].values()] == [3] * len(ALL)
    assert "## mmmu" in (tmp_path / "hf/report.md").read_text()
    main(["eval", *common, "--bench", "textvqa,pope", "--data-root", str(llava_root), "--out", str(tmp_path / "llava")])
    report = json.loads((tmp_path / "llava/report.json").read_text())
    assert [b["n"] for b in report["benchmarks"].values()] == [3, 3]
    assert all(b["source"].startswith("llava jsonl") for b in report["benchmarks"].values())


def test_endpoint_gives_the_same_answers_and_scores(endpoint, data_root, tmp_path):
    names = ["textvqa", "mmmu", "pope", "mmstar", "coco_cap"]
    local = evaluate_benchmarks(names, color_namer, data_root, tmp_path / "local")
    main(
        [
            "eval",
            "--endpoint",
            endpoint,
            "--bench",
            ",".join(names),
            "--data-root",
            str(data_root),
            "--out",
            str(tmp_path / "remote"),
            "--concurrency",
            "3",
            "--batch-size",
            "2",
        ]
    )
    remote = json.loads((tmp_path / "remote/report.json").read_text())
    assert remote["generation"]["model"] == "tiny"  # the first of GET /v1/models
    for name in names:
        lp = (tmp_path / "local" / name / "predictions.jsonl").read_text().splitlines()
        rp = (tmp_path / "remote" / name / "predictions.jsonl").read_text().splitlines()
        assert [json.loads(x)["prediction"] for x in lp] == [json.loads(x)["prediction"] for x in rp], name
        assert remote["benchmarks"][name]["score"] == local["benchmarks"][name]["score"]
    assert remote["benchmarks"]["textvqa"]["score"] == 0.0  # "red What": not the answer…
    first = json.loads((tmp_path / "remote/textvqa/predictions.jsonl").read_text().splitlines()[0])
    assert first["prediction"] == "red What"  # …but the right image and prompt arrived


def test_endpoint_key_and_errors(endpoint, data_root, tmp_path, capsys):
    OpenAIStub.key = "sekrit"
    gen = EndpointGenerator(endpoint, api_key="sekrit", max_new_tokens=2)
    assert evaluate_benchmarks(["pope"], gen, data_root, tmp_path / "ok", limit=1)["benchmarks"]["pope"]["n"] == 1
    with pytest.raises(EndpointError, match=r"chat/completions \(question 0\): HTTP 401: .*invalid api key"):
        evaluate_benchmarks(["pope"], EndpointGenerator(endpoint, retries=1), data_root, tmp_path / "no", limit=1)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "eval",
                "--endpoint",
                "http://127.0.0.1:9/v1",
                "--endpoint-model",
                "m",
                "--bench",
                "pope",
                "--data-root",
                str(data_root),
                "--out",
                str(tmp_path / "x"),
            ]
        )
    assert e.value.code == 2 and "error: http://127.0.0.1:9/v1/chat/completions (question 0)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", "m", "--endpoint", endpoint, "--bench", "pope"])
    assert "exactly one of --model DIR and --endpoint URL" in capsys.readouterr().err


def test_a_report_of_older_rules_says_so_when_read(tmp_path, capsys):
    from vlmforge.eval.metrics import METRICS_VERSION
    from vlmforge.eval.reports import read_evals

    old, new = tmp_path / "old.json", tmp_path / "new.json"
    scores = {"pope": {"metric": "f1", "score": 0.8}}
    old.write_text(json.dumps({"metrics_version": "1", "benchmarks": scores}))
    new.write_text(json.dumps({"metrics_version": METRICS_VERSION, "benchmarks": scores}))
    rows = read_evals([str(old), str(new)])
    assert "metrics version 1: other rules than this vlmforge's" in rows[0]["metric"]
    assert rows[1]["metric"] == "f1"
    assert "old.json: scored with metrics version 1" in capsys.readouterr().out


def test_qa_files_of_one_name_in_two_folders_are_two_tasks(tmp_path):
    """`--data test/shapes_qa.json other/shapes_qa.json`: each file its own task (folder_stem), so
    the second does not resume from the first's saved answers; a name still shared is refused."""
    from vlmforge.eval.harness import qa_tasks

    tasks = qa_tasks(["a/test/shapes_qa.json", "a/other/shapes_qa.json", "b/text_qa.json"])
    assert [t.name for t in tasks] == ["test_shapes_qa", "other_shapes_qa", "text_qa"]
    with pytest.raises(ValueError, match="same task 'x_shapes_qa': a/x/shapes_qa.json and b/x/shapes_qa.json"):
        qa_tasks(["a/x/shapes_qa.json", "b/x/shapes_qa.json"])
