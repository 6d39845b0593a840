"""scripts/setup.sh: a missing system tool or an unreachable package index stops the setup with one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, env, tmp_path):
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup.sh"), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_missing_system_tools_named_in_one_line(tmp_path):
    # a PATH with the shell's few helpers, a python, and neither the tools nor apt-get
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "date", "id", "grep", "tail", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)  # no llama_cpp in it: cmake and g++ are needed
    env = {"PATH": str(bin_dir), "VENV": str(venv), "HOME": str(tmp_path)}
    r = _run(["test"], env, tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for name in ("cmake", "g++", "chromium", "chromedriver", "apt-get install", "make setup-test"):
        assert name in lines[0]
    assert not (venv / ".installed-test").exists()
    # the tools present on the PATH are not named
    (bin_dir / "cmake").symlink_to(shutil.which("true"))
    r = _run(["test"], env, tmp_path)
    assert r.returncode == 1 and "cmake" not in r.stderr.split("no apt-get")[0] and "g++" in r.stderr


def test_unreachable_index_is_one_line(tmp_path):
    venv = tmp_path / "venv"
    env = dict(
        os.environ,
        VENV=str(venv),
        PIP_CONFIG_FILE=os.devnull,
        PIP_FIND_LINKS="",
        PIP_NO_CACHE_DIR="1",
        PIP_INDEX_URL="http://127.0.0.1:9/simple",
        PIP_RETRIES="0",
        PIP_TIMEOUT="2",
        PYTHON=sys.executable,
    )
    r = _run(["demo"], env, tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "torch==2.13.0" in lines[0] and "package index" in lines[0] and "setup.log" in lines[0]
    assert not (venv / ".installed").exists()


def test_unknown_layer_refused(tmp_path):
    r = _run(["everything"], dict(os.environ), tmp_path)
    assert r.returncode == 1 and "demo|test" in r.stderr
