"""Small on-disk datasets for tests, and calling the CLI as a user does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from npidbench.cli import main
from npidbench.data.imagenet import load_imagefolder
from npidbench.data.splits import DatasetSplit


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
