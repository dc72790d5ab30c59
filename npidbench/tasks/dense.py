"""What the dense transfer families, detection and segmentation, share (PROTOCOLS.md "Detection",
"Segmentation").

Both fine-tune the whole network for a number of iterations cut into windows (a window is one
"epoch" of ``training.loop.fit``: the unit a killed run resumes at), test once at the end, repeat
that ``trials`` times with seeds seed .. seed + trials - 1, and record the mean over the trials
with every trial's numbers. What they write in common is written here once, so that the two
records cannot drift apart: the trials and their resume folders, the record's ``dataset`` entry
and ``std`` spread, the linear lr scaling and the checks of the window arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from npidbench.data.images import decode_error_reason, decode_rgb
from npidbench.distributed import DistInfo, check_global_batch, current_world
from npidbench.errors import BadInput
from npidbench.tasks.base import RunContext, TaskOutput, run_identity
from npidbench.training.batches import window_batches
from npidbench.training.loop import ResumeState, StepResult, StepSchedule, fit


class DenseSettings(Protocol):
    """What the shared code reads of a family's config (a frozen dataclass, recorded whole in
    the run identity)."""

    @property
    def seed(self) -> int: ...

    @property
    def trials(self) -> int: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def scaled_lr(self) -> float: ...


class DenseSplit(Protocol):
    """What the record's ``dataset`` entry reads of a DetectionSplit or a SegmentationSplit."""

    split: str
    root: Path
    classes: list[str]
    synthetic: bool

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class TrialResult:
    """One trial: the table's numbers, fit's history lines, and what else the family keeps of
    it (segmentation: the per-class IoU)."""

    metrics: dict[str, float]
    history: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)


def linear_lr(lr: float, batch_size: int, reference_batch: int) -> float:
    """The lr at global batch ``batch_size`` of a protocol whose ``lr`` is given for
    ``reference_batch`` images: the linear scaling rule the reference configs assume when the
    batch changes (recorded as ``lr_scaled``)."""
    return lr * batch_size / reference_batch


def linear_warmup(iteration: int, warmup: int, start: float) -> float:
    """The lr factor of a linear warm-up from ``start`` to 1 over ``warmup`` iterations (1 after):
    detectron2's WarmupMultiStepLR "linear" and mmcv's LrUpdaterHook 'linear', 1 - (1 - i / n)(1 -
    ratio), are the same line."""
    if iteration >= warmup:
        return 1.0
    alpha = iteration / warmup
    return start * (1 - alpha) + alpha


def check_at_least_one(config: Any, *names: str) -> None:
    """ValueError naming every one of the settings ``names`` of ``config`` when one is below 1."""
    if min(getattr(config, name) for name in names) < 1:
        listed = f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]
        raise ValueError(f"{listed} must be at least 1")


def check_windows(iterations: int, window: int) -> None:
    """The resumable windows must tile the run exactly: a window is the unit of fit's loop."""
    if iterations % window:
        raise ValueError(f"iterations ({iterations}) must be a multiple of window ({window})")


def trial_seeds(config: DenseSettings) -> list[int]:
    return [config.seed + t for t in range(config.trials)]


def training_world(ctx: RunContext, batch_size: int) -> DistInfo:
    """This process's place in the run (torchrun or one process), refusing a global batch that
    does not split evenly over the ranks."""
    world = current_world(ctx.extract.device)
    check_global_batch(batch_size, world)
    return world


@dataclass(frozen=True)
class TrainingPlan:
    """How a trial trains: ``iterations`` at global batch ``batch_size`` in resumable windows of
    ``window`` iterations; ``lr`` (scaled, ``linear_lr``) times ``lr_at(iteration)`` at every step."""

    iterations: int
    window: int
    batch_size: int
    lr: float
    lr_at: Callable[[int], float]

    @property
    def windows(self) -> int:
        return self.iterations // self.window


