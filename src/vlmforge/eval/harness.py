"""The one evaluator: tasks (the standard benchmarks, and QA files) answered by a local model or any
OpenAI-compatible endpoint, saved as they come, scored, and reported in markdown and JSON; what
`vlmforge eval`, the demo, ablate and the cache bench run.

OUT/NAME/predictions.jsonl gets one line per answered question (flushed and fsynced per batch), so
an interrupted run resumes where it stopped and never answers a question twice (without OUT the
answers are kept in memory only). Scores are recomputed from the rows at the end, so a report
always matches its predictions. A record whose image cannot be decoded is listed in the report
and left out of the score (its count is shown).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from vlmforge.config import check_choice
from vlmforge.data.formats import DataError
from vlmforge.data.images import ImageError, load_image, load_image_bytes
from vlmforge.eval.benchmarks import Benchmark, QAFile, Sample, get_benchmark
from vlmforge.eval.metrics import METRICS_VERSION, SCORINGS
from vlmforge.io import atomic_save, atomic_write_text


def decode_images(sample: Sample) -> list:
    return [
        load_image_bytes(im, f"{sample.id} image {k}") if isinstance(im, bytes) else load_image(im)
        for k, im in enumerate(sample.images)
    ]


class LocalGenerator:
    """Greedy answers from a vlmforge model, a batch at a time."""

    def __init__(self, model, source: str, max_new_tokens: int = 32, engine=None):
        from vlmforge.infer.engine import Engine

        self.model, self.source, self.max_new_tokens = model, source, max_new_tokens
        self.engine = engine or Engine(model)

    def describe(self) -> dict:
        return {"model": self.source, "decoding": "greedy", "max_new_tokens": self.max_new_tokens}

    def __call__(self, samples: list[Sample], images: list[list]) -> list[str]:
        from vlmforge.infer.engine import answer

        return answer(self.model, [s.prompt for s in samples], images, self.max_new_tokens, self.engine)


class EndpointError(RuntimeError):
    """The endpoint refused or failed a request; the message names the URL and the question."""


class EndpointGenerator:
    """Answers from an OpenAI-compatible `/v1/chat/completions` server (vLLM, `vlmforge serve`,
    llama.cpp, …): one request per question, images as base64 data URLs, temperature 0."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        max_new_tokens: int = 32,
        concurrency: int = 8,
        timeout: float = 120.0,
        retries: int = 3,
    ):
        self.base = url.rstrip("/").removesuffix("/chat/completions")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.api_key, self.max_new_tokens = api_key, max_new_tokens
        self.concurrency, self.timeout, self.retries = concurrency, timeout, retries
        self.model = model or self._first_model()

    def describe(self) -> dict:
        return {
            "endpoint": self.base,
            "model": self.model,
            "decoding": "temperature 0",
            "max_new_tokens": self.max_new_tokens,
        }

    def _request(self, path: str, body: dict | None, what: str) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        last = None
        for attempt in range(self.retries):
            req = urllib.request.Request(self.base + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                last = f"HTTP {e.code}: {detail}"
                if e.code < 500 and e.code != 429:
                    break  # the request itself is wrong: retrying will not help
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(min(2**attempt, 10) * 0.5)
        raise EndpointError(f"{self.base}{path} ({what}): {last}")

    def _first_model(self) -> str:
        models = self._request("/models", None, "list models").get("data") or []
        if not models:
            raise EndpointError(f"{self.base}/models lists no model; pass --endpoint_model")
        return models[0]["id"]

    def _ask(self, sample: Sample, images: list) -> str:
        content = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
        content.append({"type": "text", "text": sample.prompt.replace("<image>", "").strip()})
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_new_tokens,
            "temperature": 0,
        }
        out = self._request("/chat/completions", body, f"question {sample.id}")
        try:
            return (out["choices"][0]["message"]["content"] or "").strip()
        except (KeyError, IndexError, TypeError) as e:
            raise EndpointError(
                f"{self.base}/chat/completions (question {sample.id}): unexpected reply {str(out)[:200]}"
            ) from e

    def __call__(self, samples: list[Sample], images: list[list]) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._ask, samples, images))


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------------------------------


