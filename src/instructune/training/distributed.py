"""The only module that touches ``torch.distributed``.

Under ``torchrun --nproc_per_node=N`` (which sets RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/PORT) a process group is started, for N = 1 too: ``cpu:gloo,cuda:nccl`` when
training on CUDA (NCCL for the tensors on the GPU, gloo for anything on the host, such as the
pickled random states gathered for a checkpoint), plain gloo otherwise. Without those
variables every function here is a cheap single-process no-op.

The loop hands every collective a tensor on its training device: NCCL refuses host tensors.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``; rank 0 writes files and prints."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started: bool = False  # a process group runs (under torchrun, even with one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether collectives (and DistributedDataParallel) run."""
        return self.started or self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when torchrun's RANK and WORLD_SIZE are set (WORLD_SIZE=1 included)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def process_group_backend(device: torch.device) -> str:
    """``cpu:gloo,cuda:nccl`` for CUDA training (NCCL for GPU tensors, gloo for host ones), else
    ``gloo``."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device) -> DistInfo:
    """Start the process group when launched by torchrun (idempotent); else one process.

    ``torchrun --nproc_per_node=1`` starts a group of one, so a single GPU runs the same
    NCCL path as several.
    """
    if not launched_by_torchrun():
        return DistInfo()
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=process_group_backend(device))
    return DistInfo(rank=rank, world_size=world, local_rank=local, started=True)


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """One GPU per process: cuda:LOCAL_RANK; other devices unchanged."""
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def wrap(module: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``module`` when there are several processes."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def no_sync(module: nn.Module, skip: bool):
    """Skip DDP's gradient all-reduce (for all but the last micro-batch of a step)."""
    if skip and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """The dtype of loss sums kept on ``device``: float64, or float32 where it has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over all processes, in place; returns it (unchanged for one process).

    ``value`` must be on the training device: NCCL refuses host tensors.
    """
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def sum_ints(values: list[int], info: DistInfo, device: torch.device) -> list[int]:
    """Sum a few integers (e.g. supervised token counts) over all processes."""
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [int(v) for v in tensor.tolist()]


def any_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on any (e.g. Ctrl-C, NaN): they stop together."""
    if not info.enabled:
        return flag
    return sum_ints([int(flag)], info, device)[0] > 0


def gather_objects(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every process's ``obj`` (picklable), in rank order, on the main process; None elsewhere.

    Pickled objects travel through the group's host backend (gloo), never NCCL.
    """
    if not info.enabled:
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Tear the process group down (end of run)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
