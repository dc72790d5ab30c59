"""The embedded synthetic suite: seeded scenes written in the real on-disk layouts.

Why scenes and not noise: the suite must let a trained backbone beat a random one, so classes
carry the cues natural images have and CNN features pick up fast (datasets issue): a
class-specific texture with its own frequency, a part attached at a class-specific place, a
class-correlated (not fixed) colour distribution, and an outline shape. Nuisance factors
(background, clutter, position, scale, rotation, lighting, occluders) are drawn independently of
the class. Everything derives from one integer seed: the same seed gives the same bytes.

The renderer is layout-agnostic (a scene is a list of object instances; it returns the image and
an instance map for boxes and masks); ``write_imagenet`` is its first layout writer.
"""

from __future__ import annotations

import colorsys
import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from npidbench.paths import synthetic_data_dir

GENERATOR_VERSION = 1  # bump when any pixel could change: the feature cache keys on it

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


def class_styles(count: int, seed: int = 0) -> list[ClassStyle]:
    """``count`` distinct class styles: shape, texture and part cycle at different rates so
    that no single cue separates every pair of classes."""
    rng = np.random.default_rng([seed, 7_001])
    styles = []
    for c in range(count):
        styles.append(
            ClassStyle(
                index=c,
                shape=SHAPES[c % len(SHAPES)],
                texture=TEXTURES[(3 * c + c // len(TEXTURES)) % len(TEXTURES)],
                frequency=float(2.5 + 4.0 * ((c * _GOLDEN * 3) % 1.0)),
                hue=float((c * _GOLDEN) % 1.0),
                part_hue=float((c * _GOLDEN + 0.5 + 0.1 * rng.standard_normal()) % 1.0),
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


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
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


def _texture(
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


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(
        colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), dtype=np.float32
    )


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-saturation gradient plus clutter strokes and noise, independent of any class."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c0 = _hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.9))
    c1 = _hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.9))
    direction = rng.uniform(0, 2 * math.pi)
    t = np.cos(direction) * x / width + np.sin(direction) * y / height
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    image = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    for _ in range(int(rng.integers(2, 6))):  # clutter: thin random strokes
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        ang = rng.uniform(0, math.pi)
        dist = np.abs(np.cos(ang) * (y - y0) - np.sin(ang) * (x - x0))
        stroke = dist < rng.uniform(0.6, 1.8)
        image[stroke] = _hsv(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.2, 1.0))
    image += rng.normal(0, 0.03, size=image.shape).astype(np.float32)
    return image


def random_instance(
    style: ClassStyle,
    rng: np.random.Generator,
    height: int,
    width: int,
    size_range: tuple[float, float] = (0.38, 0.62),
) -> Instance:
    """An instance of ``style`` at a random place, scale and rotation."""
    size = rng.uniform(*size_range) * min(height, width)
    margin = size * 0.45
    return Instance(
        style=style,
        cx=float(rng.uniform(margin, max(margin + 1, width - margin))),
        cy=float(rng.uniform(margin, max(margin + 1, height - margin))),
        size=float(size),
        angle=float(rng.uniform(-0.6, 0.6)),
        hue_jitter=float(rng.normal(0, 0.05)),
        saturation=float(rng.uniform(0.45, 1.0)),
        value=float(rng.uniform(0.45, 1.0)),
        frequency_scale=float(rng.uniform(0.85, 1.15)),
        texture_phase=(float(rng.random()), float(rng.random())),
    )


def _draw(
    image: np.ndarray, ids: np.ndarray, inst: Instance, instance_id: int, rng: np.random.Generator
) -> None:
    height, width = ids.shape
    style = inst.style
    half = inst.size * 0.75 * max(1.0, style.aspect)  # bbox half-size incl. the part
    x0, x1 = max(0, int(inst.cx - half) - 1), min(width, int(inst.cx + half) + 2)
    y0, y1 = max(0, int(inst.cy - half) - 1), min(height, int(inst.cy + half) + 2)
    if x0 >= x1 or y0 >= y1:
        return
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = x - inst.cx, y - inst.cy
    cos, sin = math.cos(inst.angle), math.sin(inst.angle)
    u = (cos * dx + sin * dy) / (inst.size * 0.5 * style.aspect)
    v = (-sin * dx + cos * dy) / (inst.size * 0.5)
    body = _shape_mask(style.shape, u, v)
    pattern = _texture(style.texture, u, v, style.frequency * inst.frequency_scale, inst.texture_phase, rng)
    base = _hsv(style.hue + inst.hue_jitter, inst.saturation, inst.value)
    accent = _hsv(style.hue + inst.hue_jitter + 0.08, inst.saturation * 0.6, 1.0 - 0.7 * inst.value)
    shade = (1.0 - 0.18 * (u + v) / 2.0)[..., None]  # lighting: a nuisance gradient
    body_rgb = (base * (1 - pattern[..., None]) + accent * pattern[..., None]) * shade
    pu, pv = 0.95 * math.cos(style.part_angle), 0.95 * math.sin(style.part_angle)
    if style.part_shape == "disc":
        part = np.hypot(u - pu, v - pv) <= 0.32
    else:
        part = (np.abs(u - pu) <= 0.28) & (np.abs(v - pv) <= 0.28)
    part &= ~body
    part_rgb = _hsv(style.part_hue + inst.hue_jitter, 0.8, 0.9) * shade
    region = image[y0:y1, x0:x1]
    region[body] = body_rgb[body]
    region[part] = part_rgb[part]
    ids[y0:y1, x0:x1][body | part] = instance_id


def _occlude(image: np.ndarray, ids: np.ndarray, inst: Instance, rng: np.random.Generator) -> None:
    """A neutral occluder over part of an object (id 0: it hides, it is not an object)."""
    height, width = ids.shape
    w, h = rng.uniform(0.25, 0.5) * inst.size, rng.uniform(0.25, 0.5) * inst.size
    cx = inst.cx + rng.uniform(-0.5, 0.5) * inst.size
    cy = inst.cy + rng.uniform(-0.5, 0.5) * inst.size
    x0, x1 = int(max(0, cx - w / 2)), int(min(width, cx + w / 2))
    y0, y1 = int(max(0, cy - h / 2)), int(min(height, cy + h / 2))
    image[y0:y1, x0:x1] = _hsv(rng.random(), rng.uniform(0, 0.2), rng.uniform(0.2, 0.9))
    ids[y0:y1, x0:x1] = 0


def render(
    instances: list[Instance], height: int, width: int, rng: np.random.Generator, occlusion: float = 0.25
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a scene. Returns (uint8 RGB image, instance map: 0 background, i+1 instance i)."""
    image = _background(rng, height, width)
    ids = np.zeros((height, width), dtype=np.int32)
    for i, inst in enumerate(instances):
        _draw(image, ids, inst, i + 1, rng)
        if rng.random() < occlusion:
            _occlude(image, ids, inst, rng)
    pixels = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return pixels, ids


def encode_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclass(frozen=True)
class ImageNetSpec:
    """Size of the synthetic ImageNet layout (also the pool the pretrainer uses)."""

    classes: int = 10
    train_per_class: int = 160
    val_per_class: int = 40
    min_side: int = 64
    max_side: int = 88
    seed: int = 0


def synthetic_wnid(index: int) -> str:
    """Folder names shaped like real synsets (n + 8 digits), in a range WordNet does not use."""
    return f"n9{index:07d}"


def write_imagenet(root: Path, spec: ImageNetSpec) -> dict[str, int]:
    """Write ``root/train/<wnid>/<wnid>_<i>.JPEG`` and ``root/val/<wnid>/ILSVRC2012_val_<n>.JPEG``
    plus ``LOC_synset_mapping.txt``, as a prepared ImageNet. Returns counts per split."""
    styles = class_styles(spec.classes, spec.seed)
    counts = {}
    val_number = 0
    for split, per_class in (("train", spec.train_per_class), ("val", spec.val_per_class)):
        for style in styles:
            wnid = synthetic_wnid(style.index)
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([spec.seed, GENERATOR_VERSION, hash_split(split), style.index, i])
                height = int(rng.integers(spec.min_side, spec.max_side + 1))
                width = int(rng.integers(spec.min_side, spec.max_side + 1))
                inst = random_instance(style, rng, height, width)
                pixels, _ = render([inst], height, width, rng)
                if split == "train":
                    name = f"{wnid}_{i}.JPEG"
                else:
                    val_number += 1
                    name = f"ILSVRC2012_val_{val_number:08d}.JPEG"
                (folder / name).write_bytes(encode_jpeg(pixels))
        counts[split] = per_class * spec.classes
    mapping = "".join(f"{synthetic_wnid(s.index)} synthetic {s.description}\n" for s in styles)
    (root / "LOC_synset_mapping.txt").write_text(mapping)
    return counts


def hash_split(split: str) -> int:
    """A stable integer per split name for seeding (Python's hash() is salted per process)."""
    return int(hashlib.sha256(split.encode()).hexdigest()[:8], 16)


@dataclass(frozen=True)
class SuiteSpec:
    """Everything the embedded suite contains; its hash names the generated folder."""

    seed: int = 0
    imagenet: ImageNetSpec = field(default_factory=ImageNetSpec)

    def key(self) -> str:
        text = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return f"synthetic-v{GENERATOR_VERSION}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def generate_suite(root: Path, spec: SuiteSpec) -> Path:
    """Write every layout of the suite under ``root`` (which must not exist yet)."""
    imagenet_spec = ImageNetSpec(**{**asdict(spec.imagenet), "seed": spec.seed})
    counts = {"imagenet": write_imagenet(root / "imagenet", imagenet_spec)}
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "spec": asdict(spec),
        "counts": counts,
        "content_sha256": _tree_hash(root),
    }
    text = json.dumps(manifest, indent=2, sort_keys=True)
    for dataset in counts:
        (root / dataset / "npidbench-synthetic.json").write_text(text)
    return root


def _tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_suite(spec: SuiteSpec | None = None, base: Path | None = None) -> Path:
    """The generated suite's root, generating it on first use.

    Generation goes to a temporary folder renamed into place when complete, under a lock, so an
    interrupted or concurrent first use never leaves a half-written suite that looks complete.
    """
    spec = spec or SuiteSpec()
    base = base or synthetic_data_dir()
    final = base / spec.key()
    if final.is_dir():
        return final
    with _locked(base / f".{spec.key()}.lock"):
        if final.is_dir():
            return final
        tmp = base / f".{spec.key()}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            generate_suite(tmp, spec)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
