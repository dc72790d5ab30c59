"""Progress bars and log lines, on stderr so that stdout stays machine-readable."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True, highlight=False)


class RateColumn(ProgressColumn):
    """Items per second (images/s during extraction)."""

    def __init__(self, unit: str = "img") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


def make_progress(unit: str = "img") -> Progress:
    """A progress bar with count, rate, elapsed time and ETA (quiet with NPIDBENCH_QUIET=1)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=os.environ.get("NPIDBENCH_QUIET") == "1",
    )


def log(message: str) -> None:
    """One informational line on stderr."""
    if os.environ.get("NPIDBENCH_QUIET") != "1":
        console.print(message)
