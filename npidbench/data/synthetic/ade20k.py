"""Synthetic ADE20K SceneParsing: ADEChallengeData2016 JPEGs with single-channel 0..150 masks.

Scene parsing labels every pixel: each scene is a few large "stuff" regions split along a tilted
horizon (indoor: ceiling / wall / floor; outdoor: sky / building skyline / road or grass), each
stuff class with its own colour and texture, and 1-3 large objects drawn by the shared renderer in
the class styles of the same categories in synthetic VOC and COCO (a chair here looks like a
chair there). Neutral clutter blobs are "other" (value 0), so reduce_zero_label's ignore path is
exercised. Only the 15 ADE20K ids below occur; the split still has the 150 classes (mIoU leaves
classes absent from both target and prediction out, as mmseg does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npidbench.data.synthetic.render import (
    class_styles,
    encode_jpeg,
    encode_png,
    hsv,
    random_instance,
    render,
    seeded,
    texture,
)
from npidbench.data.voc import VOC_CLASSES

ADE20K = 8  # dataset number in the image seeds
OTHER = 0
# ADE20K mask values (1-based index into ADE20K_CLASSES).
WALL, BUILDING, SKY, FLOOR, CEILING, ROAD, GRASS = 1, 2, 3, 4, 6, 7, 10
PERSON, TABLE, PLANT, CHAIR, CAR, SOFA, TELEVISION, BICYCLE = 13, 16, 18, 20, 21, 24, 90, 128
STUFF = (WALL, BUILDING, SKY, FLOOR, CEILING, ROAD, GRASS)
# Objects, with the synthetic VOC category whose class style draws them.
THINGS = {
    PERSON: "person",
    TABLE: "diningtable",
    PLANT: "pottedplant",
    CHAIR: "chair",
    CAR: "car",
    SOFA: "sofa",
    TELEVISION: "tvmonitor",
    BICYCLE: "bicycle",
}
USED_IDS = tuple(sorted((*STUFF, *THINGS)))
# Stuff appearance: hue, saturation, value, texture, cycles across the image width.
_LOOK = {
    WALL: (0.11, 0.25, 0.78, "grid", 9.0),
    CEILING: (0.6, 0.06, 0.95, "stripes", 6.0),
    FLOOR: (0.07, 0.6, 0.45, "checker", 10.0),
    SKY: (0.57, 0.5, 0.92, "waves", 3.0),
    BUILDING: (0.02, 0.45, 0.55, "grid", 16.0),
    ROAD: (0.0, 0.03, 0.32, "dots", 14.0),
    GRASS: (0.3, 0.75, 0.5, "zigzag", 12.0),
}
SPLITS = (("training", "train"), ("validation", "val"))


@dataclass(frozen=True)
class ADE20KSpec:
    train: int = 300
    val: int = 100
    width: int = 128
    height: int = 96


def _stuff_layout(
    rng: np.random.Generator, indoor: bool, y: np.ndarray, x: np.ndarray, height: int, width: int
) -> np.ndarray:
    """Every pixel a stuff class: indoor ceiling / wall / floor, outdoor sky / buildings / ground."""
    horizon = height * rng.uniform(0.5, 0.7) + rng.uniform(-0.12, 0.12) * (x - width / 2)
    labels = np.empty((height, width), dtype=np.uint8)
    if indoor:
        labels[:] = WALL
        if rng.random() < 0.6:
            ceiling = height * rng.uniform(0.12, 0.25) + rng.uniform(-0.08, 0.08) * (x - width / 2)
            labels[y < ceiling] = CEILING
        labels[y >= horizon] = FLOOR
        return labels
    labels[:] = SKY
    left = 0
    while left < width:  # a skyline of blocks, some gaps of sky
        block = int(rng.integers(14, 40))
        if rng.random() < 0.8:
            top = height * rng.uniform(0.1, 0.4)
            labels[(y >= top) & (x >= left) & (x < left + block)] = BUILDING
        left += block
    ground = y >= horizon
    near, far = (ROAD, GRASS) if rng.random() < 0.5 else (GRASS, ROAD)
    labels[ground] = near
    if rng.random() < 0.4:  # the other ground kind beside it
        side = x < width * rng.uniform(0.2, 0.4) if rng.random() < 0.5 else x > width * rng.uniform(0.6, 0.8)
        labels[ground & side] = far
    return labels


def _paint(labels: np.ndarray, rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Float RGB of the stuff regions: class colour (jittered per image) times class texture."""
    width = labels.shape[1]
    u, v = x / width * 2 - 1, y / width * 2 - 1
    image = np.zeros((*labels.shape, 3), dtype=np.float32)
    for label in np.unique(labels):
        hue, sat, val, kind, cycles = _LOOK[int(label)]
        region = labels == label
        base = hsv(hue + rng.normal(0, 0.03), sat * rng.uniform(0.8, 1.2), val * rng.uniform(0.85, 1.1))
        pattern = texture(kind, u, v, cycles * rng.uniform(0.9, 1.1), (rng.random(), rng.random()), rng)
        colour = base[None, None] * (0.75 + 0.3 * pattern[..., None])
        image[region] = colour[region]
    return image


