"""`vlmforge serve`: the OpenAI API on a live server (real sockets), with the `openai` client."""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmforge.infer.engine import Engine
from vlmforge.infer.request import SamplingParams
from vlmforge.model.vlm import VLM
from vlmforge.serve.app import Server
from vlmforge.serve.launch import graceful, listen
from vlmforge.serve.protocol import ServeLimits

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def png(color, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def user(text, *images):
    return [
        {
            "role": "user",
            "content": [
                *({"type": "image_url", "image_url": {"url": u}} for u in images),
                {"type": "text", "text": text},
            ],
        }
    ]


@pytest.fixture(scope="module")
def live(model_cfg):
    import uvicorn

    torch.manual_seed(0)
    model = VLM.from_backbones(model_cfg).eval()
    with torch.no_grad():
        for p in model.connector.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    engine = Engine(model, max_batch=8, max_queue=64, max_len=1024)
    limits = ServeLimits(max_image_bytes=20_000, max_image_pixels=300 * 300, max_images=2)
    srv = Server(engine, "tiny", limits, drain_seconds=2)
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = graceful(uvicorn.Config(srv.app(), log_level="warning"), srv)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    yield srv, port
    server.should_exit = True
    thread.join(10)


def expected(srv, text, color, max_tokens=8):
    """The answer of the engine itself (greedy), no HTTP."""
    m = srv.model
    prompt = m.prompts.encode_prompt(
        [{"role": "user", "content": "<image>" + "\n" + text}]
    )  # what the server renders for [image, text]
    eng = Engine(m)
    return eng.generate(
        [prompt], [[Image.open(io.BytesIO(png(color))).convert("RGB")]], SamplingParams(max_tokens=max_tokens)
    )[0].text


def post(port, body, headers=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=raw if raw is not None else json.dumps(body),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else None


def test_openai_client_chat_with_an_image_and_streaming(live):
    from openai import OpenAI

    srv, port = live
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    msgs = user("what color is it?", data_url(png("red")))
    out = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    ref = expected(srv, "what color is it?", "red")
    assert out.choices[0].message.content == ref and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens > srv.model.tokens_per_image
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    stream = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    # a repeated image: its prefix comes from the cache
    again = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == ref
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_every_limit_is_an_openai_error_with_its_status(live):
    srv, port = live
    ok = user("hi", data_url(png("red")))
    big = png("red", (400, 400))  # more pixels than allowed, few bytes
    noisy = io.BytesIO()
    Image.frombytes(
        "RGB",
        (120, 120),
        torch.randint(0, 256, (120 * 120 * 3,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        .numpy()
        .tobytes(),
    ).save(noisy, format="PNG")
    cases = [
        (None, b"{not json", 400, "malformed JSON"),
        ({"model": "tiny"}, None, 400, "missing `messages`"),
        ({"messages": ok}, None, 400, "missing `model`"),
        ({"model": "nope", "messages": ok}, None, 404, "does not exist"),
        ({"model": "tiny", "messages": user("x", "data:image/png;base64,@@@@")}, None, 400, "invalid base64"),
        ({"model": "tiny", "messages": user("x", data_url(b"not an image at all"))}, None, 400, "cannot decode image"),
        ({"model": "tiny", "messages": user("x", data_url(big))}, None, 400, "image too large"),
        ({"model": "tiny", "messages": user("x", data_url(noisy.getvalue()))}, None, 413, "larger than 20000 bytes"),
        ({"model": "tiny", "messages": user("x", *[data_url(png(c)) for c in COLORS[:3]])}, None, 400, "at most 2"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "word " * 2000}]},
            None,
            400,
            "exceeds the context",
        ),
        (
            {"model": "tiny", "messages": user("x", "http://example.com/a.png")},
            None,
            400,
            "remote image URLs are refused",
        ),
        ({"model": "tiny", "messages": user("x", "file:///etc/passwd")}, None, 400, "file:// image URLs are refused"),
        ({"model": "tiny", "messages": ok, "temperature": 7}, None, 400, "`temperature` must be between"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, None, 400, "needs a `role`"),
        (
            None,
            json.dumps({"model": "tiny", "messages": ok})[:-1].encode() + b', "temperature": NaN}',
            400,
            "`temperature` is not a finite number",
        ),
        (
            None,
            json.dumps({"model": "tiny", "messages": ok})[:-1].encode() + b', "top_p": -Infinity}',
            400,
            "`top_p` is not a finite number",
        ),
        (
            None,
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": 1e999}',
            400,
            "`seed` is not a finite number",
        ),
        (None, b'{"a":' * 5000 + b"1" + b"}" * 5000, 400, "nested deeper than 32 levels"),
        (None, b'{"model": "tiny", "x": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "nested deeper than 32 levels"),
        (None, b'{"model": "tiny", "max_tokens": 1' + b"0" * 5000 + b"}", 400, "malformed JSON"),
    ]
    assert len(noisy.getvalue()) > 20_000
    for body, raw, status, message in cases:
        code, err = post(port, body, raw=raw)
        assert code == status, (message, err)
        assert set(err["error"]) == {"message", "type", "param", "code"} and message in err["error"]["message"]
    code, err = post(port, {"model": "tiny", "messages": [{"role": "user", "content": "word " * 2000}]})
    assert err["error"]["code"] == "context_length_exceeded"
    # remote URLs, when allowed, only to public addresses
    srv.limits.allow_remote_images = True
    try:
        code, err = post(port, {"model": "tiny", "messages": user("x", f"http://127.0.0.1:{port}/health")})
        assert code == 400 and "non-public address" in err["error"]["message"]
    finally:
        srv.limits.allow_remote_images = False
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v2/nothing")
    resp = conn.getresponse()
    assert resp.status == 404 and "error" in json.loads(resp.read())
    assert srv.engine.running == [] or len(srv.engine.running) <= 8  # nothing leaked into the engine


def _fuzzed(rng, body: dict) -> bytes:
    """A valid request changed at random: bytes flipped, a value swapped for another type, or a
    number pushed to an extreme."""
    kind = rng.randrange(3)
    if kind == 0:
        raw = bytearray(json.dumps(body).encode())
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    body = json.loads(json.dumps(body))
    slots, todo = [], [body]
    while todo:  # every (container, key) of the request
        node = todo.pop()
        for k in node if isinstance(node, dict) else range(len(node)):
            slots.append((node, k))
            if isinstance(node[k], (dict, list)):
                todo.append(node[k])
    node, k = rng.choice(slots)
    if kind == 1:
        node[k] = rng.choice([None, True, False, 0, -1, 3.5, "", "x" * 500, [], {}, [[[]]], {"a": {"b": []}}])
        return json.dumps(body).encode()
    node[k] = rng.choice([0, -1, 2**31, 2**63, 2**70, 1e308, -1e308, 1e-320, "NaN", "Infinity"])
    return json.dumps(body).encode().replace(b'"NaN"', b"NaN").replace(b'"Infinity"', b"-Infinity")


def test_fuzzed_requests_never_get_a_5xx_or_a_dropped_connection(live):
    import random
    from collections import Counter

    srv, port = live
    rng = random.Random(0)
    valid = [
        {"model": "tiny", "messages": user("what color?", data_url(png("red"))), "max_tokens": 2, "temperature": 0},
        {
            "model": "tiny",
            "messages": [{"role": "system", "content": "brief"}, {"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "top_p": 0.5,
            "top_k": 4,
            "seed": 3,
            "stop": ["x"],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ]
    statuses, start = Counter(), time.time()
    for i in range(160):
        raw = _fuzzed(rng, valid[i % len(valid)])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=raw, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()  # a dropped connection raises here
        data = resp.read()
        conn.close()
        assert resp.status < 500, (raw[:300], resp.status, data[:300])
        if resp.status >= 400:
            assert set(json.loads(data)["error"]) == {"message", "type", "param", "code"}
        statuses[resp.status] += 1
    assert statuses[200] and statuses[400], statuses  # both paths were exercised
    assert time.time() - start < 120
    code, _ = post(port, valid[0])
    assert code == 200  # still healthy


def test_api_key_is_required_when_set(live):
    srv, port = live
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    srv.api_key = "sesame"
    try:
        code, err = post(port, body)
        assert code == 401 and err["error"]["code"] == "invalid_api_key"
        assert post(port, body, {"Authorization": "Bearer wrong"})[0] == 401
        assert post(port, body, {"Authorization": "Bearer sesame"})[0] == 200
        # the playground's page is public; it learns that a key is needed, and the card needs the key
        srv.model.history, srv.model.evals = [{"stage": "sft", "step": 3}], [{"task": "shapes", "score": 0.5}]
        page = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        page.request("GET", "/")
        resp = page.getresponse()
        assert resp.status == 200 and b'id="send"' in resp.read()
        for headers, card in (({}, False), ({"Authorization": "Bearer sesame"}, True)):
            page.request("GET", "/playground/info", headers=headers)
            info = json.loads(page.getresponse().read())
            assert info["model"] == "tiny" and info["needs_key"] and info["limits"]["max_image_pixels"] == 90_000
            assert ("history" in info) == card and (not card or info["evals"][0]["task"] == "shapes")
        page.close()
    finally:
        srv.api_key = None
        srv.model.history, srv.model.evals = [], []


def test_32_concurrent_requests_are_all_answered_correctly(live):
    srv, port = live
    jobs = [(f"what is shape {i}?", COLORS[i % len(COLORS)]) for i in range(32)]
    refs = {j: expected(srv, *j) for j in set(jobs)}

    def ask(job):
        text, color = job
        code, out = post(
            port, {"model": "tiny", "messages": user(text, data_url(png(color))), "max_tokens": 8, "temperature": 0}
        )
        assert code == 200, out
        return out["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [refs[j] for j in jobs]


def test_a_request_cancelled_mid_stream_frees_its_slot(live):
    srv, port = live
    body = {
        "model": "tiny",
        "messages": user("tell me everything", data_url(png("blue"))),
        "max_tokens": 800,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0,
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")  # the stream has begun
    deadline = time.time() + 20
    while not srv.engine.running and time.time() < deadline:
        time.sleep(0.01)
    assert len(srv.engine.running) == 1
    handle = srv.engine.running[0]
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    while srv.engine.running and time.time() < deadline:
        time.sleep(0.02)
    assert srv.engine.running == [] and handle.finish_reason == "abort" and len(handle.tokens) < 800


def test_shutdown_ends_running_streams_cleanly(model_cfg):
    """On SIGTERM (uvicorn's handle_exit) the server refuses new work and, after the drain time,
    ends what still runs with finish_reason "abort" and [DONE]: clients never see a cut stream."""
    import signal

    import uvicorn

    model = VLM.from_backbones(model_cfg).eval()
    srv = Server(Engine(model, max_len=60_000), "tiny", drain_seconds=0.2)
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = graceful(uvicorn.Config(srv.app(), log_level="warning", timeout_graceful_shutdown=10), srv)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 50_000,
        "ignore_eos": True,
        "stream": True,
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: ")
    server.handle_exit(signal.SIGTERM, None)
    assert post(port, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})[0] == 503
    lines = [line for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "abort"
    thread.join(15)
    assert not thread.is_alive()


@pytest.mark.slow
def test_bench_serve_writes_every_figure(model_cfg, tmp_path, capsys):
    from vlmforge.bench.serve import format_table
    from vlmforge.cli import main

    model_dir = tmp_path / "model"
    VLM.from_backbones(model_cfg).save_pretrained(model_dir)
    out = tmp_path / "bench.json"
    main(
        [
            "bench",
            "serve",
            "--model",
            str(model_dir),
            "--levels",
            "1",
            "16",
            "--requests",
            "16",
            "--tokens",
            "4",
            "--repeats",
            "1",
            "--serve_tokens",
            "4",
            "--out",
            str(out),
        ]
    )
    r = json.loads(out.read_text())
    for key in ("throughput_ratio_16", "ttft_repeat_speedup", "ttft_repeat_speedup_engine", "generate_speedup_b1"):
        assert r[key] > 0
    assert set(r["serve"]) == {"1", "16"} and r["serve"]["16"]["completion_tokens"] == 16 * 4
    assert "| 16 |" in capsys.readouterr().out
    del r["serve"]["1"], r["serve"]["16"]["throughput_vs_one_by_one"]  # as `--levels 16` alone leaves it
    assert "| 16 | " in format_table(r) and "- (no level 1) |" in format_table(r)


@pytest.mark.browser
def test_playground_in_a_real_browser_streams_the_engines_answer_and_shows_the_servers_error(live, tmp_path):
    """Headless Chromium (Debian's, through Selenium) on the page at /: an image chosen, a question
    asked, the streamed answer equals the engine's own; an image with more pixels than the server
    takes shows the server's error in words. Screenshots of both go to runs/test-artifacts/."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    srv, port = live
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's (make setup-test installs it)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    opts.add_argument("--window-size=1100,800")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
    shots = Path("runs/test-artifacts")
    shots.mkdir(parents=True, exist_ok=True)
    try:
        wait = WebDriverWait(driver, 60)
        long_path = "/home/someone/projects/" + "a-long-folder-name/" * 6 + "text_sft.json"
        srv.model.history = [
            {
                "stage": "sft",
                "data": long_path,
                "steps": 1500,
                "seconds": 15.70060133934021,
                "samples_per_s": 1234.5678,
                "final_loss": 0.0123456,
            }
        ]
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        # the training history: one column per stage, fractions rounded, all inside the side panel
        cells = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#history td")]
        assert cells == [long_path, "1500", "15.7", "1235", "0.0123"], cells
        widths = driver.execute_script(
            "const t = document.querySelector('#history table'), a = document.querySelector('aside');"
            "return [t.getBoundingClientRect().right, a.getBoundingClientRect().right];"
        )
        assert widths[0] <= widths[1], widths
        # an untrained model's greedy answer is blank tokens: sample (temperature 1, seed 7) for visible text
        question, color = "What color is it?", "red"
        prompt = srv.model.prompts.encode_prompt([{"role": "user", "content": "<image>\n" + question}])
        params = SamplingParams(max_tokens=16, temperature=1.0, seed=7)
        image = Image.open(io.BytesIO(png(color))).convert("RGB")
        ref = Engine(srv.model).generate([prompt], [[image]], params)[0].text
        assert ref.strip()
        (tmp_path / "image.png").write_bytes(png(color))
        driver.find_element(By.ID, "file").send_keys(str(tmp_path / "image.png"))
        wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())
        for field, value in (("max_tokens", "16"), ("temperature", "1"), ("seed", "7")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "question").send_keys(question)
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']"))
        answer = driver.execute_script("return document.querySelector('.assistant span').textContent")
        assert answer == ref, (answer, ref)  # the engine's very text, streamed into the page
        driver.save_screenshot(str(shots / "playground_answer.png"))
        # 400 x 400 = 160,000 pixels against the server's 90,000: the page sends it, the server refuses
        big = io.BytesIO()
        Image.new("RGB", (400, 400), "blue").save(big, format="PNG")
        (tmp_path / "big.png").write_bytes(big.getvalue())
        driver.find_element(By.ID, "file").send_keys(str(tmp_path / "big.png"))
        wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())
        driver.find_element(By.ID, "question").send_keys("And this one?")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "pixels" in driver.find_element(By.ID, "error").text
        driver.save_screenshot(str(shots / "playground_error.png"))
    finally:
        driver.quit()
        srv.model.history = []
