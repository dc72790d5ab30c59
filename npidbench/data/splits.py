"""The shapes every dataset adapter returns: classification, detection and segmentation splits."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SYNTHETIC_MANIFEST = "npidbench-synthetic.json"


def lazy_fingerprint(root: Path, paths: list[tuple[str, object]], extra: bytes = b"") -> Callable[[], str]:
    """A deferred content identity for the feature cache (computed only when features are
    cached, not when a split is merely listed or checked).

    The synthetic generator writes a manifest with a content hash; for real data, every file's
    relative path, label, size and modification time count (a replaced or re-encoded image
    changes it; a full content hash of ImageNet would take longer than the extraction it guards).
    """

    def compute() -> str:
        digest = hashlib.sha256(extra)
        manifest = _find_manifest(root)
        if manifest is not None:
            digest.update(manifest.read_bytes())
        for path, label in paths:
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, root)}\t{label}\t{stat.st_size}".encode())
            if manifest is None:
                digest.update(f"\t{stat.st_mtime_ns}".encode())
        return digest.hexdigest()

    return compute


def _find_manifest(root: Path) -> Path | None:
    for folder in (root, root.parent, root.parent.parent):
        if (folder / SYNTHETIC_MANIFEST).exists():
            return folder / SYNTHETIC_MANIFEST
    return None


@dataclass
class DatasetSplit:
    """Image files with integer labels (and, for multi-label data, a label matrix)."""

    dataset: str  # imagenet, places205, inat18, voc07, ...
    split: str  # train, val, trainval, test, ...
    root: Path
    samples: list[tuple[str, int]]
    classes: list[str]
    synthetic: bool
    fingerprint_fn: Callable[[], str] = field(repr=False, compare=False)
    label_matrix: np.ndarray | None = None  # (N, C) for multi-label sets (VOC: 1 / -1 / 0)
    label_source: str = ""

    def __len__(self) -> int:
        return len(self.samples)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Content identity: a changed dataset never reuses cached features."""
        return self.fingerprint_fn()

    @property
    def display_name(self) -> str:
        """How records and tables name it: synthetic data says so (datasets issue)."""
        return f"{self.dataset} (synthetic)" if self.synthetic else self.dataset

    def subset(self, indices: list[int], split: str) -> DatasetSplit:
        """The same dataset restricted to ``indices`` (e.g. a 1% label split)."""
        samples = [self.samples[i] for i in indices]
        matrix = None if self.label_matrix is None else self.label_matrix[indices]
        return DatasetSplit(
            self.dataset,
            split,
            self.root,
            samples,
            self.classes,
            self.synthetic,
            lazy_fingerprint(self.root, samples),
            matrix,
            self.label_source,
        )


@dataclass
class DetectionImage:
    """One image's boxes (x0, y0, x1, y1 in pixels), contiguous labels and flags."""

    path: str
    width: int
    height: int
    boxes: np.ndarray  # (K, 4) float32
    labels: np.ndarray  # (K,) int64, index into the split's classes
    difficult: np.ndarray  # (K,) bool (VOC)
    crowd: np.ndarray  # (K,) bool (COCO iscrowd)
    image_id: str | int = ""
    segmentations: list | None = None  # COCO polygons / RLE per object, decoded on demand


@dataclass
class DetectionSplit:
    dataset: str
    split: str
    root: Path
    images: list[DetectionImage]
    classes: list[str]
    synthetic: bool
    category_ids: list[int] = field(default_factory=list)  # COCO: contiguous index -> category id

    def __len__(self) -> int:
        return len(self.images)

    @property
    def objects(self) -> int:
        return int(sum(len(image.labels) for image in self.images))


@dataclass
class SegmentationSplit:
    """(image, mask) file pairs; ``label_map`` maps mask values to train ids (Cityscapes)."""

    dataset: str
    split: str
    root: Path
    pairs: list[tuple[str, str]]
    classes: list[str]
    ignore_index: int
    synthetic: bool
    label_map: np.ndarray | None = None  # (256,) uint8 lookup applied to raw mask values
    mask_kind: str = ""

    def __len__(self) -> int:
        return len(self.pairs)
