"""Self-contained HTML pages of results, to look at rather than read: every answered question with
its image inline, the model's answer and the reference (right in green, wrong in red), grouped by
task and question type and filterable; per-type scores; and, for a training run, the loss curve
of each stage (inline SVG), the phase timings and the model card. No network, no build step: one
file with its images as data URLs and a few lines of script for the filters."""

from __future__ import annotations

import base64
import html
import json
import mimetypes
from pathlib import Path

from vlmforge.eval.metrics import exact_match
from vlmforge.io import atomic_write_text

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}
.right{background:#e6f4e6}.wrong{background:#fbe3e3}.unscored{background:#f4f4f4}.q td{vertical-align:middle}
.q img{width:72px;image-rendering:pixelated}
.bar{margin:.5em 0}.bar button{margin-right:.3em}.num{text-align:right}svg{background:#fafafa;border:1px solid #ddd}
"""
_SCRIPT = """
function show(){const t=document.getElementById('type').value,w=document.getElementById('wrong').checked;
document.querySelectorAll('tr.q').forEach(r=>{r.style.display=((t==='all'||r.dataset.type===t)&&(!w||r.dataset.right==='0'))?'':'none'})}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _data_url(path: str) -> str | None:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    kind = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _right(task: str, section: dict, row: dict) -> bool | None:
    """Whether an answer counts as right: by its benchmark's own rule on that row alone (at least
    half marks: VQA accuracy, ANLS; POPE and MMStar their accuracy), by exact match for a QA file;
    None for captions, which are scored as a corpus."""
    from vlmforge.eval.benchmarks import BENCHMARKS

    bench = BENCHMARKS.get(task)
    if bench is None or str(section.get("scoring", "")).startswith("exact match"):  # a QA file
        return exact_match(row.get("prediction") or "", str(row.get("answer")))
    if bench.name == "coco_cap":
        return None
    result = bench.score([row])
    return result.get("accuracy", result["score"]) >= 0.5


def rows_of(out: str | Path, task: str) -> list[dict]:
    """The answered rows of a task of an eval folder (its predictions.jsonl)."""
    path = Path(out) / task / "predictions.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def eval_sections(report: dict, out: str | Path) -> list[str]:
    """A summary table of every task, then each task's questions (answered rows of OUT)."""
    parts = ["<h2>Scores</h2><table><tr><th>task</th><th>metric</th><th>score</th><th>n</th><th>by type</th></tr>"]
    for name, b in report["benchmarks"].items():
        by = ", ".join(f"{_e(k)} {100 * v['score']:.1f}% (n={v['n']})" for k, v in (b.get("breakdown") or {}).items())
        parts.append(
            f"<tr><td>{_e(name)}</td><td>{_e(b['metric'])}</td><td class=num>{100 * b['score']:.1f}</td>"
            f"<td class=num>{b['n']}</td><td>{by}</td></tr>"
        )
    parts.append("</table>")
    rows = [(name, r) for name in report["benchmarks"] for r in rows_of(out, name) if "error" not in r]
    order = {name: i for i, name in enumerate(report["benchmarks"])}
    rows.sort(key=lambda nr: (order[nr[0]], str(nr[1].get("meta", {}).get("type", ""))))  # grouped by task and type
    types = sorted({f"{name}/{r.get('meta', {}).get('type', 'all')}" for name, r in rows})
    options = "".join(f"<option>{_e(t)}</option>" for t in types)
    select = f"<select id=type onchange=show()><option>all</option>{options}</select>"
    wrong = "<label><input type=checkbox id=wrong onchange=show()> wrong only</label>"
    parts.append(f"<h2>Questions</h2><div class=bar>type {select} {wrong}</div>")
    parts.append("<table><tr><th>image</th><th>task / type</th><th>question</th><th>answer</th><th>reference</th></tr>")
    urls: dict[str, int] = {}  # each image once in the page, however many questions it has
    for name, r in rows:
        kind = f"{name}/{r.get('meta', {}).get('type', 'all')}"
        ok = _right(name, report["benchmarks"][name], r)
        mark = {True: "right", False: "wrong", None: "unscored"}[ok]
        images = "".join(f"<img data-im='{urls.setdefault(p, len(urls))}' alt=''>" for p in r.get("images") or [] if p)
        question = str(r.get("prompt", "")).replace("<image>", "").strip()
        parts.append(
            f"<tr class='q {mark}' data-type='{_e(kind)}' data-right='{int(ok is not False)}'>"
            f"<td>{images}</td><td>{_e(kind)}</td><td>{_e(question)}</td><td>{_e(r.get('prediction'))}</td>"
            f"<td>{_e(r.get('answer'))}</td></tr>"
        )
    parts.append("</table>")
    found = {i: u for p, i in urls.items() if (u := _data_url(p))}
    parts.append(
        f"<script>const IM={json.dumps(found)};document.querySelectorAll('img[data-im]')"
        ".forEach(e=>{const u=IM[e.dataset.im];if(u)e.src=u})</script>"
    )
    return parts


def loss_svg(metrics: str | Path, title: str, width: int = 480, height: int = 200) -> str:
    """A stage's loss by step (log scale) as inline SVG, from its metrics.jsonl."""
    import math

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    pts = [(r["step"], math.log10(r["loss"])) for r in rows if r.get("loss", 0) > 0]
    if len(pts) < 2:
        return f"<p>{_e(title)}: too few logged steps to draw</p>"
    (x0, x1), (y0, y1) = (pts[0][0], pts[-1][0]), (min(p[1] for p in pts), max(p[1] for p in pts))
    sx = lambda x: 40 + (width - 50) * (x - x0) / max(x1 - x0, 1)  # noqa: E731
    sy = lambda y: 10 + (height - 40) * (y1 - y) / max(y1 - y0, 1e-9)  # noqa: E731
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    return (
        f"<figure><svg width={width} height={height}><polyline fill=none stroke='#2060c0' stroke-width=1.5 "
        f"points='{line}'/><text x=40 y={height - 8} font-size=11>step {x0}</text>"
        f"<text x={width - 70} y={height - 8} font-size=11>step {x1}</text>"
        f"<text x=2 y=14 font-size=11>{10**y1:.3g}</text><text x=2 y={height - 30} font-size=11>{10**y0:.3g}</text>"
        f"</svg><figcaption>{_e(title)}: loss (log scale), last {rows[-1]['loss']:.4f}</figcaption>"
        "</figure>"
    )


def table(rows: dict, head: tuple[str, str]) -> str:
    show = lambda v: f"{v:.4g}" if isinstance(v, float) else v  # noqa: E731
    cells = "".join(f"<tr><td>{_e(k)}</td><td>{_e(show(v))}</td></tr>" for k, v in rows.items())
    return f"<table><tr><th>{_e(head[0])}</th><th>{_e(head[1])}</th></tr>{cells}</table>"


def from_markdown(text: str) -> list[str]:
    """The subset of markdown the reports write (headings, paragraphs, tables) as HTML parts."""
    parts, rows = [], []

    def flush():
        if rows:
            head, *body = rows
            cells = lambda r, tag: "".join(f"<{tag}>{_e(c)}</{tag}>" for c in r)  # noqa: E731
            parts.append(
                f"<table><tr>{cells(head, 'th')}</tr>"
                + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in body)
                + "</table>"
            )
            rows.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):  # not the separator line
                rows.append(cells)
            continue
        flush()
        if line.startswith("## "):
            parts.append(f"<h2>{_e(line[3:])}</h2>")
        elif line.strip() and not line.startswith("# "):  # the title is the page's
            parts.append(f"<p>{_e(line)}</p>")
    flush()
    return parts


def image_tag(path: str | Path) -> str:
    url = _data_url(str(path))
    return f"<img src='{url}' alt='{_e(Path(path).name)}'>" if url else ""


def write_page(path: str | Path, title: str, parts: list[str]) -> Path:
    """One self-contained page, written atomically."""
    body = "\n".join(parts)
    doc = (
        f"<!doctype html><html><head><meta charset=utf-8><title>{_e(title)}</title><style>{_STYLE}</style>"
        f"<script>{_SCRIPT}</script></head><body><h1>{_e(title)}</h1>\n{body}\n</body></html>\n"
    )
    atomic_write_text(path, doc)
    return Path(path)
