"""Cityscapes gtFine semantic segmentation (19 train classes, 255 = ignore).

Layout: ``cityscapes/leftImg8bit/{split}/<city>/<name>_leftImg8bit.png`` and
``cityscapes/gtFine/{split}/<city>/<name>_gtFine_labelTrainIds.png``. When only the raw
``_gtFine_labelIds.png`` exist (labelTrainIds are made by the cityscapesScripts converter), they
are mapped through the official label table, which torchvision's Cityscapes class carries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torchvision.datasets import Cityscapes

from npidbench.data.splits import SegmentationSplit
from npidbench.errors import BadInput

IGNORE = 255
TRAIN_CLASSES = [
    c.name for c in sorted(Cityscapes.classes, key=lambda c: c.train_id) if 0 <= c.train_id < 255
]


def label_id_to_train_id() -> np.ndarray:
    """(256,) lookup: labelIds -> trainIds by the official table; unlisted and -1 -> 255."""
    table = np.full(256, IGNORE, dtype=np.uint8)
    for cls in Cityscapes.classes:
        if 0 <= cls.id < 256:
            table[cls.id] = cls.train_id if 0 <= cls.train_id < 255 else IGNORE
    return table


def load_cityscapes(root: Path, split: str, synthetic: bool = False) -> SegmentationSplit:
    """Pair every leftImg8bit image with its gtFine labelTrainIds (or mapped labelIds) mask."""
    images_dir = root / "leftImg8bit" / split
    targets_dir = root / "gtFine" / split
    for folder in (images_dir, targets_dir):
        if not folder.is_dir():
            raise BadInput(
                f"{folder} not found: expected Cityscapes as leftImg8bit/{split}/<city>/ and gtFine/{split}/<city>/"
            )
    images = sorted(images_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise BadInput(f"{images_dir} holds no <city>/*_leftImg8bit.png images")
    pairs, kinds = [], set()
    for image in images:
        base = image.name[: -len("_leftImg8bit.png")]
        train_ids = targets_dir / image.parent.name / f"{base}_gtFine_labelTrainIds.png"
        label_ids = targets_dir / image.parent.name / f"{base}_gtFine_labelIds.png"
        if train_ids.exists():
            pairs.append((str(image), str(train_ids)))
            kinds.add("labelTrainIds")
        elif label_ids.exists():
            pairs.append((str(image), str(label_ids)))
            kinds.add("labelIds")
        else:
            raise BadInput(
                f"no semantic mask for {image}: expected {train_ids.name} or {label_ids.name} in {train_ids.parent} "
                "(instanceIds alone cannot be used)"
            )
    if len(kinds) > 1:
        raise BadInput(
            f"{targets_dir} mixes labelTrainIds and labelIds masks: convert all with cityscapesScripts"
        )
    kind = kinds.pop()
    return SegmentationSplit(
        dataset="cityscapes",
        split=split,
        root=root,
        pairs=pairs,
        classes=TRAIN_CLASSES,
        ignore_index=IGNORE,
        synthetic=synthetic,
        label_map=label_id_to_train_id() if kind == "labelIds" else None,
        mask_kind=kind,
    )
