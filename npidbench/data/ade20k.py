"""ADE20K SceneParsing (ADEChallengeData2016): 150 classes, 0 = "other" (ignored).

Layout: ``ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_XXXXXXXX.jpg`` with
``ADEChallengeData2016/annotations/{training,validation}/<same stem>.png``, single-channel uint8
masks: 0 = other objects / unlabelled, 1..150 the classes of objectInfo150. mmseg's ADE20KDataset
reads them with ``reduce_zero_label=True`` (0 -> ignore 255, v -> v - 1); here that is the split's
``label_map``, applied by every mask reader.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from npidbench.data.splits import SegmentationSplit
from npidbench.errors import BadInput

IGNORE = 255
SPLITS = ("training", "validation")
SPLIT_ALIASES = {"train": "training", "val": "validation"}
LAYOUT = "images/{training,validation}/*.jpg and annotations/{training,validation}/<same stem>.png"

# The 150 SceneParsing classes in mask order (value v = class v - 1): the CSAIL sceneparsing
# objectInfo150 list under mmsegmentation's short names (mmseg/datasets/ade.py, ADE20KDataset
# METAINFO["classes"]; mmseg spells the eighth "bed " with a trailing space).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip


def reduce_zero_label() -> np.ndarray:
    """(256,) lookup of mmseg's reduce_zero_label: 0 -> 255, v in 1..150 -> v - 1, above -> 255."""
    table = np.full(256, IGNORE, dtype=np.uint8)
    table[1 : len(ADE20K_CLASSES) + 1] = np.arange(len(ADE20K_CLASSES), dtype=np.uint8)
    return table


def ade20k_split_name(split: str) -> str:
    """The folder name of a split as users say it: training / validation (or train / val)."""
    name = SPLIT_ALIASES.get(split, split)
    if name not in SPLITS:
        raise BadInput(f"unknown ADE20K split {split!r}: choose training or validation (or train, val)")
    return name


def load_ade20k(root: Path, split: str, synthetic: bool = False) -> SegmentationSplit:
    """Pair every ``images/<split>/*.jpg`` with ``annotations/<split>/<stem>.png``."""
    split = ade20k_split_name(split)
    root = Path(root)
    images_dir = root / "images" / split
    masks_dir = root / "annotations" / split
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise BadInput(f"{folder} not found: expected ADE20K ADEChallengeData2016 as {LAYOUT}")
    # One listing per folder, not one stat per image (20,210 training images).
    images = sorted(e.name for e in os.scandir(images_dir) if e.name.endswith(".jpg") and e.is_file())
    if not images:
        tag = "train" if split == "training" else "val"
        raise BadInput(f"{images_dir} holds no *.jpg images: expected ADE_{tag}_XXXXXXXX.jpg ({LAYOUT})")
    masks = {e.name for e in os.scandir(masks_dir) if e.name.endswith(".png")}
    pairs = []
    for name in images:
        mask = name[: -len(".jpg")] + ".png"
        if mask not in masks:
            raise BadInput(f"no annotation for {images_dir / name}: expected {masks_dir / mask}")
        pairs.append((str(images_dir / name), str(masks_dir / mask)))
    return SegmentationSplit(
        dataset="ade20k",
        split=split,
        root=root,
        pairs=pairs,
        classes=list(ADE20K_CLASSES),
        ignore_index=IGNORE,
        synthetic=synthetic,
        label_map=reduce_zero_label(),
    )