def _done_rows(path: Path | None) -> list[dict]:
    """Rows already answered; a torn last line (a killed write) is cut off, the rest kept. A line
    that is not a row this harness writes ({"id": str, "prediction": str, ...} or {"id": str,
    "error": str}) stops the run naming it, and the file is left as it is: nothing is scored
    silently as zero."""
    if path is None or not path.exists():
        return []
    rows, good = [], 0
    with open(path, "rb") as fh:
        lines = fh.readlines()
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and not line.endswith(b"\n"):
                break  # torn by a kill: cut off below
            raise DataError(f"{path}:{n}: not a JSON line ({e.msg}); fix or delete the line to resume") from None
        problem = _row_problem(row)
        if problem:
            raise DataError(f"{path}:{n}: {problem}; fix or delete the line to resume")
        rows.append(row)
        good += len(line)
    if good != path.stat().st_size:
        with open(path, "r+b") as fh:
            fh.truncate(good)
    return rows


def _row_problem(row) -> str | None:
    """What is wrong with a saved prediction row, or None."""
    if not isinstance(row, dict):
        return f"a {type(row).__name__}, not an object"
    if not isinstance(row.get("id"), str) or not row["id"]:
        return "no question id (`id`, a string)"
    if "error" in row:
        return None if isinstance(row["error"], str) else f"question {row['id']}: `error` is not a string"
    if not isinstance(row.get("prediction"), str):
        what = "missing" if "prediction" not in row else f"a {type(row['prediction']).__name__}"
        return f"question {row['id']}: its prediction is {what}, not a string"
    return None


