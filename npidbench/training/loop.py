"""The epoch loop shared by the supervised protocols: step lr schedule, DDP-aware sampling,
rich progress, per-epoch atomic resume state.

The state of a run (trainable weights, optimiser, history) is saved atomically after every
epoch under the cache root, in a folder named by the run's identity (checkpoint, task, settings,
data, world size); rerunning the same command after a crash or Ctrl-C continues at the next
epoch, and the folder is removed once the record is written. Data order comes from torch's
DistributedSampler seeded per epoch, augmentation from (seed, epoch, index): a resumed run is the
uninterrupted one, step for step.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from npidbench.atomic import atomic_write, atomic_write_text
from npidbench.distributed import DistInfo
from npidbench.errors import RunFailed
from npidbench.pretrain.data import mix_seed
from npidbench.progress import log, make_progress

REFERENCE_BATCH = 256  # the protocols' batch: lr is given for it and scaled linearly (Goyal et al. 2017)


@dataclass(frozen=True)
class StepSchedule:
    """``epochs`` epochs, lr multiplied by ``gamma`` at each milestone epoch (0-based starts)."""

    epochs: int
    milestones: tuple[int, ...]
    gamma: float

    def factor(self, epoch: int) -> float:
        return self.gamma ** sum(epoch >= m for m in self.milestones)


def scaled_lr(lr: float, global_batch: int) -> float:
    """The linear scaling rule: the protocol's lr is for a global batch of 256."""
    return lr * global_batch / REFERENCE_BATCH


def epoch_indices(size: int, world: DistInfo, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """This rank's sample order for an epoch (torch's DistributedSampler, seeded per epoch; with
    one process it is a seeded permutation of the whole split)."""
    sampler = DistributedSampler(
        range(size), num_replicas=world.world_size, rank=world.rank, shuffle=shuffle, seed=seed
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def all_reduce_sum(values: torch.Tensor, world: DistInfo) -> torch.Tensor:
    if world.world_size > 1:
        dist.all_reduce(values)
    return values


class ResumeState:
    """Per-epoch state of one run, saved atomically under ``root/training/<identity digest>``."""

    def __init__(self, root: Path, identity: dict[str, Any], world: DistInfo) -> None:
        text = json.dumps(identity, sort_keys=True, default=str)
        self.folder = Path(root) / "training" / hashlib.sha256(text.encode()).hexdigest()[:20]
        self.path = self.folder / "state.pth"
        self.identity_text = text
        self.world = world

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def save(self, state: dict[str, Any]) -> None:
        if not self.world.is_main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "identity.json").exists():
            atomic_write_text(self.folder / "identity.json", self.identity_text + "\n")
        atomic_write(self.path, lambda handle: torch.save(state, handle))

    def clear(self) -> None:
        if self.world.world_size > 1:
            dist.barrier()  # every rank has read the state before it goes
        if self.world.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class StepResult:
    loss: torch.Tensor
    images: int
    correct: int | None  # top-1 hits of the head shown in the progress bar (None: no accuracy)


def fit(
    *,
    label: str,
    trainable: nn.Module,
    optimizer: torch.optim.Optimizer,
    base_lrs: Sequence[float],
    schedule: StepSchedule,
    batches: Callable[[int], Iterable[Any]],
    step: Callable[[Any], StepResult],
    evaluate: Callable[[], dict[str, Any]] | None,
    evaluate_at: Callable[[int], bool],
    state: ResumeState,
    world: DistInfo,
    images_per_epoch: int,
    iterations_per_epoch: int = 0,
    lr_at: Callable[[int], float] | None = None,
    step_seed: int | None = None,
) -> list[dict[str, Any]]:
    """Train ``trainable`` for the schedule's epochs; returns one history line per epoch (loss,
    train top-1, images/s and, where ``evaluate_at(epoch)``, the evaluation's metrics).

    Iteration-based schedules treat a window of ``iterations_per_epoch`` iterations as an "epoch"
    of this loop: ``lr_at(iteration)`` then sets the lr factor at every step (warm-up, poly), and
    with ``step_seed`` torch's generator is seeded per iteration (RoI sampling, dropout), so that
    a resumed run repeats the uninterrupted one."""
    history: list[dict[str, Any]] = []
    start = 0
    saved = state.load()
    if saved is not None:
        trainable.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        history, start = list(saved["history"]), int(saved["epoch"])
        log(f"{label}: resuming after epoch {start} of {schedule.epochs} ({state.folder})")
    try:
        with make_progress(unit="img") as progress:
            bar = progress.add_task(
                label, total=images_per_epoch * schedule.epochs, completed=images_per_epoch * start
            )
            for epoch in range(start, schedule.epochs):
                factor = schedule.factor(epoch)
                for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = base * factor
                started, seen, correct, loss_sum, steps = time.perf_counter(), 0, 0, 0.0, 0
                trainable.train()
                for batch in batches(epoch):
                    iteration = epoch * iterations_per_epoch + steps
                    if lr_at is not None:
                        factor = lr_at(iteration)
                        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                            group["lr"] = base * factor
                    if step_seed is not None:
                        torch.manual_seed(mix_seed(step_seed, iteration, 5))
                    result = step(batch)
                    value = float(result.loss.detach())
                    if not math.isfinite(value):
                        raise RunFailed(
                            f"{label}: the loss became {value} in epoch {epoch + 1}; lower the learning rate "
                            "with --set and run again (finished epochs are kept and resumed)"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    result.loss.backward()
                    optimizer.step()
                    seen += result.images
                    correct += result.correct or 0
                    shown = f" acc {100 * correct / max(seen, 1):.1f}%" if result.correct is not None else ""
                    loss_sum += value
                    steps += 1
                    progress.update(
                        bar,
                        advance=result.images * world.world_size,
                        description=f"{label} ep {epoch + 1}/{schedule.epochs} loss {value:.3f}{shown}",
                    )
                seconds = time.perf_counter() - started
                line: dict[str, Any] = {
                    "epoch": epoch + 1,
                    "lr_factor": round(factor, 10),
                    "loss": round(loss_sum / max(steps, 1), 5),
                    "train_top1": round(100 * correct / max(seen, 1), 3),
                    "images_per_s": round(seen * world.world_size / seconds, 1) if seconds > 0 else 0.0,
                }
                if evaluate is not None and evaluate_at(epoch):
                    line["eval"] = evaluate()
                history.append(line)
                state.save(
                    {
                        "epoch": epoch + 1,
                        "model": trainable.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "history": history,
                    }
                )
        return history
    except KeyboardInterrupt:
        saved = state.load()
        done = int(saved["epoch"]) if saved is not None else 0
        raise RunFailed(
            f"{label}: interrupted after {done} of {schedule.epochs} epochs; they are saved in {state.folder}: "
            "run the same command again to continue"
        ) from None
