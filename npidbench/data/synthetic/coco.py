"""Synthetic COCO 2017 instances: polygons traced from the visible masks (several per object
when an occluder splits it), crowd groups as uncompressed RLE, COCO's own non-contiguous
category ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import contourpy
import numpy as np
from pycocotools import mask as mask_utils

from npidbench.data.synthetic.render import class_styles, encode_jpeg, random_instance, render, seeded
from npidbench.data.synthetic.scenes import SceneMix, multi_object_scene
from npidbench.data.voc import VOC_CLASSES

COCO = 6  # dataset number in the image seeds
# The 20 VOC categories under their COCO names and ids (the same synthetic object styles).
COCO_CATEGORIES = (
    (5, "airplane", "vehicle"),
    (2, "bicycle", "vehicle"),
    (16, "bird", "animal"),
    (9, "boat", "vehicle"),
    (44, "bottle", "kitchen"),
    (6, "bus", "vehicle"),
    (3, "car", "vehicle"),
    (17, "cat", "animal"),
    (62, "chair", "furniture"),
    (21, "cow", "animal"),
    (67, "dining table", "furniture"),
    (18, "dog", "animal"),
    (19, "horse", "animal"),
    (4, "motorcycle", "vehicle"),
    (1, "person", "person"),
    (64, "potted plant", "furniture"),
    (20, "sheep", "animal"),
    (63, "couch", "furniture"),
    (7, "train", "vehicle"),
    (72, "tv", "electronic"),
)


@dataclass(frozen=True)
class CocoSpec:
    train: int = 600
    val: int = 150
    width: int = 112
    height: int = 84
    crowd_probability: float = 0.15
    # Objects of the first ``categories`` class styles only (the synthetic ImageNet's ten, so that
    # pretraining on it transfers as ImageNet pretraining does to COCO, and 600 images cover each
    # often), one to three large ones, so that the detection profile learns within a few hundred
    # iterations and ranks checkpoints (dense issue; benchmarks/dense_learnability.py). The
    # annotation files list all 20 categories.
    categories: int = 10
    scenes: SceneMix = SceneMix(counts=(1, 2, 3), weights=(0.5, 0.35, 0.15), size=(0.35, 0.65), small_probability=0.05)


def mask_polygons(mask: np.ndarray, min_area: float = 2.0) -> list[list[float]]:
    """Outer outlines of a binary mask as COCO polygons [x0, y0, x1, y1, ...] in pixel
    coordinates (contourpy traces the 0.5 level around pixel centres)."""
    padded = np.pad(mask.astype(np.float64), 1)
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(0.5)
    polygons = []
    for line in lines:
        xy = np.asarray(line)[:-1] - 1.0  # drop the closing point, undo the padding
        if len(xy) < 3:
            continue
        x, y = xy[:, 0], xy[:, 1]
        area = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
        if area < min_area or _is_hole(xy):
            continue
        polygons.append([round(float(v), 2) for v in xy.reshape(-1)])
    return polygons


def _is_hole(xy: np.ndarray) -> bool:
    """contourpy orients every line with the mask on the same side, so outlines of holes (a
    ring's inside) wind the other way round than outer outlines: COCO polygons have no holes."""
    x, y = xy[:, 0], xy[:, 1]
    return float(np.sum((np.roll(x, -1) - x) * (np.roll(y, -1) + y))) > 0


def _polygon_box(polygons: list[list[float]]) -> list[float]:
    xs = [v for p in polygons for v in p[0::2]]
    ys = [v for p in polygons for v in p[1::2]]
    return [round(min(xs), 2), round(min(ys), 2), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]


def _crowd(styles, rng: np.random.Generator, height: int, width: int, ids: np.ndarray, pixels: np.ndarray):
    """A tight group of 4-6 small objects of one class, annotated once as a crowd region."""
    style = styles[int(rng.integers(len(styles)))]
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    members = []
    for _ in range(int(rng.integers(4, 7))):
        inst = random_instance(style, rng, height, width, (0.1, 0.16))
        inst.cx = float(np.clip(cx + rng.normal(0, 0.08 * width), 0, width - 1))
        inst.cy = float(np.clip(cy + rng.normal(0, 0.08 * height), 0, height - 1))
        members.append(inst)
    group = render(members, height, width, rng, occlusion=0.0)
    union = group.ids > 0
    pixels[union] = group.pixels[union]
    ids[union] = 0
    return style.index, union


def write_coco(root: Path, spec: CocoSpec, seed: int) -> dict[str, int]:
    """``root/{train,val}2017/<12-digit id>.jpg`` and ``root/annotations/instances_{split}2017.json``."""
    styles = class_styles(len(VOC_CLASSES))[: spec.categories]
    categories = [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup in COCO_CATEGORIES]
    counts = {}
    annotation_id = 0
    for split_index, (split, count) in enumerate((("train2017", spec.train), ("val2017", spec.val))):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for n in range(count):
            image_id = 1_000_000 * (split_index + 1) + n + 1
            rng = seeded(seed, COCO, split_index, n)
            scene = multi_object_scene(styles, rng, spec.height, spec.width, spec.scenes)
            pixels = scene.pixels.copy()
            crowd = None
            if rng.random() < spec.crowd_probability:
                occupied = np.zeros(pixels.shape[:2], dtype=np.int32)
                crowd = _crowd(styles, rng, spec.height, spec.width, occupied, pixels)
            file_name = f"{image_id:012d}.jpg"
            (folder / file_name).write_bytes(encode_jpeg(pixels))
            images.append(
                {"id": image_id, "file_name": file_name, "width": spec.width, "height": spec.height}
            )
            for obj in scene.objects:
                visible = obj.mask & ~(crowd[1] if crowd else False)
                polygons = mask_polygons(visible)
                if not polygons:
                    continue
                annotation_id += 1
                area = float(
                    mask_utils.area(
                        mask_utils.merge(mask_utils.frPyObjects(polygons, spec.height, spec.width))
                    )
                )
                annotations.append(
                    {
                        "id": annotation_id,
                        "image_id": image_id,
                        "category_id": COCO_CATEGORIES[obj.label][0],
                        "segmentation": polygons,
                        "area": round(area, 2),
                        "bbox": _polygon_box(polygons),
                        "iscrowd": 0,
                    }
                )
            if crowd is not None:
                label, union = crowd
                rle = _uncompressed_rle(union)
                ys, xs = np.nonzero(union)
                annotation_id += 1
                annotations.append(
                    {
                        "id": annotation_id,
                        "image_id": image_id,
                        "category_id": COCO_CATEGORIES[label][0],
                        "segmentation": rle,
                        "area": float(union.sum()),
                        "bbox": [
                            float(xs.min()),
                            float(ys.min()),
                            float(xs.max() - xs.min() + 1),
                            float(ys.max() - ys.min() + 1),
                        ],
                        "iscrowd": 1,
                    }
                )
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        payload = {
            "info": {"description": "npidbench synthetic COCO", "year": 2017},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload, sort_keys=True))
        counts[split] = len(images)
    return counts


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO crowd regions use uncompressed RLE: run lengths in column-major order, zeros first."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0, *runs]
    return {"counts": [int(r) for r in runs], "size": [int(mask.shape[0]), int(mask.shape[1])]}
