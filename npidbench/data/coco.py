"""COCO 2017 instances: boxes, polygons / RLE masks, crowd flags, contiguous category indices.

Layout: ``coco/annotations/instances_{train,val}2017.json`` and ``coco/{train,val}2017/*.jpg``.
The index is built by pycocotools (through torchvision's CocoDetection); category ids
(1..90 with gaps) are mapped to contiguous indices in id order.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from torchvision.datasets import CocoDetection

from npidbench.data.splits import DetectionImage, DetectionSplit
from npidbench.errors import BadInput


def load_coco(root: Path, split: str = "val2017", synthetic: bool = False) -> DetectionSplit:
    """Index a COCO instances split (no image is read)."""
    annotations = root / "annotations" / f"instances_{split}.json"
    images_dir = root / split
    if not annotations.exists():
        raise BadInput(f"{annotations} not found: expected COCO as coco/annotations/instances_{split}.json")
    if not images_dir.is_dir():
        raise BadInput(f"{images_dir} not found: expected the {split} images beside annotations/")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
            dataset = CocoDetection(str(images_dir), str(annotations))
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise BadInput(f"{annotations} is not a COCO instances file ({exc})") from exc
    coco = dataset.coco
    category_ids = sorted(coco.getCatIds())
    contiguous = {cat: i for i, cat in enumerate(category_ids)}
    names = [coco.cats[cat]["name"] for cat in category_ids]
    images = []
    for image_id in dataset.ids:
        info = coco.imgs[image_id]
        anns = [a for a in coco.imgToAnns.get(image_id, []) if a["category_id"] in contiguous]
        boxes = np.array(
            [
                [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                for a in anns
            ],
            dtype=np.float32,
        ).reshape(-1, 4)
        images.append(
            DetectionImage(
                path=str(images_dir / info["file_name"]),
                width=int(info["width"]),
                height=int(info["height"]),
                boxes=boxes,
                labels=np.array([contiguous[a["category_id"]] for a in anns], dtype=np.int64),
                difficult=np.zeros(len(anns), dtype=bool),
                crowd=np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
                image_id=image_id,
                segmentations=[a.get("segmentation") for a in anns],
            )
        )
    return DetectionSplit("coco", split, root, images, names, synthetic, category_ids)


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """One object's mask (H, W) uint8 from COCO polygons, uncompressed RLE or compressed RLE."""
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = segmentation
    else:
        raise BadInput(f"unsupported COCO segmentation of type {type(segmentation).__name__}")
    return mask_utils.decode(rle)
