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

Two strategies (`--train.strategy`): `ddp` wraps the model in DistributedDataParallel, which
all-reduces gradients in buckets while the backward pass runs; `fsdp` shards it with FSDP2's
`fully_shard` (each LM decoder layer its own unit, the rest in the root; the frozen vision tower
replicated), so that a rank holds 1/W of the LM's weights, gradients and optimizer state. Both average
gradients over ranks, so the loss of a rank is scaled by W to keep the sum. Checkpoints hold the
full (unsharded) trainable state keyed by parameter name, whatever the strategy, so a run saved by
2 FSDP ranks resumes on 1 process, or on 4 DDP ranks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from vlmforge.runtime import join_process_group, leave_process_group


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

    def gather(self, obj) -> list:
        """`obj` of every rank, in rank order, on every rank (small JSON-like values)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


class Parallel:
    """The model as the training step calls it, for the strategy and the number of ranks."""

    def __init__(self, model, strategy: str, precision: str, d: Dist):
        self.model, self.d = model, d
        self.strategy = strategy if d.enabled else "single"
        # training from cached features leaves the vision tower's weights on `meta`
        self.device_type = next(p.device.type for p in model.parameters() if not p.is_meta)
        self.bf16 = precision == "bf16"
        self.module = model
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [d.local_rank] if self.device_type == "cuda" else None
            # unused parameters happen: a text-only batch leaves the connector out of the graph
            self.module = DistributedDataParallel(
                model, ids, find_unused_parameters=True, broadcast_buffers=False, gradient_as_bucket_view=True
            )
        elif self.strategy == "fsdp":
            shard(model, self.bf16)
        elif self.strategy != "single":
            raise ValueError(f"unknown strategy {strategy!r} (ddp or fsdp)")

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    @property
    def loss_scale(self) -> float:
        """DDP and FSDP average gradients over ranks; the loss is already normalised by the global
        batch's label tokens, so each rank's loss is multiplied by W to make the average a sum."""
        return float(self.d.world) if self.strategy in ("ddp", "fsdp") else 1.0

    def micro_batch(self, last: bool):
        """Context of one micro-batch's forward and backward: gradients are synchronised only on
        the last micro-batch of a step (the others accumulate locally)."""
        ctx = contextlib.ExitStack()
        if self.strategy == "ddp" and not last:
            ctx.enter_context(self.module.no_sync())
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(last)
        if self.bf16 and not self.sharded:  # FSDP casts through its mixed-precision policy
            ctx.enter_context(torch.autocast(self.device_type, dtype=torch.bfloat16))
        return ctx

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def shard(model, bf16: bool = False) -> None:
    """FSDP2: each LM decoder layer a unit, then the rest (embeddings, head, norms, connector, and
    the vision tower's trained weights: all of it, its top blocks or its LoRA adapters) as the
    root, which every rank gathers at every forward. The tower's frozen weights are replicated,
    not sharded: a unit of their own would make every rank gather them in step with the others,
    which a text-only micro-batch on one rank (or features from a cache) would not do; a frozen
    SigLIP-so400m costs 0.8 GB in bf16. A rank without images still runs the connector and a
    trained tower (on zeros, times 0: `VLM.forward(all_params=True)`), so every rank reduces the
    same gradients."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in model.causal_lm.get_decoder().layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp, ignored_params={p for p in model.vision.parameters() if not p.requires_grad})


def setup(timeout_s: float = 600.0) -> Dist:
    """Join the process group if torchrun started this process; otherwise a single-process Dist."""
    rank, world, local = join_process_group(timeout_s)
    return Dist(rank, world, local) if world > 1 else Dist()


def teardown(d: Dist, clean: bool = True) -> None:
    """Leave the process group. `clean` (every rank got here): first wait for the others and
    free what still holds the group (the DDP / FSDP wrappers of the finished model), so that no
    rank keeps gloo's threads alive while another closes its connections: a process that exits
    with them alive can abort when its peer goes. After an error, leave at once."""
    if not d.enabled:
        return
    if clean:
        import gc

        d.barrier()
        gc.collect()
        d.barrier()
    leave_process_group()
