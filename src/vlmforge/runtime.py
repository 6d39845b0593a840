"""Process-wide state, owned here and nowhere else: torch's CPU threads, seeds, library logging
and progress bars, the garbage collector's view of long-lived objects, and the torch.distributed
process group; and what this process runs on (its device, its matmul and memory read rates).

Each setting is a context manager that undoes its change on exit, so a library call never leaves
the caller's process changed (a thread count leaked by one step once slowed every later test).
torch is imported on first use: importing this module (the CLI does) stays cheap.
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to `n` inside the block (None or 0: left as they are)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global CPU generator seeded with `seed` inside the block; its state before is
    restored on exit (CUDA generators untouched)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """transformers' logging at error level and its download bars off inside the block (loading
    our own checkpoints warns about things that are expected); both restored on exit."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """tqdm bars of this process and of the processes it starts on or off inside the block."""
    before = os.environ.get("TQDM_DISABLE")
    if enabled:
        os.environ.pop("TQDM_DISABLE", None)
    else:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


@contextmanager
def long_lived() -> Iterator[None]:
    """Every object alive on entry moved out of the cyclic garbage collector's sight inside the
    block (`gc.freeze`), so that its full collections no longer walk a loaded model, tokenizer and
    libraries again and again (a server's steps paid that often enough to serve about 10% fewer
    tokens/s at 16 clients); given back to it on exit (by the outermost block, when nested)."""
    outermost = gc.get_freeze_count() == 0
    gc.freeze()
    try:
        yield
    finally:
        if outermost:
            gc.unfreeze()


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun describes them in the environment."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0"))


def device(name: str = "auto") -> str:
    """`auto`: this process's GPU (its local rank's) if there is one, else the CPU; any other name
    (cpu, cuda, cuda:1) as it is."""
    import torch

    if name != "auto":
        return name
    return f"cuda:{world()[2]}" if torch.cuda.is_available() else "cpu"


def matmul_flops(n: int, a=None, b=None) -> float:
    """FLOP/s of one n x n fp32 matmul (of `a` and `b`, or of random ones) on this process's threads."""
    import time

    import torch

    a = torch.randn(n, n) if a is None else a
    b = torch.randn(n, n) if b is None else b
    t = time.perf_counter()
    torch.mm(a, b)
    return 2 * n**3 / (time.perf_counter() - t)


def matmul_peak(n_threads: int | None = None, sizes=(512, 1024, 2048), repeats: int = 5) -> tuple[float, int]:
    """FLOP/s of the fastest square fp32 matmul here on `n_threads` threads, and its size: the
    machine's speed, which benchmarks and the demo print beside their times."""
    import torch

    best, best_n = 0.0, sizes[-1]
    with threads(n_threads):
        for n in sizes:
            a, b = torch.randn(n, n), torch.randn(n, n)
            torch.mm(a, b)
            rate = max(matmul_flops(n, a, b) for _ in range(repeats))
            if rate > best:
                best, best_n = rate, n
    return best, best_n


def best_seconds(fn, repeats: int = 5) -> float:
    """The shortest of `repeats` timed calls of `fn`, after one untimed call to warm it up."""
    return best_seconds_each([fn], repeats)[0]


def best_seconds_each(fns, repeats: int = 5) -> list[float]:
    """The shortest of `repeats` timed calls of each of `fns`, after an untimed call of each to warm
    it up; the calls take turns, so that a machine whose speed moves within a process shows each
    function the same moments of it."""
    import time

    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def read_rate(nbytes: int, repeats: int = 5, alloc=None) -> float:
    """Bytes/s at which this process reads a buffer of `nbytes` (at least 1 MB) once, best of
    `repeats` (a sum over it): the machine's memory bound, for the weights a decode step streams.
    `alloc(shape)`: the float32 buffer, in the kind of memory those weights sit in (default
    `torch.empty`)."""
    import torch

    buf = (alloc or torch.empty)((max(nbytes, 1 << 20) // 4,)).fill_(1.0)
    return buf.numel() * 4 / best_seconds(buf.sum, repeats)


def join_process_group(timeout_s: float, cuda: bool | None = None) -> tuple[int, int, int]:
    """Join the process group torchrun describes (nccl on CUDA, else gloo) unless joined already;
    returns (rank, world size, local rank); a single process joins nothing."""
    import torch
    import torch.distributed as dist

    rank, size, local = world()
    if size > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available() if cuda is None else cuda
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return rank, size, local


def leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def die_with_parent() -> None:
    """Have the kernel end this process when its parent ends, however the parent ends (a worker of
    a pool whose parent got SIGTERM or SIGKILL would otherwise run on). Linux only; elsewhere a no-op."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
