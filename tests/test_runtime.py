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
