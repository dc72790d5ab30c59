"""Synthetic Cityscapes: street scenes in leftImg8bit / gtFine with labelIds, labelTrainIds and
instanceIds, using the official label ids (ego vehicle and static clutter are ignore pixels)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npidbench.data.cityscapes import label_id_to_train_id
from npidbench.data.synthetic.render import TEXTURES, encode_png, hsv, seeded, texture

CITYSCAPES = 7  # dataset number in the image seeds
# Official labelIds (cityscapesScripts labels.py).
EGO, STATIC, ROAD, SIDEWALK, BUILDING, FENCE, POLE = 1, 4, 7, 8, 11, 13, 17
LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR, BICYCLE = 19, 20, 21, 22, 23, 24, 26, 33
# Class-correlated appearance: hue, saturation, value, texture index, frequency.
_LOOK = {
    ROAD: (0.0, 0.05, 0.35, 7, 8.0),
    SIDEWALK: (0.08, 0.15, 0.6, 1, 6.0),
    BUILDING: (0.07, 0.25, 0.55, 5, 5.0),
    FENCE: (0.1, 0.3, 0.5, 5, 9.0),
    POLE: (0.6, 0.05, 0.4, 0, 2.0),
    LIGHT: (0.15, 0.9, 0.9, 2, 3.0),
    SIGN: (0.12, 0.9, 0.95, 3, 2.0),
    VEGETATION: (0.3, 0.7, 0.45, 7, 4.0),
    TERRAIN: (0.22, 0.5, 0.55, 2, 7.0),
    SKY: (0.58, 0.45, 0.9, 4, 1.0),
    PERSON: (0.98, 0.6, 0.7, 0, 3.0),
    CAR: (0.62, 0.7, 0.5, 6, 2.0),
    BICYCLE: (0.85, 0.7, 0.6, 5, 6.0),
    EGO: (0.0, 0.0, 0.1, 0, 1.0),
    STATIC: (0.5, 0.1, 0.3, 1, 3.0),
}
CITIES = {"train": ("aachen", "bremen"), "val": ("frankfurt",)}


@dataclass(frozen=True)
class CityscapesSpec:
    train: int = 100
    val: int = 30
    width: int = 256
    height: int = 128


def _ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def street_scene(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(RGB uint8, labelIds uint8, instanceIds uint16) of one street scene."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    labels = np.full((height, width), SKY, dtype=np.uint8)
    instances = np.zeros((height, width), dtype=np.uint16)
    horizon = int(height * rng.uniform(0.4, 0.5))
    # Buildings and trees along the skyline.
    left = 0
    while left < width:
        block = int(rng.integers(18, 48))
        top = int(horizon - rng.uniform(0.3, 0.85) * horizon)
        kind = VEGETATION if rng.random() < 0.25 else BUILDING
        if kind == BUILDING:
            labels[top:horizon, left : left + block] = BUILDING
        else:
            labels[_ellipse(y, x, (top + horizon) / 2, left + block / 2, (horizon - top) / 2, block / 2)] = (
                VEGETATION
            )
        left += block
    # Ground: road in the middle, sidewalks narrowing towards the horizon, some terrain.
    ground = y >= horizon
    depth = (y - horizon) / max(1, height - horizon)
    edge_left = width * (0.42 - 0.38 * depth)
    edge_right = width * (0.58 + 0.38 * depth)
    labels[ground] = ROAD
    sidewalk = ground & ((x < edge_left) | (x > edge_right))
    labels[sidewalk] = SIDEWALK
    if rng.random() < 0.5:
        labels[sidewalk & (x < edge_left - 12) & (y > horizon + 6)] = TERRAIN
    if rng.random() < 0.4:
        labels[(y > horizon - 8) & (y < horizon) & (x > width * 0.7)] = FENCE
    # Poles with signs and lights.
    for _ in range(int(rng.integers(1, 4))):
        px = int(rng.choice([rng.uniform(0, width * 0.3), rng.uniform(width * 0.7, width)]))
        base = int(rng.uniform(horizon + 4, max(horizon + 5, height - 10)))
        top = int(base - rng.uniform(0.5, 0.8) * height)
        labels[max(0, top) : base, px : px + 2] = POLE
        head = SIGN if rng.random() < 0.6 else LIGHT
        labels[max(0, top - 5) : max(1, top + 1), max(0, px - 3) : px + 5] = head
    # Things: cars on the road, people and bicycles on the sidewalks (perspective-scaled).
    things = [(CAR, 2, 5), (PERSON, 1, 4), (BICYCLE, 0, 2)]
    for label_id, low, high in things:
        for k in range(int(rng.integers(low, high + 1))):
            cy = rng.uniform(horizon + 6, max(horizon + 7, height - 12))
            scale = 0.3 + 0.9 * (cy - horizon) / (height - horizon)
            if label_id == CAR:
                cx = rng.uniform(width * 0.3, width * 0.7)
                shape = _ellipse(y, x, cy, cx, 7 * scale + 2, 16 * scale + 3)
            elif label_id == PERSON:
                cx = float(rng.choice([rng.uniform(0, width * 0.25), rng.uniform(width * 0.75, width)]))
                shape = _ellipse(y, x, cy - 8 * scale, cx, 10 * scale + 2, 3 * scale + 1)
            else:
                cx = float(rng.choice([rng.uniform(0, width * 0.3), rng.uniform(width * 0.7, width)]))
                shape = _ellipse(y, x, cy, cx, 4 * scale + 1, 8 * scale + 2)
            labels[shape] = label_id
            instances[shape] = label_id * 1000 + k
    if rng.random() < 0.3:  # static clutter: not evaluated (trainId 255)
        cx, cy = rng.uniform(0, width), rng.uniform(horizon, height)
        labels[_ellipse(y, x, cy, cx, 3, 5)] = STATIC
    labels[y >= height - max(4, height // 16)] = EGO  # the car's own bonnet: ignore pixels
    stuff = instances == 0
    instances[stuff] = labels[stuff]
    return _paint(labels, rng, y, x, width), labels, instances


def _paint(
    labels: np.ndarray, rng: np.random.Generator, y: np.ndarray, x: np.ndarray, width: int
) -> np.ndarray:
    image = np.zeros((*labels.shape, 3), dtype=np.float32)
    u, v = x / width * 2 - 1, y / width * 2 - 1
    for label_id in np.unique(labels):
        hue, sat, val, tex, freq = _LOOK[int(label_id)]
        region = labels == label_id
        base = hsv(hue + rng.normal(0, 0.03), sat * rng.uniform(0.8, 1.2), val * rng.uniform(0.8, 1.15))
        pattern = texture(TEXTURES[tex], u, v, freq * 4, (rng.random(), rng.random()), rng)
        colour = base[None, None] * (0.8 + 0.25 * pattern[..., None])
        image[region] = colour[region]
    image += rng.normal(0, 0.025, size=image.shape).astype(np.float32)
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


def write_cityscapes(root: Path, spec: CityscapesSpec, seed: int) -> dict[str, int]:
    """``root/leftImg8bit/<split>/<city>/<city>_<seq>_000019_leftImg8bit.png`` and the gtFine
    labelIds / labelTrainIds / instanceIds PNGs beside them."""
    to_train = label_id_to_train_id()
    counts = {}
    for split_index, (split, count) in enumerate((("train", spec.train), ("val", spec.val))):
        cities = CITIES[split]
        for n in range(count):
            city = cities[n % len(cities)]
            base = f"{city}_{n:06d}_000019"
            rng = seeded(seed, CITYSCAPES, split_index, n)
            pixels, labels, instances = street_scene(rng, spec.height, spec.width)
            image_dir = root / "leftImg8bit" / split / city
            target_dir = root / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            target_dir.mkdir(parents=True, exist_ok=True)
            (image_dir / f"{base}_leftImg8bit.png").write_bytes(encode_png(pixels))
            (target_dir / f"{base}_gtFine_labelIds.png").write_bytes(encode_png(labels))
            (target_dir / f"{base}_gtFine_labelTrainIds.png").write_bytes(encode_png(to_train[labels]))
            (target_dir / f"{base}_gtFine_instanceIds.png").write_bytes(encode_png(instances))
        counts[split] = count
    return counts
