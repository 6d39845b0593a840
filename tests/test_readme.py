"""The README's walk ("Your own VLM, step by step") runs as written: every command of its `bash`
blocks, in order, in an empty folder, with flags appended that shrink the scale (tiny backbones, a
few steps); each step's output must exist, the served model must answer over HTTP and, scored
through the server's API, give the very answers the local model gives."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Your own VLM, step by step"

# appended to a command whose words start so: the README's commands at the scale of a test
SCALE = {
    "vlmforge data synth": "--n 24 --width 32 --height 32",
    "vlmforge pretrain": "--spec.image_size 32 --spec.patch_size 8 --spec.vision_hidden 32 --spec.vision_layers 1 "
    "--spec.vision_heads 2 --spec.text_hidden 32 --spec.text_layers 1 --spec.lm_hidden 32 --spec.lm_layers 1 "
    "--spec.lm_heads 2 --spec.lm_intermediate 64 --spec.vocab_size 300 --spec.siglip_steps 2 --spec.siglip_batch 8 "
    "--spec.lm_steps 2 --spec.lm_batch 8",
    "vlmforge train": "--train.max_steps 2 --train.batch_size 8",
}


def tutorial_commands(readme: str) -> list[str]:
    """The commands of the walk's ```bash blocks, in order, continuation lines joined."""
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    text = readme[start : end if end > 0 else None]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def test_the_walk_finds_the_readmes_commands():
    commands = tutorial_commands((ROOT / "README.md").read_text())
    verbs = [" ".join(c.split()[:2]) for c in commands]
    for verb in (
        "vlmforge data",
        "vlmforge pretrain",
        "vlmforge cache",
        "vlmforge train",
        "vlmforge eval",
        "vlmforge chat",
        "vlmforge serve",
        "vlmforge export",
    ):
        assert verb in verbs, (verb, verbs)
    assert verbs.count("vlmforge train") == 2 and any(c.startswith("curl ") for c in commands)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outputs(command: str) -> list[str]:
    words = shlex.split(command)
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--out", "--train.out")]


@pytest.mark.slow
def test_the_readmes_walk_runs_in_order(tmp_path):
    commands = tutorial_commands((ROOT / "README.md").read_text())
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLMFORGE_IMAGE_DIR=str(tmp_path / "images"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # this environment's vlmforge
    server = None
    ran = []
    try:
        for command in commands:
            command = command.replace("8000", str(port))
            for prefix, flags in SCALE.items():
                if command.startswith(prefix + " "):
                    command = command.rstrip("&").rstrip() + " " + flags + (" &" if command.endswith("&") else "")
            if command.endswith("&"):  # the server: started, then asked once it is up
                server = subprocess.Popen(
                    ["bash", "-c", "exec " + command.rstrip("&")],
                    cwd=tmp_path,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                deadline = time.time() + 120
                while True:
                    assert server.poll() is None, f"{command}: the server exited\n{server.stderr.read()}"
                    try:
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                        break
                    except OSError:
                        assert time.time() < deadline, f"{command}: no answer on port {port} in 120 s"
                        time.sleep(0.5)
                ran.append(("serve", command))
                continue
            if command.startswith("kill "):
                assert server is not None, "the walk stops a server it never started"
                server.send_signal(signal.SIGINT)
                server.wait(timeout=60)
                ran.append(("kill", command))
                continue
            r = subprocess.run(
                ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
            )
            assert r.returncode == 0, f"{command}\nexit {r.returncode}\n{r.stderr[-3000:]}"
            for out in _outputs(command):
                assert (tmp_path / out).exists(), f"{command}: wrote no {out}"
                if "--train.out" in command:
                    assert (tmp_path / out / "model" / "config.json").is_file(), f"{command}: no model in {out}"
            if command.startswith("vlmforge chat"):
                assert r.stdout.strip(), f"{command}: no answer"
            if command.startswith("curl "):
                answer = json.loads(r.stdout)["choices"][0]
                assert isinstance(answer["message"]["content"], str) and answer["finish_reason"] in ("stop", "length")
            ran.append((" ".join(command.split()[:2]), command))
    finally:
        if server is not None and server.poll() is None:
            server.kill()
    assert [v for v, _ in ran].count("serve") == 1 and ran[-1][0] != "serve"

    # the served model answers as the local one does (greedy), question by question
    def predictions(folder):
        files = list((tmp_path / folder).glob("*/predictions.jsonl"))
        assert len(files) == 1, files
        return {p["id"]: p["prediction"] for p in map(json.loads, files[0].read_text().splitlines())}

    evals = [_outputs(c)[0] for v, c in ran if v == "vlmforge eval"]
    assert len(evals) == 2
    local, served = predictions(evals[0]), predictions(evals[1])
    assert local and local == served
    for folder in ("my/llava-hf/config.json", "my/gguf/lm-f16.gguf", "my/gguf/mmproj-f16.gguf"):
        assert (tmp_path / folder).is_file()
