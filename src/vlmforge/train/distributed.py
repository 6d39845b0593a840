"""Training on several processes with PyTorch's own distributed engine, as `torchrun` launches it.

`torchrun --nproc_per_node N -m vlmforge train …` (or `vlmforge train --nproc N`, which calls
torchrun) sets RANK / WORLD_SIZE / MASTER_ADDR; `setup` joins the process group (gloo on CPU,
NCCL on GPUs) with a timeout, so that a rank that dies makes the others fail instead of hang.

Data parallelism keeps the single-process run's meaning: the shuffled stream of micro-batches is
the same; an optimizer step takes `grad_accum x world` consecutive micro-batches of it, each rank
its own `grad_accum` of them; the loss is normalised by the label tokens of the whole global batch
and gradients are summed across ranks. So a run on W ranks with accumulation A follows the same
loss curve as one process with accumulation A x W (within float tolerance), and a checkpoint
(written once, by rank 0) resumes on any number of ranks.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


class Dist:
    """This process's place in the job (rank 0 of 1 when not launched by torchrun)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Sum numbers over ranks (one all-reduce)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over ranks, as one flat buffer."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def setup(timeout_s: float = 600.0) -> Dist:
    """Join the process group if torchrun started this process; otherwise a single-process Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world, local)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