def _append(path: Path | None, rows: list[dict]) -> None:
    if path is None:
        return
    with open(path, "a", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _shown(image, decoded, predictions: Path | None, sid: str, k: int) -> str | None:
    """A file to show an answered question's image by (for the HTML page): the image's own file,
    or for an image given as bytes a 160-pixel JPEG thumbnail written beside the predictions."""
    if isinstance(image, str):
        return image
    if predictions is None:
        return None
    thumb = predictions.parent / "thumbs" / f"{hashlib.sha1(f'{sid}/{k}'.encode()).hexdigest()[:16]}.jpg"
    if not thumb.exists():
        thumb.parent.mkdir(exist_ok=True)
        small = decoded.convert("RGB")
        small.thumbnail((160, 160))
        atomic_save(thumb, lambda tmp: small.save(tmp, format="JPEG", quality=85))
    return str(thumb)


def run_benchmark(
    task: str | Benchmark,
    generate,
    data_root: str | Path | None,
    out: str | Path | None,
    split: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int | None = None,
    scoring: str = "lmms-eval",
) -> dict:
    """Answer (or resume answering) one task (a benchmark's name, or a task such as `QAFile`) and
    score it; returns its report section."""
    bench = get_benchmark(task)
    total, records, source = bench.rows(data_root, split)
    n = min(total, limit) if limit is not None else total
    path = None
    if out is not None:
        (Path(out) / bench.name).mkdir(parents=True, exist_ok=True)
        path = Path(out) / bench.name / "predictions.jsonl"
    rows = _done_rows(path)
    done = {r["id"] for r in rows}
    t0, answered = time.time(), 0
    bar = tqdm(total=n, desc=f"eval {bench.name}", unit="q", initial=0, leave=False)
    batch: list[tuple[Sample, list]] = []

    def flush():
        nonlocal answered
        if not batch:
            return
        preds = generate([s for s, _ in batch], [ims for _, ims in batch])
        new = [
            {
                "id": s.id,
                "prompt": s.prompt,
                "prediction": p,
                "answer": s.answer,
                "meta": s.meta,
                "images": [_shown(im, pil, path, s.id, k) for k, (im, pil) in enumerate(zip(s.images, ims))],
            }
            for (s, ims), p in zip(batch, preds)
        ]
        _append(path, new)
        rows.extend(new)
        answered += len(new)
        bar.update(len(new))
        batch.clear()

    try:
        for i, record in enumerate(records):
            if i >= n:
                break
            sample = bench.sample(record)
            if sample.id in done:
                bar.update(1)
                continue
            if sample.answer is None or sample.answer == []:
                raise DataError(f"{bench.name}: question {sample.id} has no reference answer in {source}")
            try:
                images = decode_images(sample)
            except ImageError as e:
                row = {"id": sample.id, "error": str(e), "meta": sample.meta}
                _append(path, [row])
                rows.append(row)
                bar.update(1)
                continue
            done.add(sample.id)
            batch.append((sample, images))
            if len(batch) >= batch_size:
                flush()
        flush()
    finally:
        bar.close()
    scored = [r for r in rows if "error" not in r]
    errors = [r for r in rows if "error" in r]
    result = bench.score(scored, scoring, seed)
    return {
        **bench.describe(scoring),
        "split": split or bench.split,
        "source": source,
        "n": len(scored),
        "image_errors": [{"id": r["id"], "error": r["error"]} for r in errors],
        "answered_this_run": answered,
        "seconds_this_run": round(time.time() - t0, 2),
        **result,
    }


def evaluate_benchmarks(
    names: list,
    generate,
    data_root,
    out,
    split=None,
    limit=None,
    batch_size=8,
    seed: int | None = None,
    scoring: str = "lmms-eval",
) -> dict:
    """Run every task in `names` (benchmark names or task objects); with `out`, write
    OUT/report.json and OUT/report.md after each."""
    check_choice("scoring", scoring, SCORINGS)
    for name in names:
        get_benchmark(name)  # unknown names fail before any work
    report = {
        "generation": generate.describe(),
        "metrics_version": METRICS_VERSION,
        "scoring": scoring,
        "limit": limit,
        "multiple_choice_fallback": (
            f"random letter, seeded with {seed}" if seed is not None else "none (an unparsable answer is wrong)"
        ),
        "benchmarks": {},
    }
    for name in names:
        report["benchmarks"][get_benchmark(name).name] = run_benchmark(
            name, generate, data_root, out, split, limit, batch_size, seed, scoring
        )
        if out is not None:
            save_report(report, out)  # the finished benchmarks survive a later failure
    return report


def format_markdown(report: dict) -> str:
    g = report["generation"]
    lines = [
        "# vlmforge eval",
        "",
        f"Generation: {', '.join(f'{k} {v}' for k, v in g.items())}. Metrics version {report['metrics_version']}, "
        f"{report.get('scoring', 'lmms-eval')} scoring."
        + (f" First {report['limit']} questions of each benchmark." if report.get("limit") else ""),
        f"Multiple-choice fallback: {report['multiple_choice_fallback']}.",
        "",
        "| benchmark | split | metric | score | n | image errors |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name, b in report["benchmarks"].items():
        lines.append(
            f"| {name} | {b['split']} | {b['metric']} | {100 * b['score']:.2f} | {b['n']} | {len(b['image_errors'])} |"
        )
    for name, b in report["benchmarks"].items():
        lines += ["", f"## {name}", "", f"- scoring: {b['scoring']}"]
        lines.append(f"- prompt: `{b['prompt']!r}`")
        lines.append(f"- source: {b['source']}")
        shown = ("accuracy", "precision", "recall", "yes_ratio", "predicted_yes_ratio", "strict_accuracy")
        extra = {k: v for k, v in b.items() if k in shown}
        if extra:
            lines.append("- " + ", ".join(f"{k} {100 * v:.2f}" for k, v in extra.items()))
        for key, v in (b.get("breakdown") or {}).items():
            lines.append(f"  - {key}: {100 * v['score']:.2f} (n={v['n']})")
        for e in b["image_errors"][:10]:
            lines.append(f"- skipped {e['id']}: {e['error']}")
    return "\n".join(lines) + "\n"


def save_report(report: dict, out) -> None:
    atomic_write_text(Path(out) / "report.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(Path(out) / "report.md", format_markdown(report))


def qa_tasks(files: list[str]) -> list[QAFile]:
    """A task per QA file, named by its file's stem, or by its folder and stem where stems repeat
    (`test/shapes_qa.json`, `other_96x64/shapes_qa.json`: their answers and scores kept apart)."""
    paths = [Path(f) for f in files]
    stems = [p.stem for p in paths]
    names = [f"{p.parent.name}_{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    for i, name in enumerate(names):
        if name in names[:i]:
            first = paths[names.index(name)]
            raise ValueError(f"two QA files would be the same task {name!r}: {first} and {paths[i]}")
    return [QAFile(p, name) for p, name in zip(paths, names)]


def evaluate(
    model: str | None = None,
    data: list[str] | None = None,
    bench: str | None = None,
    data_root: str | None = None,
    split: str | None = None,
    out: str | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    max_new_tokens: int = 32,
    endpoint: str | None = None,
    endpoint_model: str | None = None,
    api_key: str | None = None,
    concurrency: int = 8,
    seed: int | None = None,
    html: str | None = None,
    scoring: str = "lmms-eval",
    dtype: str = "float32",
) -> None:
    """Evaluate a model on standard benchmarks (--bench) and on LLaVA-format QA files (--data).

    `--bench textvqa,docvqa --data-root ROOT --out DIR` answers each benchmark (resumable: answers are
    saved as they come) and writes DIR/report.md and DIR/report.json. Benchmarks: vqav2, textvqa,
    docvqa, mmmu, pope, mmstar, coco_cap, read from ROOT/NAME (Hugging Face parquet or LLaVA eval
    layout). A QA file is one more task: its first human turn is asked, its first gpt turn is the
    reference (exact match, per question type). `--endpoint URL` asks an OpenAI-compatible server
    instead of a local model.

    Args:
        model: vlmforge model folder.
        data: LLaVA JSON QA files.
        bench: comma-separated benchmark names.
        data_root: folder holding one folder per benchmark.
        split: split to read (default: each benchmark's usual evaluation split).
        out: report folder (report.md, report.json, each task's predictions.jsonl); required with --bench.
        batch_size: questions per generation batch.
        limit: only the first N questions of each task.
        max_new_tokens: longest answer.
        endpoint: base URL of an OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1).
        endpoint_model: model name to request (default: the first of GET /v1/models).
        api_key: bearer token for the endpoint (default: $OPENAI_API_KEY).
        concurrency: requests in flight at once with --endpoint.
        seed: pick a seeded random letter for unparsable multiple-choice answers (default: count them wrong).
        scoring: `lmms-eval` (its 0.7.3 rules, what published numbers mostly come from) or `official`
            (each benchmark's own code where it differs: VQAv2's vqaEval.py, MMStar's matcher,
            POPE's yes/no reading); docs/evaluation.md lists each rule.
        html: also write a self-contained HTML page of every answer (with its image), right and
            wrong, filterable by task and question type (needs --out).
        dtype: the LM's weights as served: float32 (as saved), bfloat16, or int8 (weight-only, one scale
            per output row, torch's int8 kernel; the vision tower and connector stay float32).
    """
    if (model is None) == (endpoint is None):
        raise ValueError("give exactly one of --model DIR and --endpoint URL")
    if not data and bench is None:
        raise ValueError("give --data FILE.json and/or --bench NAMES")
    if bench is not None and (not data_root or not out):
        raise ValueError("--bench needs --data-root PATH and --out DIR")
    check_choice("scoring", scoring, SCORINGS)
    if endpoint and dtype != "float32":
        raise ValueError("--dtype sets a local model's weights (--model); an --endpoint serves its own")
    if html and not out:
        raise ValueError("--html needs --out DIR (the page shows the answers saved there)")
    tasks = [b for b in (bench or "").split(",") if b.strip()] + qa_tasks(data or [])
    if endpoint:
        key = api_key or os.environ.get("OPENAI_API_KEY")
        gen = EndpointGenerator(endpoint, endpoint_model, key, max_new_tokens, concurrency)
    else:
        from vlmforge.model.quant import load

        gen = LocalGenerator(load(model, dtype), model, max_new_tokens)
    report = evaluate_benchmarks(tasks, gen, data_root, out, split, limit, batch_size, seed, scoring)
    print(format_markdown(report).rstrip())
    if out:
        print(f"report: {out}/report.md, {out}/report.json")
    if html:
        from vlmforge.eval.html import eval_sections, write_page

        print(f"page: {write_page(html, 'vlmforge eval', eval_sections(report, out))}")
