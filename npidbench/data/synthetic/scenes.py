"""Multi-object scenes shared by the synthetic VOC and COCO layouts: objects with boxes,
difficult and truncated flags, visible masks, and VOC-style class masks with void borders."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from npidbench.data.synthetic.render import ClassStyle, random_instance, render


@dataclass
class SceneObject:
    """One annotated object: class index (into the style list), tight box, flags, visible mask."""

    label: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive pixel indices (0-based)
    difficult: bool
    truncated: bool
    mask: np.ndarray  # (H, W) bool, visible pixels
    part_box: tuple[int, int, int, int] | None = None


@dataclass
class AnnotatedScene:
    pixels: np.ndarray
    objects: list[SceneObject]


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


@dataclass(frozen=True)
class SceneMix:
    """How many objects a multi-object scene holds and how large: ``counts`` drawn with
    ``weights``, each ``size`` of the short side, or with ``small_probability`` a small one."""

    counts: tuple[int, ...] = (1, 2, 3)
    weights: tuple[float, ...] = (0.5, 0.32, 0.18)
    size: tuple[float, float] = (0.3, 0.6)
    small_probability: float = 0.12


def multi_object_scene(
    styles: list[ClassStyle],
    rng: np.random.Generator,
    height: int,
    width: int,
    mix: SceneMix = SceneMix(),
    min_visible: int = 6,
) -> AnnotatedScene:
    """``mix.counts`` objects of random classes (multi-label images), some small (``mix``) or
    heavily occluded (difficult, as VOC marks objects that are hard to recognise), some cut by
    the border (truncated). Objects left with fewer than ``min_visible`` pixels are not annotated."""
    count = int(rng.choice(mix.counts, p=np.array(mix.weights) / sum(mix.weights)))
    instances = []
    for _ in range(count):
        style = styles[int(rng.integers(len(styles)))]
        small = rng.random() < mix.small_probability
        sizes = (0.14, 0.22) if small else mix.size
        instances.append(random_instance(style, rng, height, width, sizes, margin=0.3))
    scene = render(instances, height, width, rng, occlusion=0.3)
    objects = []
    for i, inst in enumerate(instances):
        mask = scene.ids == i + 1
        visible = int(mask.sum())
        if visible < min_visible:
            continue
        fraction = scene.visible_fraction(i)
        difficult = inst.size < 0.23 * min(height, width) or fraction < 0.35 or visible < 60
        objects.append(
            SceneObject(inst.style.index, mask_box(mask), bool(difficult), scene.truncated[i], mask)
        )
    return AnnotatedScene(scene.pixels, objects)


def class_mask(scene: AnnotatedScene, ignore: int = 255, border: int = 1) -> np.ndarray:
    """VOC segmentation target: class index + 1 per object pixel, 0 background, ``ignore`` on a
    ``border``-pixel band around every object (VOC's void outline) and over difficult objects."""
    height, width = scene.pixels.shape[:2]
    target = np.zeros((height, width), dtype=np.uint8)
    void = np.zeros((height, width), dtype=bool)
    for obj in scene.objects:
        target[obj.mask] = obj.label + 1
        if obj.difficult:
            void |= obj.mask
        edge = obj.mask ^ _erode(obj.mask, border)
        void |= _dilate(edge, border)
    target[void] = ignore
    return target


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    return ~_dilate(~mask, steps)
