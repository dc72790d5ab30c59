"""torch.distributed set-up for commands started under torchrun (one process per GPU, or gloo
processes on a CPU). Outside torchrun everything runs as a single rank-0 process."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def distributed(device: str) -> Iterator[DistInfo]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); each rank gets its own GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        rank = dist.get_rank() if dist.is_initialized() else 0
        size = dist.get_world_size() if dist.is_initialized() else 1
        yield DistInfo(rank, size, device)
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield DistInfo(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()


def current_world(device: str) -> DistInfo:
    """This process's rank and the world size inside ``distributed()`` (1 process outside)."""
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), device)
    return DistInfo(0, 1, device)


def check_global_batch(batch_size: int, world: DistInfo) -> None:
    """A global batch must split evenly over torchrun's processes."""
    if batch_size % world.world_size:
        from npidbench.errors import BadInput

        raise BadInput(f"batch_size {batch_size} is not divisible by the {world.world_size} processes")


def prepare_for_training(
    model: torch.nn.Module,
    world: DistInfo,
    sync_bn: bool,
    channels_last: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model on this rank's device, what to call in training steps): BatchNorm becomes
    SyncBatchNorm under torchrun on GPUs (SyncBN has no CPU kernel), the model moves to the
    device (and to ``dtype`` when given), and it is wrapped in DistributedDataParallel when there
    are several processes."""
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(world.device)
    if sync_bn and world.world_size > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device) if dtype is None else model.to(device, dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world.world_size == 1:
        return model, model
    return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
