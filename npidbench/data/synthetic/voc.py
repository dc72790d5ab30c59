"""Synthetic Pascal VOC 2007 + 2012 in the devkit layout: JPEGs, XML with difficult and
truncated objects (and person parts), ImageSets lists (per-class 1 / -1 / 0), palette
segmentation masks with void borders, and an SBD-style SegmentationClassAug + train_aug list."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from npidbench.data.synthetic.render import class_styles, encode_jpeg, encode_png, seeded
from npidbench.data.synthetic.scenes import AnnotatedScene, SceneMix, class_mask, multi_object_scene
from npidbench.data.voc import VOC_CLASSES, voc_palette

VOC07, VOC12 = 4, 5  # dataset numbers in the image seeds


@dataclass(frozen=True)
class VocSpec:
    voc07_trainval: int = 2500  # >= 96 positives and >= 1,824 negatives per class (low-shot k = 96)
    voc07_test: int = 1000
    voc12_trainval: int = 1200
    seg_train: int = 300  # VOC2012 segmentation train / val: subsets of VOC2012 trainval
    seg_val: int = 120
    aug_extra: int = 400  # SBD images added to the segmentation train list (train_aug)
    width: int = 96
    height: int = 72
    # One or two large objects (a small one now and then), so that the detection and segmentation
    # profiles learn within a few hundred iterations at this scale and rank checkpoints (dense
    # issue; benchmarks/dense_learnability.py), the classification lists still multi-label.
    scenes: SceneMix = SceneMix(counts=(1, 2), weights=(0.7, 0.3), size=(0.4, 0.7), small_probability=0.05)


def _xml(folder: str, image_id: str, scene: AnnotatedScene, width: int, height: int, segmented: bool) -> str:
    lines = [
        "<annotation>",
        f"\t<folder>{folder}</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        "\t<source>",
        "\t\t<database>npidbench synthetic VOC</database>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        f"\t<segmented>{int(segmented)}</segmented>",
    ]
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        lines += [
            "\t<object>",
            f"\t\t<name>{escape(VOC_CLASSES[obj.label])}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{int(obj.truncated)}</truncated>",
            f"\t\t<difficult>{int(obj.difficult)}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{x0 + 1}</xmin>",
            f"\t\t\t<ymin>{y0 + 1}</ymin>",
            f"\t\t\t<xmax>{x1 + 1}</xmax>",
            f"\t\t\t<ymax>{y1 + 1}</ymax>",
            "\t\t</bndbox>",
        ]
        if VOC_CLASSES[obj.label] == "person":  # VOC's person layout: a <part> the parser must skip
            cx, cy = (x0 + x1) // 2 + 1, y0 + 1
            lines += [
                "\t\t<part>",
                "\t\t\t<name>head</name>",
                "\t\t\t<bndbox>",
                f"\t\t\t\t<xmin>{max(1, cx - 3)}</xmin>",
                f"\t\t\t\t<ymin>{cy}</ymin>",
                f"\t\t\t\t<xmax>{cx + 3}</xmax>",
                f"\t\t\t\t<ymax>{cy + 5}</ymax>",
                "\t\t\t</bndbox>",
                "\t\t</part>",
            ]
        lines.append("\t</object>")
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def _class_labels(scene: AnnotatedScene) -> np.ndarray:
    labels = np.full(len(VOC_CLASSES), -1, dtype=np.int8)
    for obj in scene.objects:
        labels[obj.label] = 1 if not obj.difficult else max(labels[obj.label], 0)
    return labels


def _write_lists(main: Path, splits: dict[str, list[str]], labels: dict[str, np.ndarray]) -> None:
    main.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for c, name in enumerate(VOC_CLASSES):
            # The devkit's format: id, then the label right-aligned in two columns ("000005  1").
            (main / f"{name}_{split}.txt").write_text("".join(f"{i} {labels[i][c]:>2}\n" for i in ids))


def _write_year(
    root: Path,
    year: str,
    dataset: int,
    ids: list[str],
    split_of: dict[str, str],
    spec: VocSpec,
    seed: int,
    styles,
    segmentation: dict[str, str] | None = None,
) -> dict[str, AnnotatedScene]:
    year_dir = root / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations"):
        (year_dir / sub).mkdir(parents=True, exist_ok=True)
    scenes = {}
    for n, image_id in enumerate(ids):
        rng = seeded(seed, dataset, n)
        scene = multi_object_scene(styles, rng, spec.height, spec.width, spec.scenes)
        scenes[image_id] = scene
        (year_dir / "JPEGImages" / f"{image_id}.jpg").write_bytes(encode_jpeg(scene.pixels))
        segmented = segmentation is not None and image_id in segmentation
        (year_dir / "Annotations" / f"{image_id}.xml").write_text(
            _xml(f"VOC{year}", image_id, scene, spec.width, spec.height, segmented)
        )
    by_split: dict[str, list[str]] = {}
    for image_id in ids:
        by_split.setdefault(split_of[image_id], []).append(image_id)
    if "train" in by_split and "val" in by_split:
        by_split["trainval"] = sorted(by_split["train"] + by_split["val"])
    _write_lists(year_dir / "ImageSets" / "Main", by_split, {i: _class_labels(s) for i, s in scenes.items()})
    return scenes


def write_voc(root: Path, spec: VocSpec, seed: int) -> dict[str, dict[str, int]]:
    """Write ``root/VOC2007`` and ``root/VOC2012`` (root plays VOCdevkit). Returns counts."""
    styles = class_styles(len(VOC_CLASSES))
    # VOC2007: trainval (split in train / val halves) and test.
    ids07 = [f"{n:06d}" for n in range(1, spec.voc07_trainval + spec.voc07_test + 1)]
    split07 = {
        i: ("train" if n % 2 == 0 else "val") if n < spec.voc07_trainval else "test"
        for n, i in enumerate(ids07)
    }
    _write_year(root, "2007", VOC07, ids07, split07, spec, seed, styles)

    # VOC2012: detection trainval; segmentation train / val and the SBD-style aug are subsets.
    ids12 = [f"2012_{n:06d}" for n in range(1, spec.voc12_trainval + 1)]
    split12 = {i: "train" if n % 2 == 0 else "val" for n, i in enumerate(ids12)}
    seg_train = [i for i in ids12 if split12[i] == "train"][: spec.seg_train]
    seg_val = [i for i in ids12 if split12[i] == "val"][: spec.seg_val]
    sbd_extra = [i for i in ids12 if split12[i] == "train"][spec.seg_train : spec.seg_train + spec.aug_extra]
    seg_split = {**{i: "train" for i in seg_train}, **{i: "val" for i in seg_val}}
    scenes12 = _write_year(root, "2012", VOC12, ids12, split12, spec, seed, styles, seg_split)
    year_dir = root / "VOC2012"
    segmentation_lists = year_dir / "ImageSets" / "Segmentation"
    segmentation_lists.mkdir(parents=True, exist_ok=True)
    for split, ids in (("train", seg_train), ("val", seg_val), ("trainval", sorted(seg_train + seg_val))):
        (segmentation_lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    train_aug = sorted(seg_train + sbd_extra)
    (segmentation_lists / "train_aug.txt").write_text("".join(f"{i}\n" for i in train_aug))
    palette = voc_palette()
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        (year_dir / folder).mkdir(parents=True, exist_ok=True)
    for image_id in sorted(set(seg_train + seg_val + sbd_extra)):
        target = class_mask(scenes12[image_id])
        if image_id in seg_split:  # the official masks: palette PNGs
            (year_dir / "SegmentationClass" / f"{image_id}.png").write_bytes(encode_png(target, palette))
        # SBD-converted masks are grayscale PNGs of class indices
        (year_dir / "SegmentationClassAug" / f"{image_id}.png").write_bytes(encode_png(target))
    return {
        "voc07": {"trainval": spec.voc07_trainval, "test": spec.voc07_test},
        "voc12": {
            "trainval": len(ids12),
            "seg_train": len(seg_train),
            "seg_val": len(seg_val),
            "train_aug": len(train_aug),
        },
    }
