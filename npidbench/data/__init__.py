"""Dataset adapters. Each benchmark dataset lives at a standard sub-path of a data root
(``--data-root /datasets`` finds ``/datasets/imagenet``, ``/datasets/VOCdevkit/VOC2007``, ...);
with no root, the embedded synthetic suite is generated on first use and read through the very
same adapters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from npidbench.data.ade20k import load_ade20k
from npidbench.data.cityscapes import load_cityscapes
from npidbench.data.coco import load_coco
from npidbench.data.imagenet import load_imagefolder, load_inat18, load_places205
from npidbench.data.splits import SYNTHETIC_MANIFEST, DatasetSplit, DetectionSplit, SegmentationSplit
from npidbench.data.synthetic import ensure_suite
from npidbench.data.voc import load_classification, load_detection, load_segmentation
from npidbench.errors import BadInput


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    subpath: str  # standard sub-path under --data-root
    layout: str
    description: str
    splits: tuple[str, ...]
    markers: tuple[str, ...]  # what must exist inside the folder for it to be this dataset
    alternatives: tuple[str, ...] = ()  # other sub-paths in common use, tried after ``subpath``


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "imagenet",
            "imagenet",
            "train/<wnid>/*.JPEG, val/<wnid>/*.JPEG",
            "ImageNet ILSVRC-2012 (synthetic: 10 classes)",
            ("train", "val"),
            ("train", "val"),
        ),
        DatasetInfo(
            "places205",
            "places205",
            "images256/<l>/<scene>/*.jpg, trainvalsplit_places205/{train,val}_places205.csv",
            "Places205 scenes (synthetic: 8 classes)",
            ("train", "val"),
            (),
        ),
        DatasetInfo(
            "inat18",
            "inat2018",
            "train2018.json, val2018.json, categories.json, train_val2018/",
            "iNaturalist 2018 species (synthetic: 16, long-tailed)",
            ("train", "val"),
            (),
        ),
        DatasetInfo(
            "voc07",
            "VOCdevkit/VOC2007",
            "JPEGImages/, Annotations/, ImageSets/Main/",
            "Pascal VOC 2007 classification and detection (20 classes)",
            ("trainval", "test"),
            ("ImageSets",),
        ),
        DatasetInfo(
            "voc12",
            "VOCdevkit/VOC2012",
            "JPEGImages/, Annotations/, ImageSets/{Main,Segmentation}/, SegmentationClass/",
            "Pascal VOC 2012 detection and segmentation",
            ("trainval", "train", "val"),
            ("ImageSets",),
        ),
        DatasetInfo(
            "voc12aug",
            "VOCdevkit/VOC2012",
            "VOC2012 + SegmentationClassAug/ and ImageSets/Segmentation/train_aug.txt (SBD)",
            "Pascal VOC 2012 + SBD aug segmentation (21 classes)",
            ("train_aug", "val"),
            ("ImageSets",),
        ),
        DatasetInfo(
            "coco",
            "coco",
            "annotations/instances_{train,val}2017.json, {train,val}2017/*.jpg",
            "COCO 2017 instances (synthetic: the 20 VOC categories)",
            ("train2017", "val2017"),
            ("annotations",),
        ),
        DatasetInfo(
            "cityscapes",
            "cityscapes",
            "leftImg8bit/{train,val}/<city>/, gtFine/{train,val}/<city>/ (labelTrainIds or labelIds)",
            "Cityscapes gtFine semantic segmentation (19 classes)",
            ("train", "val"),
            ("leftImg8bit", "gtFine"),
        ),
        DatasetInfo(
            "ade20k",
            "ADEChallengeData2016",
            "images/{training,validation}/*.jpg, annotations/{training,validation}/*.png (0 = other)",
            "ADE20K SceneParsing semantic segmentation (150 classes; synthetic: 15 of them)",
            ("training", "validation"),
            ("images", "annotations"),
            # mmseg's configs/_base_/datasets/ade20k.py: data_root = 'data/ade/ADEChallengeData2016'
            ("ade20k/ADEChallengeData2016", "ade/ADEChallengeData2016"),
        ),
    )
}


# Datasets a preset's dataset name stands for (VOC07+12 detection trains on VOC2012 too).
_DATASET_PARTS = {"voc0712": ("voc07", "voc12")}


def dataset_parts(name: str) -> tuple[str, ...]:
    """The datasets (keys of DATASETS) that a preset's ``dataset`` reads."""
    return _DATASET_PARTS.get(name, (name,))


