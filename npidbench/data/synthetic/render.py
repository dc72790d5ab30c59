"""The scene renderer behind every synthetic dataset.

Why scenes and not noise: the suite must let a trained backbone beat a random one, so classes
carry the cues natural images have and CNN features pick up fast (datasets issue): a
class-specific texture with its own frequency, a part attached at a class-specific place, a
class-correlated (not fixed) colour distribution, and an outline shape. Nuisance factors
(background, clutter, position, scale, rotation, lighting, occluders) are drawn independently of
the class. Every random draw comes from a generator the caller seeds: same seed, same pixels.

A scene is a list of object instances drawn in order over a background; ``render`` returns the
pixels and an instance map (0 = background, i + 1 = instance i) from which the layout writers
derive boxes, masks, polygons, difficult and truncated flags.
"""

from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

SHAPES = (
    "ellipse",
    "rectangle",
    "triangle",
    "diamond",
    "star",
    "cross",
    "ring",
    "hexagon",
    "crescent",
    "arrow",
)
TEXTURES = ("stripes", "checker", "dots", "rings", "waves", "grid", "zigzag", "blotches")
_GOLDEN = 0.6180339887498949


@dataclass(frozen=True)
class ClassStyle:
    """What makes a class recognisable. Instances vary around it; nuisance never depends on it."""

    index: int
    shape: str
    texture: str
    frequency: float  # texture cycles per object width
    hue: float  # mean hue of the body; instances jitter around it
    part_hue: float
    part_angle: float  # where the part sits on the outline, in the object's frame (radians)
    part_shape: str  # disc or square
    aspect: float  # width / height of the body

    @property
    def description(self) -> str:
        return f"{self.texture} {self.shape} with a {self.part_shape} part"


