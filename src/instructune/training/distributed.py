"""The only module that touches ``torch.distributed``.

Under ``torchrun --nproc_per_node=N`` (which sets RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/PORT) the process group is started with gloo on CPU and nccl on CUDA; without
those variables every function here is a cheap single-process no-op.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``; rank 0 writes files and prints."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Start the process group when launched by torchrun (idempotent); else one process."""
    if not launched_by_torchrun():
        return DistInfo()
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


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


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over all processes, in place; returns it (unchanged for one process)."""
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


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Tear the process group down (end of run)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
