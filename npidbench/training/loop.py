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


@dataclass(frozen=True)
class CosineSchedule:
    """lr x (1 + cos(pi t / T)) / 2 down to 0 over ``epochs``, after a linear warm-up from 0 over
    ``warmup_epochs`` (T counts from its end). ``factor(epoch)`` is the per-epoch form (DINO's
    eval_linear steps CosineAnnealingLR once an epoch); ``at(t)`` takes a fractional epoch, for
    the per-iteration forms (MAE's lr_sched.adjust_learning_rate, DINOv2's per-iteration
    CosineAnnealingLR: PROTOCOLS-ARCH.md section 2)."""

    epochs: int
    warmup_epochs: float = 0.0
    floor: float = 0.0  # the end as a fraction of the peak (MAE fine-tuning: min_lr 1e-6 / lr)

    def factor(self, epoch: int) -> float:
        return self.at(float(epoch))

    def at(self, t: float) -> float:
        if t < self.warmup_epochs:
            return t / self.warmup_epochs
        span = self.epochs - self.warmup_epochs
        return self.floor + (1.0 - self.floor) * 0.5 * (
            1.0 + math.cos(math.pi * (t - self.warmup_epochs) / span)
        )


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
    schedule: StepSchedule | CosineSchedule,
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
    run = _Training(
        label,
        trainable,
        optimizer,
        base_lrs,
        schedule,
        batches,
        step,
        evaluate,
        evaluate_at,
        world,
        iterations_per_epoch,
        lr_at,
        step_seed,
    )
    history, start = run.resume(state)
    try:
        return run.train_from(state, history, start, images_per_epoch)
    except KeyboardInterrupt:
        raise _interrupted(label, schedule.epochs, state) from None


@dataclass(frozen=True)
class _Training:
    """What ``fit`` trains and how: one epoch at a time, resumable."""

    label: str
    trainable: nn.Module
    optimizer: torch.optim.Optimizer
    base_lrs: Sequence[float]
    schedule: StepSchedule | CosineSchedule
    batches: Callable[[int], Iterable[Any]]
    step: Callable[[Any], StepResult]
    evaluate: Callable[[], dict[str, Any]] | None
    evaluate_at: Callable[[int], bool]
    world: DistInfo
    iterations_per_epoch: int  # with lr_at / step_seed: an iteration-based schedule (see fit)
    lr_at: Callable[[int], float] | None
    step_seed: int | None

    def resume(self, state: ResumeState) -> tuple[list[dict[str, Any]], int]:
        """(the history so far, the first epoch to train): where the saved state left off."""
        saved = state.load()
        if saved is None:
            return [], 0
        self.trainable.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        history, start = list(saved["history"]), int(saved["epoch"])
        log(f"{self.label}: resuming after epoch {start} of {self.schedule.epochs} ({state.folder})")
        return history, start

    def train_from(
        self, state: ResumeState, history: list[dict[str, Any]], start: int, images_per_epoch: int
    ) -> list[dict[str, Any]]:
        """Train from epoch ``start`` to the end, evaluating and saving the state after each."""
        with make_progress(unit="img") as progress:
            bar = progress.add_task(
                self.label,
                total=images_per_epoch * self.schedule.epochs,
                completed=images_per_epoch * start,
            )
            for epoch in range(start, self.schedule.epochs):
                line = self.train_one_epoch(
                    epoch, lambda n, text: progress.update(bar, advance=n, description=text)
                )
                if self.evaluate is not None and self.evaluate_at(epoch):
                    line["eval"] = self.evaluate()
                history.append(line)
                self.save(state, epoch, history)
        return history

    def set_lr(self, factor: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def train_one_epoch(self, epoch: int, advance: Callable[[int, str], None]) -> dict[str, Any]:
        """Train one epoch; returns its history line (without the evaluation). ``advance(images,
        text)`` moves the progress bar after every step."""
        factor = self.schedule.factor(epoch)
        self.set_lr(factor)
        started, tally = time.perf_counter(), _Tally()
        self.trainable.train()
        for batch in self.batches(epoch):
            iteration = epoch * self.iterations_per_epoch + tally.steps
            if self.lr_at is not None:
                factor = self.lr_at(iteration)
                self.set_lr(factor)
            if self.step_seed is not None:
                torch.manual_seed(mix_seed(self.step_seed, iteration, 5))
            result = self.step(batch)
            value, images, correct = self._global_step(result, epoch)
            self.optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            self.optimizer.step()
            tally.add(images, correct, value)
            shown = f" acc {tally.top1():.1f}%" if correct is not None else ""
            advance(images, f"{self.label} ep {epoch + 1}/{self.schedule.epochs} loss {value:.3f}{shown}")
        seconds = time.perf_counter() - started
        return tally.line(epoch, factor, seconds)

    def _global_step(self, result: StepResult, epoch: int) -> tuple[float, int, int | None]:
        """(the step's loss, images and top-1 hits over the whole global batch): under torchrun
        the ranks' shards are summed (the loss weighted by each shard's images), so the history
        is one process's rather than rank 0's shard, and a loss that is not finite on any rank
        stops every rank at the same step instead of leaving the others waiting in DDP's
        all-reduce."""
        value, images, correct = float(result.loss.detach()), result.images, result.correct
        if self.world.world_size > 1:
            totals = torch.tensor(
                [value * images if images else 0.0, float(images), float(correct or 0)],
                dtype=torch.float64,
                device=self.world.device,
            )
            totals = all_reduce_sum(totals, self.world).tolist()
            value = totals[0] / totals[1] if totals[1] else totals[0]
            images = int(totals[1])
            correct = int(totals[2]) if correct is not None else None
        if not math.isfinite(value):
            raise RunFailed(
                f"{self.label}: the loss became {value} in epoch {epoch + 1}; lower the learning rate "
                "with --set and run again (finished epochs are kept and resumed)"
            )
        return value, images, correct

    def save(self, state: ResumeState, epoch: int, history: list[dict[str, Any]]) -> None:
        """The state after ``epoch``: a rerun continues with the next one."""
        state.save(
            {
                "epoch": epoch + 1,
                "model": self.trainable.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "history": history,
            }
        )


@dataclass
class _Tally:
    """One epoch's running totals."""

    seen: int = 0
    correct: int = 0
    loss_sum: float = 0.0
    steps: int = 0

    def add(self, images: int, correct: int | None, loss: float) -> None:
        self.seen += images
        self.correct += correct or 0
        self.loss_sum += loss
        self.steps += 1

    def top1(self) -> float:
        return 100 * self.correct / max(self.seen, 1)

    def line(self, epoch: int, factor: float, seconds: float) -> dict[str, Any]:
        """The epoch's history line (``factor``: the lr factor of its last step; every count is
        over all ranks)."""
        return {
            "epoch": epoch + 1,
            "lr_factor": round(factor, 10),
            "loss": round(self.loss_sum / max(self.steps, 1), 5),
            "train_top1": round(self.top1(), 3),
            "images_per_s": round(self.seen / seconds, 1) if seconds > 0 else 0.0,
        }


def _interrupted(label: str, epochs: int, state: ResumeState) -> RunFailed:
    """Ctrl-C: what the user is told (the finished epochs are in the saved state)."""
    saved = state.load()
    done = int(saved["epoch"]) if saved is not None else 0
    return RunFailed(
        f"{label}: interrupted after {done} of {epochs} epochs; they are saved in {state.folder}: "
        "run the same command again to continue"
    )
