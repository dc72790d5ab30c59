"""Dataset adapters. Each benchmark dataset lives at a standard sub-path of a data root
(``--data-root /datasets`` finds ``/datasets/imagenet``); with no root, the embedded synthetic
suite is generated on first use and read through the very same adapters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from npidbench.data.imagenet import load_imagefolder
from npidbench.data.splits import DatasetSplit
from npidbench.data.synthetic import ensure_suite
from npidbench.errors import BadInput


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    subpath: str  # standard sub-path under --data-root
    layout: str
    description: str
    splits: tuple[str, ...]


DATASETS: dict[str, DatasetInfo] = {
    "imagenet": DatasetInfo(
        "imagenet",
        "imagenet",
        "ImageFolder: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG",
        "ImageNet ILSVRC-2012 (1000 classes; synthetic: 10 classes)",
        ("train", "val"),
    ),
}


def dataset_root(name: str, data_root: Path | None) -> tuple[Path, bool]:
    """(root folder of dataset ``name``, whether it is the embedded synthetic data)."""
    info = DATASETS.get(name)
    if info is None:
        raise BadInput(f"unknown dataset {name}; known: {', '.join(DATASETS)}")
    if data_root is None:
        return ensure_suite() / info.subpath, True
    data_root = Path(data_root).expanduser()
    if not data_root.is_dir():
        raise BadInput(f"--data-root {data_root} is not a folder")
    standard = data_root / info.subpath
    if standard.is_dir():
        return standard, False
    if all((data_root / split).is_dir() for split in info.splits):
        return data_root, False  # the user pointed at the dataset folder itself
    raise BadInput(f"{name} not found under --data-root {data_root}: expected {standard} ({info.layout})")


def load_split(name: str, split: str, data_root: Path | None) -> DatasetSplit:
    """One split of a dataset, real (under ``data_root``) or synthetic (``data_root`` None)."""
    root, synthetic = dataset_root(name, data_root)
    return load_imagefolder(root, split, dataset=name, synthetic=synthetic)


__all__ = ["DATASETS", "DatasetInfo", "DatasetSplit", "dataset_root", "load_split"]
