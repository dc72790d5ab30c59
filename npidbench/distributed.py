"""torch.distributed set-up for commands started under torchrun (one process per GPU, or gloo
processes on a CPU). Outside torchrun everything runs as a single rank-0 process."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


def check_shared_folder(folder: Path, world: DistInfo, what: str, wait_s: float = 2.0) -> None:
    """Under several processes, ``folder`` must be one folder that all of them see (with several
    nodes: on a filesystem every node mounts at the same path): rank 0 writes a file there that
    every rank must read back. Raises BadInput on every rank together otherwise, naming the ranks
    and hosts that do not see it, before any rank relies on another's files there (without the
    check a node-local folder fails later with a FileNotFoundError on one rank while the others
    wait in a collective). ``wait_s``: how long a rank retries before it concludes it cannot see
    the file (a network filesystem may show a new file a moment late)."""
    if world.world_size <= 1:
        return
    import torch.distributed as dist

    from npidbench.errors import BadInput

    folder = Path(folder)
    shared = [secrets.token_hex(8) if world.is_main else None]
    dist.broadcast_object_list(shared, src=0)
    token = shared[0]
    probe = folder / f".shared-check-{token}"
    if world.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    dist.barrier()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            seen = probe.read_text() == token
        except OSError:
            seen = False
        if seen or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    answers: list = [None] * world.world_size
    dist.all_gather_object(answers, (seen, socket.gethostname()))
    if world.is_main:
        probe.unlink(missing_ok=True)
    blind = [f"{rank} on {host}" for rank, (ok, host) in enumerate(answers) if not ok]
    if blind:
        raise BadInput(
            f"the {what} {folder} is not one folder shared by every process: rank(s) {', '.join(blind)} "
            f"do not see the file rank 0 ({answers[0][1]}) wrote there; on several nodes put it on a "
            "filesystem every node mounts at the same path (README: Multi-node and SLURM)"
        )


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
