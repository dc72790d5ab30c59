"""Small on-disk datasets for tests, and calling the CLI as a user does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from npidbench.cli import main
from npidbench.data.imagenet import load_imagefolder
from npidbench.data.splits import DatasetSplit
from npidbench.runner import RunRequest, run_task
from npidbench.training import loop

# PROTOCOLS.md "Multi-layer features": the flattened pooled sizes of a ResNet-50's layers.
RESNET50_DIMS = {
    "Feature1": 9216,
    "Feature2": 9216,
    "Feature3": 8192,
    "Feature4": 9216,
    "Feature5": 8192,
    "AvgPool": 2048,
}


def tiny_imagefolder(
    root: Path, classes: int = 3, per_class: int = 8, size: int = 40, split: str = "train", seed: int = 0
) -> DatasetSplit:
    """``root/split/c<k>/<i>.jpg``: class-coloured noise images, read back as a DatasetSplit."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / split / f"c{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (size, size + 6, 3), dtype=np.uint8)
            pixels[..., c % 3] += 150
            Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return load_imagefolder(root, split, dataset="imagenet")


def cli(*args: str) -> int:
    """Run ``npidbench ARGS`` in-process; returns the exit code."""
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def one_error_line(err: str) -> str:
    """The single ``error: ...`` line a bad input must produce (no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def run_preset(task: str, checkpoint: Path, tmp_path: Path, options: list[str]) -> dict:
    """Run a preset in this process; its record."""
    path = run_task(
        RunRequest(
            task=task,
            checkpoint=checkpoint,
            set_options=options,
            results=tmp_path / "r",
            cache=tmp_path / "c",
        )
    )
    return json.loads(Path(path).read_text())


def interrupt_after_first_window(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Ctrl-C right after the first window's resume state is saved; the windows saved, in order."""
    real_save, saves = loop.ResumeState.save, []

    def killed_after_first_window(self, state):
        real_save(self, state)
        saves.append(state["epoch"])
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.ResumeState, "save", killed_after_first_window)
    return saves


def interrupt_extraction_at_third_write(monkeypatch):
    """Make the feature cache commit after every batch and the third batch's write raise
    KeyboardInterrupt, as a user's Ctrl-C mid-extraction would. Returns the undo."""
    from npidbench import cache as cache_module
    from npidbench.cache import ExtractionJob

    monkeypatch.setattr(cache_module, "COMMIT_EVERY_S", 0.0)
    original, calls = ExtractionJob.write, {"n": 0}

    def crash_on_third_batch(self, rows, features, labels):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(self, rows, features, labels)

    monkeypatch.setattr(ExtractionJob, "write", crash_on_third_batch)
    return lambda: monkeypatch.setattr(ExtractionJob, "write", original)


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the scripts are not a package; they import each other
    by name, so their folder goes on sys.path)."""
    import importlib.util
    import sys

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
