"""Precomputed features from anywhere (``npidbench run voc-svm --features-dir DIR``).

Users of FAIR's benchmark, VISSL and mmselfsup already have VOC07 features and label arrays:

    DIR/trainval.npy, DIR/test.npy                 (N, D) float, one layer
    DIR/trainval_labels.npy, DIR/test_labels.npy   (N, C) integers
    DIR/layers.json (optional)                     ["Feature1", ...]: then the features are
                                                   DIR/trainval_<layer>.npy, DIR/test_<layer>.npy

Labels default to the convention of those frameworks' arrays (1 present, 0 absent, -1 difficult);
``labels=voc`` reads VOC's own lists (1 present, -1 absent, 0 difficult). Internally everything
is converted to VOC's convention. Every problem is reported naming the file at fault.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from npidbench.errors import BadInput

SINGLE_LAYER = "features"
LabelConvention = Literal["fair", "voc"]  # fair: 1 present / 0 absent / -1 difficult; voc: 1 / -1 / 0
CONVENTIONS: tuple[str, ...] = get_args(LabelConvention)


@dataclass
class FeaturesDir:
    root: Path
    layers: list[str]
    train_labels: np.ndarray  # (N, C) VOC convention
    test_labels: np.ndarray
    sha256: str  # of every file read: the record's identity in place of a checkpoint's
    files: list[str]

    def features(self, split: str, layer: str) -> np.ndarray:
        return _load_features(_feature_path(self.root, split, layer, self.layers))


def _feature_path(root: Path, split: str, layer: str, layers: list[str]) -> Path:
    return root / (f"{split}.npy" if layers == [SINGLE_LAYER] else f"{split}_{layer}.npy")


def _load_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise BadInput(
            f"{path} is missing: a features directory needs trainval/test features and labels (README)"
        )
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BadInput(f"{path} is not a readable .npy array ({exc}); save it with numpy.save") from exc


def _load_features(path: Path) -> np.ndarray:
    array = _load_array(path)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise BadInput(f"{path} must be an (N, D) float array, found shape {array.shape} dtype {array.dtype}")
    for start in range(0, array.shape[0], 4096):  # chunked: features can be large memory maps
        if not np.isfinite(array[start : start + 4096]).all():
            row = start + int(np.flatnonzero(~np.isfinite(array[start : start + 4096]).all(axis=1))[0])
            raise BadInput(f"{path} has NaN or infinite values (first in row {row}); re-extract the features")
    return array


def _read_layers(root: Path) -> list[str]:
    path = root / "layers.json"
    if not path.exists():
        return [SINGLE_LAYER]
    try:
        layers = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path} is not valid JSON ({exc}); write a list of layer names") from exc
    if not isinstance(layers, list) or not layers or not all(isinstance(n, str) and n for n in layers):
        raise BadInput(f'{path} must be a non-empty list of layer names, e.g. ["Feature1", "Feature5"]')
    if len(set(layers)) != len(layers):
        raise BadInput(f"{path} names a layer twice")
    return layers


def _read_labels(path: Path, convention: LabelConvention) -> np.ndarray:
    labels = _load_array(path)
    if labels.ndim != 2 or labels.shape[1] < 1:
        raise BadInput(f"{path} must be an (N, C) label matrix, found shape {labels.shape}")
    values = np.asarray(labels)
    if not np.all(np.isin(values, (-1, 0, 1))):
        bad = np.unique(values[~np.isin(values, (-1, 0, 1))])[:3]
        raise BadInput(f"{path} has values {bad.tolist()}; labels must be 1, 0 or -1")
    values = values.astype(np.int8)
    present = values == 1
    absent_code, difficult_code = (0, -1) if convention == "fair" else (-1, 0)
    absent, difficult = values == absent_code, values == difficult_code
    other = "voc" if convention == "fair" else "fair"
    meaning = (
        "1 present, 0 absent, -1 difficult" if convention == "fair" else "1 present, -1 absent, 0 difficult"
    )
    # Absent is by far the commonest label and difficult the rarest in any real label matrix.
    if not absent.any() or difficult.sum() > absent.sum():
        raise BadInput(
            f"{path} does not look like the {convention} convention ({meaning}): "
            f"{int(absent.sum())} absent vs {int(difficult.sum())} difficult; try --set labels={other}"
        )
    if not present.any():
        raise BadInput(f"{path} has no positive label (1) at all")
    return np.select([present, absent], [1, -1], 0).astype(np.int8)


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def read_features_dir(
    root: str | Path, convention: LabelConvention = "fair", layers: list[str] | None = None
) -> FeaturesDir:
    """Check a features directory completely (shapes, labels, NaN) before any work starts.

    ``layers``: the layers the run needs (default all). Raises BadInput naming the file at fault.
    """
    root = Path(root)
    if convention not in CONVENTIONS:
        raise BadInput(f"labels={convention} is not a label convention; choose fair or voc")
    if not root.is_dir():
        raise BadInput(f"--features-dir {root} is not a folder")
    available = _read_layers(root)
    wanted = available if layers is None else layers
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise BadInput(f"{root} has no layer {unknown[0]}; it has {', '.join(available)} (layers.json)")
    train_labels = _read_labels(root / "trainval_labels.npy", convention)
    test_labels = _read_labels(root / "test_labels.npy", convention)
    if train_labels.shape[1] != test_labels.shape[1]:
        raise BadInput(
            f"{root / 'test_labels.npy'} has {test_labels.shape[1]} classes but "
            f"{root / 'trainval_labels.npy'} has {train_labels.shape[1]}"
        )
    files = [root / "trainval_labels.npy", root / "test_labels.npy"]
    for layer in wanted:
        dims = None
        for split, labels in (("trainval", train_labels), ("test", test_labels)):
            path = _feature_path(root, split, layer, available)
            features = _load_features(path)
            if features.shape[0] != labels.shape[0]:
                raise BadInput(
                    f"{path} has {features.shape[0]} rows but {split}_labels.npy has {labels.shape[0]}: "
                    "rows must be the same images in the same order"
                )
            if dims is not None and features.shape[1] != dims:
                raise BadInput(f"{path} has {features.shape[1]} dims but the trainval features have {dims}")
            dims = features.shape[1]
            files.append(path)
    if (root / "layers.json").exists():
        files.append(root / "layers.json")
    return FeaturesDir(
        root=root,
        layers=wanted,
        train_labels=train_labels,
        test_labels=test_labels,
        sha256=_sha256(files),
        files=[str(f) for f in files],
    )