def class_styles(count: int) -> list[ClassStyle]:
    """``count`` distinct class styles: shape, texture and part cycle at different rates so
    that no single cue separates every pair of classes. Style i is the same object category in
    every synthetic dataset and for every seed (a shared visual world, so features transfer
    between datasets; the seed varies the instances)."""
    styles = []
    for c in range(count):
        styles.append(
            ClassStyle(
                index=c,
                shape=SHAPES[c % len(SHAPES)],
                texture=TEXTURES[(3 * c + c // len(TEXTURES)) % len(TEXTURES)],
                frequency=float(2.5 + 4.0 * ((c * _GOLDEN * 3) % 1.0)),
                # Class-correlated colour: a class hue with a wide spread per instance, and class
                # saturation / brightness bands (random_instance), so colour helps but never
                # decides alone.
                hue=float((c * _GOLDEN) % 1.0),
                part_hue=float((c * _GOLDEN + 0.5) % 1.0),
                part_angle=float(2 * math.pi * ((c * 0.37) % 1.0)),
                part_shape=("disc", "square")[(c // 2) % 2],
                aspect=float(0.7 + 0.6 * ((c * 0.29) % 1.0)),
            )
        )
    return styles


@dataclass
class Instance:
    """One object placed in a scene."""

    style: ClassStyle
    cx: float
    cy: float
    size: float  # body height in pixels
    angle: float
    hue_jitter: float
    saturation: float
    value: float
    frequency_scale: float
    texture_phase: tuple[float, float]


@dataclass
class Scene:
    """A rendered scene: pixels, instance map and per-instance visibility."""

    pixels: np.ndarray  # (H, W, 3) uint8
    ids: np.ndarray  # (H, W) int32: 0 background, i + 1 instance i
    drawn_area: list[int]  # pixels each instance covered when drawn (inside the image)
    truncated: list[bool]  # the instance extends beyond the image border

    def visible_fraction(self, i: int) -> float:
        drawn = self.drawn_area[i]
        return float((self.ids == i + 1).sum()) / drawn if drawn else 0.0


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Outline in the object frame, body inside about [-1, 1]^2."""
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    if shape == "ellipse":
        return r <= 1.0
    if shape == "rectangle":
        return (np.abs(u) <= 0.95) & (np.abs(v) <= 0.75)
    if shape == "triangle":
        return (v <= 0.8) & (np.abs(u) <= (v + 1.0) * 0.55)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "star":
        return r <= 0.55 + 0.4 * np.cos(5 * theta)
    if shape == "cross":
        return ((np.abs(u) <= 0.33) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 1.0))
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "hexagon":
        return np.maximum(np.abs(u) * 0.866 + np.abs(v) * 0.5, np.abs(v)) <= 0.9
    if shape == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.55, v) >= 0.75)
    if shape == "arrow":
        shaft = (np.abs(v) <= 0.3) & (u >= -1.0) & (u <= 0.2)
        head = (u > 0.2) & (u <= 1.0) & (np.abs(v) <= (1.0 - u) * 1.1)
        return shaft | head
    raise ValueError(shape)


def texture(
    kind: str, u: np.ndarray, v: np.ndarray, freq: float, phase: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """A pattern in [0, 1] on the object frame, so it rotates and scales with the object."""
    a, b = phase
    tau = 2 * math.pi
    if kind == "stripes":
        return (np.sin(tau * (freq * u / 2 + a)) > 0).astype(np.float32)
    if kind == "checker":
        return ((np.sin(tau * (freq * u / 2 + a)) * np.sin(tau * (freq * v / 2 + b))) > 0).astype(np.float32)
    if kind == "dots":
        fu = (freq * u / 2 + a) % 1.0 - 0.5
        fv = (freq * v / 2 + b) % 1.0 - 0.5
        return (np.hypot(fu, fv) < 0.28).astype(np.float32)
    if kind == "rings":
        return (np.sin(tau * (freq * np.hypot(u, v) / 2 + a)) > 0).astype(np.float32)
    if kind == "waves":
        return (np.sin(tau * (freq * u / 2 + 0.35 * np.sin(tau * (v + b)) + a)) > 0).astype(np.float32)
    if kind == "grid":
        fu = np.abs((freq * u / 2 + a) % 1.0 - 0.5)
        fv = np.abs((freq * v / 2 + b) % 1.0 - 0.5)
        return (np.minimum(fu, fv) < 0.12).astype(np.float32)
    if kind == "zigzag":
        tri = np.abs((freq * v / 2 + b) % 1.0 - 0.5)
        return (np.sin(tau * (freq * u / 2 + tri + a)) > 0).astype(np.float32)
    if kind == "blotches":
        centres = rng.uniform(-1, 1, size=(6, 2))
        field_ = np.zeros_like(u)
        for cu, cv in centres:
            field_ += np.exp(-((u - cu) ** 2 + (v - cv) ** 2) * freq * 1.5)
        return (field_ > 0.5).astype(np.float32)
    raise ValueError(kind)


def hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(
        colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), dtype=np.float32
    )


def clutter_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A quiet near-grey gradient with faint clutter and sensor noise, independent of any class.

    Deliberately low in variation: in a synthetic world, objects of one class differ little, so
    any strong per-image background would be the easiest cue for instance discrimination (NPID)
    to learn, and it says nothing about the class."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    level = rng.uniform(0.42, 0.58)
    c0 = hsv(rng.random(), rng.uniform(0.0, 0.08), level + rng.uniform(-0.05, 0.05))
    c1 = hsv(rng.random(), rng.uniform(0.0, 0.08), level + rng.uniform(-0.05, 0.05))
    direction = rng.uniform(0, 2 * math.pi)
    t = np.cos(direction) * x / width + np.sin(direction) * y / height
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    image = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    for _ in range(int(rng.integers(0, 3))):  # clutter: faint thin strokes
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        ang = rng.uniform(0, math.pi)
        dist = np.abs(np.cos(ang) * (y - y0) - np.sin(ang) * (x - x0))
        stroke = dist < rng.uniform(0.6, 1.2)
        image[stroke] = image[stroke] * 0.75 + 0.25 * hsv(
            rng.random(), rng.uniform(0, 0.3), rng.uniform(0.3, 0.8)
        )
    image += rng.normal(0, 0.03, size=image.shape).astype(np.float32)
    return image


def random_instance(
    style: ClassStyle,
    rng: np.random.Generator,
    height: int,
    width: int,
    size_range: tuple[float, float] = (0.28, 0.8),
    margin: float = 0.45,
) -> Instance:
    """An instance of ``style`` at a random place, scale (a wide range: scale is nuisance that
    random features are not invariant to) and rotation. A ``margin`` below 0.5 lets part of the
    object leave the image (truncation)."""
    size = rng.uniform(*size_range) * min(height, width)
    edge = size * margin
    return Instance(
        style=style,
        cx=float(rng.uniform(edge, max(edge + 1, width - edge))),
        cy=float(rng.uniform(edge, max(edge + 1, height - edge))),
        size=float(size),
        angle=float(rng.uniform(-0.6, 0.6)),
        hue_jitter=float(rng.normal(0, 0.08)),  # around the class hue
        saturation=float(
            np.clip((0.45 + 0.5 * ((style.index * 0.37) % 1.0)) + rng.normal(0, 0.12), 0.3, 1.0)
        ),
        value=float(np.clip((0.55 + 0.4 * ((style.index * 0.61) % 1.0)) + rng.normal(0, 0.1), 0.35, 1.0)),
        frequency_scale=float(rng.uniform(0.85, 1.15)),
        texture_phase=(float(rng.random()), float(rng.random())),
    )


def _draw(
    image: np.ndarray, ids: np.ndarray, inst: Instance, instance_id: int, rng: np.random.Generator
) -> tuple[int, bool]:
    """Paint one instance; returns (pixels covered inside the image, truncated)."""
    height, width = ids.shape
    style = inst.style
    half = inst.size * 0.75 * max(1.0, style.aspect)  # bbox half-size incl. the part
    ux0, ux1 = int(inst.cx - half) - 1, int(inst.cx + half) + 2
    uy0, uy1 = int(inst.cy - half) - 1, int(inst.cy + half) + 2
    x0, x1, y0, y1 = max(0, ux0), min(width, ux1), max(0, uy0), min(height, uy1)
    if x0 >= x1 or y0 >= y1:
        return 0, True
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = x - inst.cx, y - inst.cy
    cos, sin = math.cos(inst.angle), math.sin(inst.angle)
    u = (cos * dx + sin * dy) / (inst.size * 0.5 * style.aspect)
    v = (-sin * dx + cos * dy) / (inst.size * 0.5)
    body = shape_mask(style.shape, u, v)
    pattern = texture(style.texture, u, v, style.frequency * inst.frequency_scale, inst.texture_phase, rng)
    base = hsv(style.hue + inst.hue_jitter, inst.saturation, inst.value)
    accent = hsv(style.hue + inst.hue_jitter + 0.08, inst.saturation * 0.6, 1.0 - 0.7 * inst.value)
    shade = (1.0 - 0.18 * (u + v) / 2.0)[..., None]  # lighting: a nuisance gradient
    body_rgb = (base * (1 - pattern[..., None]) + accent * pattern[..., None]) * shade
    pu, pv = 0.95 * math.cos(style.part_angle), 0.95 * math.sin(style.part_angle)
    if style.part_shape == "disc":
        part = np.hypot(u - pu, v - pv) <= 0.32
    else:
        part = (np.abs(u - pu) <= 0.28) & (np.abs(v - pv) <= 0.28)
    part &= ~body
    part_rgb = hsv(style.part_hue + inst.hue_jitter, 0.8, 0.9) * shade
    region = image[y0:y1, x0:x1]
    region[body] = body_rgb[body]
    region[part] = part_rgb[part]
    covered = body | part
    ids[y0:y1, x0:x1][covered] = instance_id
    # Truncated: some of the object's pixels would fall outside the image.
    truncated = False
    if (x0, x1, y0, y1) != (ux0, ux1, uy0, uy1):
        truncated = bool(
            covered[:, 0].any()
            and x0 == 0
            or covered[:, -1].any()
            and x1 == width
            or covered[0].any()
            and y0 == 0
            or covered[-1].any()
            and y1 == height
        )
    return int(covered.sum()), truncated


def occlude(
    image: np.ndarray, ids: np.ndarray, inst: Instance, rng: np.random.Generator, scale: float = 0.5
) -> None:
    """A neutral occluder over part of an object (id 0: it hides, it is not an object)."""
    height, width = ids.shape
    w, h = rng.uniform(0.25, scale) * inst.size, rng.uniform(0.25, scale) * inst.size
    cx = inst.cx + rng.uniform(-0.5, 0.5) * inst.size
    cy = inst.cy + rng.uniform(-0.5, 0.5) * inst.size
    x0, x1 = int(max(0, cx - w / 2)), int(min(width, cx + w / 2))
    y0, y1 = int(max(0, cy - h / 2)), int(min(height, cy + h / 2))
    image[y0:y1, x0:x1] = hsv(rng.random(), rng.uniform(0, 0.2), rng.uniform(0.2, 0.9))
    ids[y0:y1, x0:x1] = 0


def render(
    instances: list[Instance],
    height: int,
    width: int,
    rng: np.random.Generator,
    occlusion: float = 0.25,
    background: np.ndarray | None = None,
) -> Scene:
    """Draw a scene over ``background`` (default: random clutter) in instance order."""
    image = clutter_background(rng, height, width) if background is None else background.astype(np.float32)
    ids = np.zeros((height, width), dtype=np.int32)
    drawn, truncated = [], []
    for i, inst in enumerate(instances):
        area, cut = _draw(image, ids, inst, i + 1, rng)
        drawn.append(area)
        truncated.append(cut)
        if rng.random() < occlusion:
            occlude(image, ids, inst, rng)
    pixels = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Scene(pixels, ids, drawn, truncated)


def encode_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_png(array: np.ndarray, palette: list[int] | None = None) -> bytes:
    """PNG bytes (deterministic: no timestamps). With ``palette`` the array's values are written
    as indices of a P-mode image (VOC's masks); uint16 arrays become 16-bit PNGs (Cityscapes
    instance ids)."""
    if palette is not None:
        height, width = array.shape
        image = Image.frombytes("P", (width, height), np.ascontiguousarray(array, dtype=np.uint8).tobytes())
        image.putpalette(palette)
    else:
        image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def seeded(*parts: int) -> np.random.Generator:
    """The generator for one image: seeded by (suite seed, version, dataset, split, index)."""
    return np.random.default_rng(list(parts))
