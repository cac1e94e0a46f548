"""Process-group plumbing for ``torchrun``: which rank this is, its device, DDP, and collectives.

Everything distributed in ``train/`` goes through a :class:`DistContext`. A plain
``python -m train`` gets ``DistContext.single()`` (rank 0 of 1: no process group, no
DistributedDataParallel, every method a no-op), so single-process runs do not change.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment, rendezvous
done by torchrun, single- or multi-node) :func:`setup` joins the process group: NCCL with one GPU
per process (``cuda:LOCAL_RANK``) when the run is on CUDA, gloo on CPU.

Batch size and learning rate: ``--batch-size`` is per process, so the effective (global) batch of
one optimizer step is ``batch_size x world_size``; DDP averages the gradients over the ranks, which
makes a step the same as one process taking the global batch (the loss is a mean over examples).
``--lr`` is the learning rate of that step as given; ``scaled_lr`` applies an optional rule
relative to the recipe's batch of ``REFERENCE_BATCH`` = 2 (``sqrt``: ``lr x sqrt(B / 2)``, the
square-root rule for Adam-type optimizers; ``linear``: ``lr x B / 2``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

REFERENCE_BATCH = 2  # the recipe's batch size, which its learning rate 1e-4 belongs to
LR_RULES = ("none", "sqrt", "linear")


def launched_by_torchrun() -> bool:
    """True when the environment names more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def scaled_lr(lr: float, global_batch: int, rule: str = "none") -> float:
    """The learning rate for a global batch of ``global_batch`` examples under ``rule``
    (``none``: ``lr``; ``sqrt``: ``lr * sqrt(global_batch / 2)``; ``linear``: ``lr * global_batch / 2``)."""
    if rule not in LR_RULES:
        raise ValueError(f"learning-rate rule must be one of {LR_RULES}, not {rule!r}")
    ratio = global_batch / REFERENCE_BATCH
    return lr * {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[rule]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: ``rank`` of ``world_size`` (``local_rank`` on its node)
    and the device it trains on."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @classmethod
    def single(cls, device: Optional[str | torch.device] = None) -> "DistContext":
        """Rank 0 of 1 on ``device`` (default: CUDA when present)."""
        dev = torch.device(device) if device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        return cls(0, 1, 0, dev)

    @property
    def enabled(self) -> bool:
        """More than one process: DDP and collectives are in use."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, logs and shows progress."""
        return self.rank == 0

    def wrap(self, network: torch.nn.Module) -> torch.nn.Module:
        """``network`` in DistributedDataParallel when distributed, else itself. The wrapper is
        for the training forward/backward only: no-grad predictions (the second prompt step,
        validation) use ``network`` directly, so ranks that predict different numbers of times
        never wait on each other. The network has no buffers to keep in sync."""
        if not self.enabled:
            return network
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == "cuda" else None
        # the decoder's deep-supervision heads get no gradient (the loss uses the full-resolution
        # output only), hence find_unused_parameters
        return DistributedDataParallel(network, device_ids=ids, find_unused_parameters=True)

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all ranks (``value`` itself in a single process)."""
        if not self.enabled:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def check_same(self, value: int, what: str) -> None:
        """Raise on every rank unless all ranks hold the same integer ``value``."""
        if not self.enabled:
            return
        t = torch.tensor([int(value), -int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != -int(t[1]):
            raise RuntimeError(f"ranks disagree on {what}: from {-int(t[1])} to {int(t[0])}")

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(device_ids=[self.device.index]) if self.device.type == "cuda" else dist.barrier()


def setup(device: Optional[str] = None, timeout_min: float = 60.0) -> DistContext:
    """Join the process group when launched by ``torchrun``; else ``DistContext.single(device)``.

    ``device``: "cpu" or "cuda" (default: CUDA when present). Under torchrun a CUDA run uses
    ``cuda:LOCAL_RANK`` (an index in ``device`` is ignored) with NCCL; a CPU run uses gloo.
    ``timeout_min``: how long a collective may wait, e.g. while rank 0 validates (minutes).
    """
    if not launched_by_torchrun():
        return DistContext.single(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", timeout=timedelta(minutes=timeout_min), device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(minutes=timeout_min))
    return DistContext(rank, world, local, dev)


def teardown(ctx: DistContext) -> None:
    """Leave the process group when :func:`setup` joined one (no barrier: a rank that failed
    must not wait for the others; ``Trainer.fit`` ends with one)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