@dataclass(frozen=True)
class Trial:
    """One trial of a run: its seed and resume state, with the context every trial shares."""

    ctx: RunContext
    world: DistInfo
    seed: int
    state: ResumeState

    @property
    def device(self) -> torch.device:
        return torch.device(self.world.device)

    def batches(
        self, dataset: Dataset, size: int, plan: TrainingPlan, collate: Callable
    ) -> Callable[[int], Any]:
        """window -> this rank's training batches of that window (``window_batches``: the same
        stream of images, drawn from the trial's seed, whatever the world size)."""
        workers = self.ctx.extract.workers
        return window_batches(
            dataset, size, self.world, plan.batch_size, plan.window, self.seed, workers, collate
        )

    def fit(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        plan: TrainingPlan,
        batches: Callable[[int], Iterable[Any]],
        step: Callable[[Any], StepResult],
    ) -> list[dict[str, Any]]:
        """``training.loop.fit`` over the plan's windows (one window is one of its "epochs"),
        without an evaluation between them (the protocols test once, at the end): every param
        group starts at ``plan.lr`` (times its ``lr_scale`` where it has one: layer-wise lr
        decay), ``plan.lr_at(iteration)`` sets the factor at every step (the window-level
        schedule is flat), and torch's generator is seeded per iteration from the
        trial's seed (RPN / RoI sampling, dropout), so a resumed run repeats the uninterrupted one."""
        return fit(
            label=f"{self.ctx.preset.name} seed {self.seed}",
            trainable=model,
            optimizer=optimizer,
            # a group's lr_scale: layer-wise lr decay (training.layer_decay), else 1
            base_lrs=[plan.lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups],
            schedule=StepSchedule(plan.windows, (), 1.0),
            batches=batches,
            step=step,
            evaluate=None,
            evaluate_at=lambda _: False,
            state=self.state,
            world=self.world,
            images_per_epoch=plan.window * plan.batch_size,
            iterations_per_epoch=plan.window,
            lr_at=plan.lr_at,
            step_seed=self.seed,
        )


def run_trials(
    ctx: RunContext,
    config: DenseSettings,
    world: DistInfo,
    data: str,
    run_one: Callable[[Trial], TrialResult],
) -> list[TrialResult]:
    """``run_one`` for every seed of ``config``, each trial with its own resume folder, named by
    the run identity with the seed and ``data`` (the training split's fingerprint). The folders
    are cleared only after the last trial: a run killed in a later trial finds the earlier
    ones' states complete and only tests them again."""
    results, states = [], []
    for seed in trial_seeds(config):
        identity = run_identity(ctx, config, world.world_size, seed=seed, data=data)
        state = ResumeState(ctx.cache.root, identity, world)
        states.append(state)
        results.append(run_one(Trial(ctx, world, seed, state)))
    for state in states:
        state.clear()
    return results


def metrics_over_trials(results: Sequence[TrialResult], listed: Sequence[Any]) -> dict[str, Any]:
    """The record's metrics: every metric's mean over the trials, ``trials`` (``listed``: the
    per-trial values the family's table reads), and with more than one trial ``std``, every
    metric's sample standard deviation (ddof=1: one trial has no spread)."""
    per_trial = [r.metrics for r in results]
    keys = list(per_trial[0])
    metrics: dict[str, Any] = {k: float(np.mean([m[k] for m in per_trial])) for k in keys}
    metrics["trials"] = list(listed)
    if len(per_trial) > 1:
        metrics["std"] = {k: float(np.std([m[k] for m in per_trial], ddof=1)) for k in keys}
    return metrics


def task_output(
    ctx: RunContext,
    config: DenseSettings,
    trials: Sequence[TrialResult],
    *,
    metrics: dict[str, Any],
    dataset: dict[str, Any],
    protocol: str,
    details: Mapping[str, Any],
    backend: str | None = None,
) -> TaskOutput:
    """The family's result with what both record: the seeds, and in the details the arch (and
    the ``backend`` that trained it, where the family has several), the global batch and the lr
    it scaled to, the family's ``details``, every trial's history (in the records' key order)."""
    return TaskOutput(
        metrics=metrics,
        dataset=dataset,
        protocol=protocol,
        seeds=trial_seeds(config),
        details={
            "arch": ctx.model.arch,
            **({"backend": backend} if backend is not None else {}),
            "global_batch": config.batch_size,
            "lr_scaled": config.scaled_lr,
            **details,
            "history": [t.history for t in trials],
        },
    )


def dataset_record(
    name: str,
    train: DenseSplit,
    test: DenseSplit,
    fingerprint: str,
    train_extra: Mapping[str, Any] | None = None,
    test_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The record's ``dataset`` entry of a dense train / test pair (``name``: the preset's
    dataset; ``*_extra``: more per split, detection's object counts)."""
    return {
        "name": name,
        "display": f"{name} (synthetic)" if train.synthetic else name,
        "synthetic": train.synthetic,
        "root": str(train.root),
        "fingerprint": fingerprint,
        "train": {"split": train.split, "images": len(train), **(train_extra or {})},
        "test": {"split": test.split, "images": len(test), **(test_extra or {})},
        "classes": len(train.classes),
    }


def refuse_unreadable(error: str | None) -> None:
    """A training batch carries, instead of raising in a loader worker, an image of it that
    could not be decoded ("path: reason"): the run stops there with one line."""
    if error is not None:
        raise BadInput(f"unreadable training image {error} (replace the file)")


def read_test_image(path: str | Path) -> torch.Tensor:
    """A test image as (3, H, W) uint8 RGB; an undecodable one is one BadInput line naming it."""
    try:
        return decode_rgb(path)
    except (RuntimeError, OSError, ValueError) as exc:
        raise BadInput(f"unreadable image {path}: {decode_error_reason(exc)}") from exc
