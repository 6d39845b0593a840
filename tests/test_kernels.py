"""The row-tile kernel (`infer/kernels.py`): equal to torch's matmul at every row count and shape it
takes, bad input refused by name, and a clear reason where it cannot be built."""

from __future__ import annotations

import pytest
import torch

from vlmforge import runtime
from vlmforge.infer import kernels


@pytest.fixture
def rebuilt(monkeypatch, tmp_path):
    """`kernels` loading afresh (its cached library forgotten) into `tmp_path`, and as before after."""
    monkeypatch.setenv("VLMFORGE_KERNEL_CACHE", str(tmp_path))
    kernels._load.cache_clear()
    yield tmp_path
    kernels._load.cache_clear()


def test_tiles_equal_the_matmul_at_every_row_count():
    assert kernels.library() is not None, kernels.why_unavailable()
    width = kernels.library().rowmm_tile_width()
    g = torch.Generator().manual_seed(0)
    # outputs below, at and past a tile's width, and not a multiple of it; inputs of 1 and odd widths
    for out, inp in [(1, 1), (width - 1, 7), (width, 64), (3 * width + 5, 33), (200, 576)]:
        for bias in (None, torch.randn(out, generator=g)):
            w = torch.randn(out, inp, generator=g)
            tiles = kernels.Tiles(w, bias)
            for rows in (1, 2, 3, 5, 8, 9, 13, 17, kernels.MAX_ROWS):
                x = torch.randn(inp, rows, generator=g).t()  # not contiguous
                want = x @ w.t() + (0 if bias is None else bias)
                got = tiles(x)
                assert got.shape == (rows, out)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * inp**0.5)
    assert kernels.Tiles(torch.ones(4, 3))(torch.empty(0, 3)).shape == (0, 4)
    with runtime.threads(1):  # the kernel runs on torch's thread count of the calling thread
        torch.testing.assert_close(tiles(x), want, rtol=1e-5, atol=1e-5 * inp**0.5)


def test_bad_input_is_refused_by_name():
    tiles = kernels.Tiles(torch.ones(40, 16))
    with pytest.raises(ValueError, match=r"x \[rows, 16\].*\(2, 15\)"):
        tiles(torch.ones(2, 15))
    with pytest.raises(ValueError, match="float64"):
        tiles(torch.ones(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="torch.float16"):
        kernels.Tiles(torch.ones(40, 16, dtype=torch.float16))


def test_a_kernel_that_cannot_be_built_says_why(rebuilt, monkeypatch):
    monkeypatch.setenv("VLMFORGE_KERNELS", "0")
    assert kernels.library() is None and "VLMFORGE_KERNELS=0" in kernels.why_unavailable()
    with pytest.raises(RuntimeError, match="unavailable: turned off"):
        kernels.Tiles(torch.ones(4, 4))
    kernels._load.cache_clear()
    monkeypatch.delenv("VLMFORGE_KERNELS")
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    assert kernels.library() is None and "false could not build kernels.c" in kernels.why_unavailable()
    assert list(rebuilt.iterdir()) == []  # nothing half-written left behind


def test_the_library_is_built_once_into_the_cache_folder(rebuilt):
    assert kernels.library() is not None, kernels.why_unavailable()
    (built,) = rebuilt.glob("kernels-*.so")
    stamp = built.stat().st_mtime_ns
    kernels._load.cache_clear()
    assert kernels.library() is not None and built.stat().st_mtime_ns == stamp  # taken from the cache
