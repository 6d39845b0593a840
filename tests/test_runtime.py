import os

import pytest
import torch

from vlmforge import runtime


def test_every_setting_is_undone_on_exit_even_after_an_error():
    from transformers.utils import logging as hf_logging

    threads, verbosity, env = torch.get_num_threads(), hf_logging.get_verbosity(), os.environ.get("TQDM_DISABLE")
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError):
        with runtime.threads(1), runtime.seeded(7), runtime.quiet_libraries(), runtime.progress_bars(False):
            assert torch.get_num_threads() == 1
            assert hf_logging.get_verbosity() == hf_logging.ERROR
            assert os.environ["TQDM_DISABLE"] == "1"
            torch.rand(3)
            raise RuntimeError("a failing step")
    assert torch.get_num_threads() == threads
    assert hf_logging.get_verbosity() == verbosity
    assert os.environ.get("TQDM_DISABLE") == env
    assert torch.equal(torch.get_rng_state(), state)


def test_long_lived_hides_what_lives_now_from_the_collector_until_exit():
    import gc

    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError):
        with runtime.long_lived():
            assert gc.get_freeze_count() > 0
            with runtime.long_lived():  # nested: the outer block's freeze stands until it ends
                pass
            assert gc.get_freeze_count() > 0
            raise RuntimeError("a failing request")
    assert gc.get_freeze_count() == 0


def test_seeded_blocks_repeat_and_decorators_apply_per_call():
    with runtime.seeded(3):
        a = torch.rand(4)
    with runtime.seeded(3):
        b = torch.rand(4)
    assert torch.equal(a, b)

    @runtime.quiet_libraries()
    def verbosity():
        from transformers.utils import logging as hf_logging

        return hf_logging.get_verbosity()

    assert verbosity() == verbosity()  # the decorator can be entered again
    with runtime.threads(None):  # None leaves the count as it is
        assert torch.get_num_threads() >= 1


def test_world_reads_torchrun_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert runtime.world() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert runtime.world() == (2, 4, 0)


def test_a_worker_ends_with_its_parent(tmp_path):
    """A pool worker whose parent is killed (SIGKILL: no cleanup runs) ends too."""
    import signal
    import subprocess
    import sys
    import time

    pid_file, child_py = tmp_path / "child.pid", tmp_path / "child.py"
    child_py.write_text(
        "import os, sys, time\nfrom vlmforge import runtime\nruntime.die_with_parent()\n"
        "open(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(60)\n"
    )
    parent = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, {str(child_py)!r}, {str(pid_file)!r}])\n"
    proc = subprocess.Popen([sys.executable, "-c", parent + "time.sleep(60)\n"])
    deadline = time.time() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.time() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:  # gone, or a zombie waiting to be reaped by whoever adopted it
            if open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0] in "ZX":
                return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the child outlived its parent")