def reads_synthetic_data(dataset: str, data_root: Path | None) -> bool:
    """Whether a run of ``dataset`` under ``data_root`` reads the synthetic suite: with no root
    (the embedded suite), or a root written by ``npidbench data synth``. Missing data: False (the
    task reports it)."""
    if data_root is None:
        return True
    try:
        return all(dataset_root(part, data_root)[1] for part in dataset_parts(dataset))
    except BadInput:
        return False


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
    for folder in (standard, *(data_root / alt for alt in info.alternatives)):
        if folder.is_dir():
            return folder, is_synthetic(folder)
    if info.markers and all((data_root / m).exists() for m in info.markers):
        return data_root, is_synthetic(data_root)  # the user pointed at the dataset folder itself
    raise BadInput(f"{name} not found under --data-root {data_root}: expected {standard} ({info.layout})")


def is_synthetic(folder: Path) -> bool:
    """A folder written by the synthetic generator (``npidbench data synth``) says so."""
    return any((f / SYNTHETIC_MANIFEST).exists() for f in (folder, folder.parent))


def load_split(name: str, split: str, data_root: Path | None) -> DatasetSplit:
    """One split of a classification dataset, real (under ``data_root``) or synthetic (None)."""
    root, synthetic = dataset_root(name, data_root)
    if name == "imagenet":
        return load_imagefolder(root, split, dataset=name, synthetic=synthetic)
    if name == "places205":
        return load_places205(root, split, synthetic)
    if name == "inat18":
        return load_inat18(root, split, synthetic)
    if name == "voc07":
        return load_classification(root, split, "2007", synthetic)
    raise BadInput(f"{name} is not a classification dataset")


def load_detection_split(name: str, split: str, data_root: Path | None) -> DetectionSplit:
    """``voc0712`` (VOC07 + VOC12 trainval), ``voc07`` (test) or ``coco`` splits."""
    if name == "coco":
        root, synthetic = dataset_root("coco", data_root)
        return load_coco(root, split, synthetic)
    if name == "voc07":
        root, synthetic = dataset_root("voc07", data_root)
        return load_detection([(root, "2007", split)], synthetic)
    if name == "voc0712":
        root07, synthetic = dataset_root("voc07", data_root)
        root12, _ = dataset_root("voc12", data_root)
        return load_detection([(root07, "2007", split), (root12, "2012", split)], synthetic)
    raise BadInput(f"{name} is not a detection dataset")


def load_segmentation_split(name: str, split: str, data_root: Path | None) -> SegmentationSplit:
    """``voc12``, ``voc12aug``, ``cityscapes`` or ``ade20k`` segmentation pairs."""
    root, synthetic = dataset_root(name, data_root)
    if name in ("voc12", "voc12aug"):
        return load_segmentation(root, split, aug=name == "voc12aug", synthetic=synthetic)
    if name == "cityscapes":
        return load_cityscapes(root, split, synthetic)
    if name == "ade20k":
        return load_ade20k(root, split, synthetic)
    raise BadInput(f"{name} is not a segmentation dataset")


__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetSplit",
    "DetectionSplit",
    "SegmentationSplit",
    "dataset_parts",
    "dataset_root",
    "load_detection_split",
    "load_segmentation_split",
    "load_split",
    "reads_synthetic_data",
]
