"""``npidbench run all``: every preset whose data is present, one after the other, sharing the
checkpoint (loaded once) and the feature cache; a failed task is reported and the others go on;
a summary at the end."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.table import Table

from npidbench.checkpoint import LoadedBackbone, load_backbone
from npidbench.data import dataset_parts, dataset_root, reads_synthetic_data
from npidbench.errors import BadInput, NpidbenchError
from npidbench.progress import console, log
from npidbench.runner import RunRequest, extract_options, resolve_config, run_task
from npidbench.tasks import family_of, presets
from npidbench.tasks.base import Preset


@dataclass
class TaskOutcome:
    task: str
    status: str  # ran, skipped, failed
    seconds: float = 0.0
    record: Path | None = None
    reason: str = ""


@dataclass
class SuiteResult:
    outcomes: list[TaskOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[TaskOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def suite_presets(backbone_family: str = "resnet") -> list[Preset]:
    """The presets ``run all`` runs: all of them except those marked ``in_all = false`` (parts of
    another preset, or an alternative protocol) and, for a checkpoint of ``backbone_family``,
    those listing other families (``in_all = ["vit", "convnext"]``)."""
    return [p for p in presets().values() if p.runs_in_all(backbone_family)]


def missing_data(preset: Preset, data_root: Path | None) -> str | None:
    """Why ``preset`` cannot run on ``data_root`` (None: its data is present)."""
    if data_root is None:
        return None  # the embedded synthetic suite has every dataset
    for name in dataset_parts(preset.dataset):
        try:
            dataset_root(name, data_root)
        except BadInput as exc:
            return str(exc)
    return None


def unsupported(preset: Preset, loaded: LoadedBackbone | None, data_root: Path | None) -> str | None:
    """Why the checkpoint's backbone cannot run ``preset`` with its settings (None: it can)."""
    if loaded is None:
        return None
    config = resolve_config(preset, reads_synthetic_data(preset.dataset, data_root), [])
    return family_of(preset).refusal(config, loaded.backbone)


@dataclass
class SuiteClock:
    """The remaining time of `run all` on the embedded data: each task's reference seconds (its
    preset's ``synthetic_seconds``) scaled by this machine's pace so far, the ratio of the seconds
    its finished tasks took to their reference seconds (1 before the first ends). Single-thread
    speed differs up to 3x between 2-core machines (README), so a fixed table would be wrong by
    as much; after one task the estimate is this machine's."""

    reference: dict[str, float | None]  # the tasks to run, in order: their reference seconds
    spent: float = 0.0  # seconds taken by the finished tasks that have a reference
    referenced: float = 0.0  # their reference seconds

    def finished(self, task: str, seconds: float) -> None:
        reference = self.reference.get(task)
        if reference is not None:
            self.spent += seconds
            self.referenced += reference

    def remaining(self, tasks: list[str]) -> float | None:
        """Seconds ``tasks`` will take (None when one has no reference)."""
        seconds = [self.reference.get(t) for t in tasks]
        if any(s is None for s in seconds):
            return None
        pace = self.spent / self.referenced if self.referenced else 1.0
        return pace * sum(seconds)  # type: ignore[arg-type]


def clock_text(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def progress_line(number: int, total: int, task: str, elapsed: float, remaining: float | None) -> str:
    """``[3/15] knn (1:05 so far, about 4 min left)``: the line `run all` prints as a task starts."""
    left = ""
    if remaining is not None:
        left = ", under a minute left" if remaining < 60 else f", about {round(remaining / 60)} min left"
    return f"[{number}/{total}] {task} ({clock_text(elapsed)} so far{left})"


def run_all(request: RunRequest) -> SuiteResult:
    """Run every suite preset with ``request``'s checkpoint and options (its ``task`` ignored)."""
    if request.checkpoint is None:
        raise BadInput("`run all` needs a checkpoint (CKPT)")
    if request.set_options:
        raise BadInput("`run all` takes no --set (settings differ per task): run a task alone to change one")
    extract_options(request)  # a bad --device, --workers or --eval-batch-size: exit 2, not N failed tasks
    # Loaded and hashed once; a wrong checkpoint is one bad input (exit 2), not a failure of
    # every task.
    loaded = load_backbone(
        request.checkpoint, arch=request.arch, branch=request.branch, trust_pickle=request.trust_pickle
    )
    result = SuiteResult()
    data_root = Path(request.data_root) if request.data_root is not None else None
    family = loaded.backbone.family if loaded is not None else "resnet"
    chosen = suite_presets(family)
    reasons = {p.name: missing_data(p, data_root) or unsupported(p, loaded, data_root) for p in chosen}
    to_run = [p for p in chosen if reasons[p.name] is None]
    # Reference seconds are the ResNet-18 main job's on the embedded data: other backbones or
    # real data get the elapsed time alone.
    clock = SuiteClock(
        {
            p.name: p.synthetic_seconds
            if family == "resnet" and reads_synthetic_data(p.dataset, data_root)
            else None
            for p in to_run
        }
    )
    suite_started, started_tasks = time.perf_counter(), 0
    for number, preset in enumerate(chosen, start=1):
        reason = reasons[preset.name]
        if reason is not None:
            result.outcomes.append(TaskOutcome(preset.name, "skipped", reason=reason))
            continue
        still = [p.name for p in to_run[started_tasks:]]
        started_tasks += 1
        elapsed = time.perf_counter() - suite_started
        log(progress_line(number, len(chosen), preset.name, elapsed, clock.remaining(still)))
        started = time.perf_counter()
        try:
            # Each task gets its own copy, as a fresh load would give it: a task may change the
            # network in place (a linear probe freezes it and moves it to channels_last).
            record = run_task(replace(request, task=preset.name), copy.deepcopy(loaded))
        except NpidbenchError as exc:
            outcome = TaskOutcome(preset.name, "failed", reason=" ".join(str(exc).split()))
        except Exception as exc:  # noqa: BLE001 - one task's crash must not lose the others' records
            outcome = TaskOutcome(
                preset.name, "failed", reason=f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            )
        else:
            outcome = TaskOutcome(preset.name, "ran", record=record)
        outcome.seconds = time.perf_counter() - started
        if outcome.status == "ran":  # a task that failed early says nothing of the pace
            clock.finished(preset.name, outcome.seconds)
        result.outcomes.append(outcome)
    return result


def print_summary(result: SuiteResult) -> None:
    """What ran, what was skipped or failed and why, time per task (on stderr)."""
    table = Table(title="npidbench run all", title_justify="left")
    for column in ("task", "status", "time", "record / reason"):
        table.add_column(column)
    for o in result.outcomes:
        detail = o.record.name if o.record is not None else o.reason
        table.add_row(o.task, o.status, f"{o.seconds:.0f} s" if o.status != "skipped" else "-", detail)
    total = sum(o.seconds for o in result.outcomes)
    ran = sum(o.status == "ran" for o in result.outcomes)
    table.caption = f"{ran} ran, {len(result.failed)} failed, {len(result.outcomes) - ran - len(result.failed)} skipped in {total:.0f} s"
    console.print(table)
