"""Small on-disk datasets for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

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