def scene_parsing(
    rng: np.random.Generator, height: int, width: int, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8, ADE20K mask uint8) of one scene. ``index`` (the image number) picks the scene
    kind and the first object's class in rotation, so even a small split covers every used class
    in both kinds of scene; everything else is drawn from ``rng``."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    things = list(THINGS)
    indoor = (index + index // len(things)) % 2 == 0
    labels = _stuff_layout(rng, indoor, y, x, height, width)
    background = _paint(labels, rng, y, x)
    styles = class_styles(len(VOC_CLASSES))
    count = int(rng.choice((1, 2, 3), p=(0.4, 0.35, 0.25)))
    extra = [things[int(rng.integers(len(things)))] for _ in range(count - 1)]
    classes = [things[index % len(things)], *extra]
    instances = [
        random_instance(styles[VOC_CLASSES.index(THINGS[c])], rng, height, width, (0.35, 0.65), margin=0.35)
        for c in classes
    ]
    scene = render(instances, height, width, rng, occlusion=0.0, background=background)
    for i, label in enumerate(classes):
        labels[scene.ids == i + 1] = label
    pixels = scene.pixels.astype(np.float32)
    # "Other": neutral clutter not among the 150 classes (ADE20K leaves such objects 0).
    for _ in range(int(rng.choice((0, 1, 2), p=(0.2, 0.5, 0.3)))):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.05, 0.12, size=2) * min(height, width)
        blob = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
        pixels[blob] = hsv(rng.random(), rng.uniform(0, 0.15), rng.uniform(0.2, 0.8)) * 255
        labels[blob] = OTHER
    pixels += rng.normal(0, 6.0, size=pixels.shape).astype(np.float32)
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8), labels


def write_ade20k(root: Path, spec: ADE20KSpec, seed: int) -> dict[str, int]:
    """``root/images/{training,validation}/ADE_{train,val}_XXXXXXXX.jpg`` and the masks of the same
    stem under ``root/annotations/`` (root plays ADEChallengeData2016). Returns counts."""
    counts = {}
    for split_index, (split, tag) in enumerate(SPLITS):
        images = root / "images" / split
        annotations = root / "annotations" / split
        images.mkdir(parents=True, exist_ok=True)
        annotations.mkdir(parents=True, exist_ok=True)
        count = spec.train if split == "training" else spec.val
        for n in range(count):
            rng = seeded(seed, ADE20K, split_index, n)
            pixels, labels = scene_parsing(rng, spec.height, spec.width, n)
            stem = f"ADE_{tag}_{n + 1:08d}"  # the real files count from 1
            (images / f"{stem}.jpg").write_bytes(encode_jpeg(pixels))
            (annotations / f"{stem}.png").write_bytes(encode_png(labels))
        counts[split] = count
    return counts
