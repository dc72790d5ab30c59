"""``npidbench data check``: counts per split and the first problem, without loading the data.

Every listed file's existence is checked (on very large sets, a deterministic sample: ImageNet
must finish in seconds), a sample of images (and masks) per split is decoded, masks are compared
with their images' sizes. The first problem raises BadInput naming the file and the layout.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from npidbench.data import DATASETS, is_synthetic
from npidbench.data.ade20k import ADE20K_CLASSES, load_ade20k
from npidbench.data.cityscapes import load_cityscapes
from npidbench.data.coco import decode_segmentation, load_coco
from npidbench.data.imagenet import load_imagefolder, load_inat18, load_places205
from npidbench.data.images import decode_rgb
from npidbench.data.splits import DatasetSplit, DetectionSplit, SegmentationSplit
from npidbench.data.voc import (
    find_aug_list,
    find_year_dir,
    load_classification,
    load_detection,
    load_segmentation,
    read_voc_mask,
)
from npidbench.errors import BadInput

EXISTENCE_LIMIT = 200_000  # above this many files, check a deterministic sample of them
DECODE_SAMPLE = 8


@dataclass
class CheckReport:
    dataset: str
    root: str
    synthetic: bool
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def resolve_root(name: str, root: Path) -> Path:
    """``--root`` may be the dataset folder or a data root holding its standard sub-path."""
    info = DATASETS[name]
    if not root.is_dir():
        raise BadInput(f"--root {root} is not a folder")
    standard = root / info.subpath
    for folder in (standard, *(root / alt for alt in info.alternatives)):
        if folder.is_dir():
            return folder
    if name.startswith("voc"):
        return find_year_dir(root, "2007" if name == "voc07" else "2012")
    missing = [m for m in info.markers if not (root / m).exists()]
    if missing:
        raise BadInput(f"{root / missing[0]} not found: expected {name} as {info.layout}")
    return root


def check_dataset(name: str, root: Path) -> CheckReport:
    """Check one dataset under ``root``; raises BadInput at the first problem."""
    if name not in DATASETS:
        raise BadInput(f"unknown dataset {name}; choose one of {', '.join(DATASETS)}")
    root = resolve_root(name, Path(root))
    report = CheckReport(name, str(root), is_synthetic(root))
    checker = {
        "imagenet": _check_imagenet,
        "places205": _check_list_dataset,
        "inat18": _check_list_dataset,
        "voc07": _check_voc07,
        "voc12": _check_voc12,
        "voc12aug": _check_voc12aug,
        "coco": _check_coco,
        "cityscapes": _check_cityscapes,
        "ade20k": _check_ade20k,
    }[name]
    checker(name, root, report)
    if not report.splits:
        expected = ", ".join(DATASETS[name].splits)
        raise BadInput(f"no split of {name} found in {root}: expected {expected} ({DATASETS[name].layout})")
    return report


def _sample(items: list, count: int) -> list:
    if len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def _files_exist(paths: list[str], what: str, layout: str, report: CheckReport) -> None:
    chosen = paths if len(paths) <= EXISTENCE_LIMIT else _sample(paths, 5_000)
    if len(chosen) < len(paths):
        report.notes.append(
            f"{what}: existence checked on a sample of {len(chosen):,} of {len(paths):,} files"
        )
    for path in chosen:
        if not os.path.exists(path):
            raise BadInput(f"{path} is missing ({what}; expected {layout})")


def _decode_sample(paths: list[str], what: str) -> None:
    for path in _sample(paths, DECODE_SAMPLE):
        try:
            decode_rgb(path)
        except (RuntimeError, OSError, ValueError) as exc:
            reason = str(exc).split(",")[-1].strip() or type(exc).__name__
            raise BadInput(f"{path} is unreadable ({reason}; {what})") from exc


def _classification(report: CheckReport, split: DatasetSplit, layout: str) -> None:
    paths = [path for path, _ in split.samples]
    _files_exist(paths, f"{report.dataset} {split.split}", layout, report)
    _decode_sample(paths, f"{report.dataset} {split.split}")
    counts = {"images": len(split), "classes": len(split.classes)}
    if split.label_matrix is not None:
        counts["positives"] = int((split.label_matrix == 1).sum())
        counts["difficult_only"] = int((split.label_matrix == 0).sum())
    report.splits[split.split] = counts


def _check_imagenet(name: str, root: Path, report: CheckReport) -> None:
    for split in DATASETS[name].splits:
        if not (root / split).exists():
            raise BadInput(f"{root / split} not found: expected ImageNet as {DATASETS[name].layout}")
        _classification(
            report, load_imagefolder(root, split, synthetic=report.synthetic), DATASETS[name].layout
        )
    if report.splits["train"]["classes"] != report.splits["val"]["classes"]:
        raise BadInput(f"{root}/train and {root}/val have different numbers of class folders")


def _check_list_dataset(name: str, root: Path, report: CheckReport) -> None:
    loader = load_places205 if name == "places205" else load_inat18
    for split in DATASETS[name].splits:
        _classification(report, loader(root, split, report.synthetic), DATASETS[name].layout)


def _check_voc07(name: str, root: Path, report: CheckReport) -> None:
    layout = DATASETS[name].layout
    for split in DATASETS[name].splits:
        if not (root / "ImageSets" / "Main" / f"{split}.txt").exists():
            report.absent.append(split)
            continue
        classification = load_classification(root, split, "2007", report.synthetic)
        _classification(report, classification, layout)
        report.notes.append(f"{split} labels from {classification.label_source}")
        if (root / "Annotations").is_dir():
            _detection_counts(
                report, load_detection([(root, "2007", split)], report.synthetic), split, layout
            )


def _detection_counts(report: CheckReport, detection: DetectionSplit, split: str, layout: str) -> None:
    counts = report.splits.setdefault(split, {})
    counts["images"] = len(detection)
    counts["objects"] = detection.objects
    counts["difficult"] = int(sum(image.difficult.sum() for image in detection.images))
    if any(image.crowd.any() for image in detection.images):
        counts["crowd"] = int(sum(image.crowd.sum() for image in detection.images))
    counts["classes"] = len(detection.classes)


def _check_voc12(name: str, root: Path, report: CheckReport) -> None:
    layout = DATASETS[name].layout
    if (root / "ImageSets" / "Main" / "trainval.txt").exists():
        detection = load_detection([(root, "2012", "trainval")], report.synthetic)
        paths = [image.path for image in detection.images]
        _files_exist(paths, "voc12 trainval", layout, report)
        _decode_sample(paths, "voc12 trainval")
        _detection_counts(report, detection, "trainval", layout)
    else:
        report.absent.append("trainval")
    for split in ("train", "val"):
        if (root / "ImageSets" / "Segmentation" / f"{split}.txt").exists():
            _segmentation(
                report, load_segmentation(root, split, aug=False, synthetic=report.synthetic), layout
            )
        else:
            report.absent.append(f"segmentation {split}")


def _check_voc12aug(name: str, root: Path, report: CheckReport) -> None:
    layout = DATASETS[name].layout
    find_aug_list(root)  # names the expected list files when absent
    for split in ("train_aug", "val"):
        _segmentation(report, load_segmentation(root, split, aug=True, synthetic=report.synthetic), layout)


def _segmentation(report: CheckReport, split: SegmentationSplit, layout: str) -> None:
    images = [image for image, _ in split.pairs]
    masks = [mask for _, mask in split.pairs]
    _files_exist(images, f"{split.dataset} {split.split} images", layout, report)
    _files_exist(masks, f"{split.dataset} {split.split} masks", layout, report)
    _decode_sample(images, f"{split.dataset} {split.split}")
    values: set[int] = set()
    for image, mask in _sample(split.pairs, DECODE_SAMPLE):
        target = _read_mask(split, mask)
        _same_size(target, mask, image)
        values |= set(np.unique(target).tolist())
    bad = sorted(v for v in values if v != split.ignore_index and v >= len(split.classes))
    if bad:
        raise BadInput(
            f"{split.dataset} {split.split} masks hold values {bad} beyond the {len(split.classes)} classes"
        )
    report.splits[split.split] = {"images": len(split), "masks": len(split), "classes": len(split.classes)}
    if split.mask_kind:
        report.notes.append(
            f"{split.split} masks: {split.mask_kind}"
            + (" (mapped to trainIds by the official table)" if split.label_map is not None else "")
        )


def _same_size(target: np.ndarray, mask: str, image: str) -> None:
    with Image.open(image) as picture:
        size = picture.size
    if (target.shape[1], target.shape[0]) != size:
        raise BadInput(
            f"{mask} is {target.shape[1]}x{target.shape[0]} but its image {image} is {size[0]}x{size[1]}"
        )


def _read_mask(split: SegmentationSplit, path: str) -> np.ndarray:
    if split.dataset.startswith("voc"):
        return read_voc_mask(path)
    with Image.open(path) as image:
        raw = np.array(image)
    return split.label_map[raw] if split.label_map is not None else raw


def _check_coco(name: str, root: Path, report: CheckReport) -> None:
    layout = DATASETS[name].layout
    for split in DATASETS[name].splits:
        if not (root / "annotations" / f"instances_{split}.json").exists():
            report.absent.append(split)
            continue
        detection = load_coco(root, split, report.synthetic)
        paths = [image.path for image in detection.images]
        _files_exist(paths, f"coco {split}", layout, report)
        _decode_sample(paths, f"coco {split}")
        for image in _sample(detection.images, DECODE_SAMPLE):
            for segmentation in image.segmentations or []:
                if segmentation:
                    decode_segmentation(segmentation, image.height, image.width)
        _detection_counts(report, detection, split, layout)
        report.splits[split]["masks"] = sum(
            1 for image in detection.images for s in image.segmentations or [] if s
        )


def _check_cityscapes(name: str, root: Path, report: CheckReport) -> None:
    for split in DATASETS[name].splits:
        if not (root / "leftImg8bit" / split).is_dir():
            report.absent.append(split)
            continue
        _segmentation(report, load_cityscapes(root, split, report.synthetic), DATASETS[name].layout)


def _check_ade20k(name: str, root: Path, report: CheckReport) -> None:
    layout = DATASETS[name].layout
    for split_name in DATASETS[name].splits:
        if not (root / "images" / split_name).is_dir():
            report.absent.append(split_name)
            continue
        split = load_ade20k(root, split_name, report.synthetic)
        images = [image for image, _ in split.pairs]
        _files_exist(images, f"ade20k {split_name} images", layout, report)
        _decode_sample(images, f"ade20k {split_name}")
        # Raw values, before reduce_zero_label: its lookup would silently turn 151..254 into ignore.
        values: set[int] = set()
        for image, mask in _sample(split.pairs, DECODE_SAMPLE):
            try:
                with Image.open(mask) as picture:
                    raw = np.array(picture)
            except (OSError, ValueError) as exc:
                raise BadInput(f"{mask} is unreadable ({exc}; ade20k {split_name} annotations)") from exc
            if raw.ndim != 2:
                raise BadInput(
                    f"{mask} has shape {raw.shape}: expected single-channel class ids 0..150 "
                    "(ADEChallengeData2016 annotations, not the full ADE20K colour-coded *_seg.png)"
                )
            _same_size(raw, mask, image)
            bad = sorted(int(v) for v in np.unique(raw) if not 0 <= v <= len(ADE20K_CLASSES))
            if bad:
                raise BadInput(
                    f"{mask} holds values {bad} outside 0..{len(ADE20K_CLASSES)} "
                    "(ADE20K masks: 0 = other, 1..150 the classes)"
                )
            values |= set(np.unique(raw).tolist())
        report.splits[split_name] = {"images": len(split), "masks": len(split), "classes": len(split.classes)}
        present = sorted(v for v in values if v > 0)
        report.notes.append(
            f"{split_name} masks: 0 = other -> ignore 255, 1..150 -> 0..149 (mmseg reduce_zero_label); "
            f"{len(present)} classes seen in {min(DECODE_SAMPLE, len(split))} decoded masks"
        )


def format_report(report: CheckReport) -> str:
    """A small table for the terminal."""
    columns = ["images", "classes", "objects", "difficult", "crowd", "masks", "positives"]
    used = [c for c in columns if any(c in counts for counts in report.splits.values())]
    header = f"{report.dataset}{' (synthetic)' if report.synthetic else ''} at {report.root}"
    lines = [header, "  " + "split".ljust(12) + "".join(c.rjust(11) for c in used)]
    for split, counts in report.splits.items():
        cells = "".join((f"{counts[c]:,}" if c in counts else "-").rjust(11) for c in used)
        lines.append("  " + split.ljust(12) + cells)
    if report.absent:
        lines.append(f"  absent: {', '.join(report.absent)}")
    lines.extend(f"  note: {note}" for note in report.notes)
    lines.append("  ok: every listed file present, a sample decoded")
    return "\n".join(lines)
