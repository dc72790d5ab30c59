"""Synthetic classification datasets in their real layouts: ImageNet class folders, Places205
list files, iNaturalist 2018 JSON."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from npidbench.data.synthetic.render import (
    SHAPES,
    TEXTURES,
    ClassStyle,
    class_styles,
    clutter_background,
    encode_jpeg,
    hsv,
    random_instance,
    render,
    seeded,
    texture,
)

# Dataset numbers in the seed of every image, so that datasets never share random streams.
IMAGENET, PLACES, INAT = 1, 2, 3
SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "trainval": 3}


@dataclass(frozen=True)
class ImageNetSpec:
    classes: int = 10
    train_per_class: int = 160
    val_per_class: int = 40
    min_side: int = 64
    max_side: int = 88


def synthetic_wnid(index: int) -> str:
    """Folder names shaped like real synsets (n + 8 digits), in a range WordNet does not use."""
    return f"n9{index:07d}"


def write_imagenet(root: Path, spec: ImageNetSpec, seed: int) -> dict[str, int]:
    """``root/train/<wnid>/<wnid>_<i>.JPEG``, ``root/val/<wnid>/ILSVRC2012_val_<n>.JPEG`` and
    ``LOC_synset_mapping.txt``, as a prepared ImageNet. One object per image."""
    styles = class_styles(spec.classes)
    counts, val_number = {}, 0
    for split, per_class in (("train", spec.train_per_class), ("val", spec.val_per_class)):
        for style in styles:
            wnid = synthetic_wnid(style.index)
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = seeded(seed, IMAGENET, SPLIT_IDS[split], style.index, i)
                height = int(rng.integers(spec.min_side, spec.max_side + 1))
                width = int(rng.integers(spec.min_side, spec.max_side + 1))
                scene = render([random_instance(style, rng, height, width)], height, width, rng)
                if split == "train":
                    name = f"{wnid}_{i}.JPEG"
                else:
                    val_number += 1
                    name = f"ILSVRC2012_val_{val_number:08d}.JPEG"
                (folder / name).write_bytes(encode_jpeg(scene.pixels))
        counts[split] = per_class * spec.classes
    mapping = "".join(f"{synthetic_wnid(s.index)} synthetic {s.description}\n" for s in styles)
    (root / "LOC_synset_mapping.txt").write_text(mapping)
    return counts


# --- Places205 ------------------------------------------------------------------------------

PLACES_SCENES = (
    "alley",
    "beach",
    "canyon",
    "desert",
    "forest",
    "harbor",
    "meadow",
    "street",
    "tundra",
    "volcano",
)


@dataclass(frozen=True)
class Places205Spec:
    classes: int = 8
    train_per_class: int = 100
    val_per_class: int = 25
    side: int = 80


def _scene_background(scene: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """A scene class is its layout: horizon height, sky and ground colours (class-correlated,
    jittered) and a ground texture; objects and clutter on top are nuisance."""
    horizon = int(size * (0.25 + 0.5 * ((scene * 0.381966) % 1.0)) + rng.integers(-4, 5))
    sky = hsv(
        (scene * 0.6180339887) % 1.0 + rng.normal(0, 0.04), rng.uniform(0.2, 0.6), rng.uniform(0.6, 1.0)
    )
    ground = hsv(
        (scene * 0.6180339887 + 0.45) % 1.0 + rng.normal(0, 0.04),
        rng.uniform(0.3, 0.8),
        rng.uniform(0.3, 0.8),
    )
    image = clutter_background(rng, size, size) * 0.35
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    u, v = (x - size / 2) / (size / 2), (y - size / 2) / (size / 2)
    pattern = texture(
        TEXTURES[scene % len(TEXTURES)], u, v, 3.0 + (scene % 4), (rng.random(), rng.random()), rng
    )
    image[:horizon] += sky * 0.65
    ground_rgb = ground[None, None] * (0.75 + 0.25 * pattern[..., None])
    image[horizon:] += ground_rgb[horizon:] * 0.65
    return image


def write_places205(root: Path, spec: Places205Spec, seed: int) -> dict[str, int]:
    """``root/images256/<l>/<scene>/<n>.jpg`` and ``root/trainvalsplit_places205/{train,val}_places205.csv``
    (one ``<relative path> <label>`` per line), as the Places205 release lays them out."""
    objects = class_styles(20)
    lists: dict[str, list[str]] = {"train": [], "val": []}
    for split, per_class in (("train", spec.train_per_class), ("val", spec.val_per_class)):
        for scene in range(spec.classes):
            name = PLACES_SCENES[scene % len(PLACES_SCENES)] + (
                "" if scene < len(PLACES_SCENES) else str(scene)
            )
            rel_dir = f"{name[0]}/{name}"
            folder = root / "images256" / rel_dir
            folder.mkdir(parents=True, exist_ok=True)
            pool = [objects[(scene * 3 + k) % len(objects)] for k in range(2)]  # typical objects
            for i in range(per_class):
                rng = seeded(seed, PLACES, SPLIT_IDS[split], scene, i)
                background = _scene_background(scene, rng, spec.side)
                count = int(rng.integers(1, 3))
                instances = [
                    random_instance(
                        pool[int(rng.integers(len(pool)))], rng, spec.side, spec.side, (0.2, 0.35)
                    )
                    for _ in range(count)
                ]
                picture = render(instances, spec.side, spec.side, rng, occlusion=0.0, background=background)
                file_name = f"{i + 1:08d}.jpg" if split == "train" else f"val_{i + 1:08d}.jpg"
                (folder / file_name).write_bytes(encode_jpeg(picture.pixels))
                lists[split].append(f"{rel_dir}/{file_name} {scene}")
    split_dir = root / "trainvalsplit_places205"
    split_dir.mkdir(parents=True, exist_ok=True)
    for split, lines in lists.items():
        (split_dir / f"{split}_places205.csv").write_text("\n".join(lines) + "\n")
    return {split: len(lines) for split, lines in lists.items()}


# --- iNaturalist 2018 -----------------------------------------------------------------------

INAT_SUPERCATEGORIES = (
    ("Plantae", "Plantae"),
    ("Aves", "Animalia"),
    ("Insecta", "Animalia"),
    ("Fungi", "Fungi"),
)


@dataclass(frozen=True)
class INat18Spec:
    species_per_supercategory: int = 4
    min_train: int = 30  # long-tailed, as iNat: from min_train to max_train images per species
    max_train: int = 80
    val_per_class: int = 10
    side: int = 80


def inat_species_styles(spec: INat18Spec) -> list[tuple[ClassStyle, str, str]]:
    """Fine-grained species: one outline per supercategory; species differ in texture frequency,
    hue and part placement only. Returns (style, supercategory, kingdom) with id = index."""
    out = []
    for s, (supercategory, kingdom) in enumerate(INAT_SUPERCATEGORIES):
        for j in range(spec.species_per_supercategory):
            index = s * spec.species_per_supercategory + j
            out.append(
                (
                    ClassStyle(
                        index=index,
                        shape=SHAPES[(2 * s + 1) % len(SHAPES)],
                        texture=TEXTURES[(2 * s) % len(TEXTURES)],
                        frequency=2.5 + 1.3 * j,
                        hue=(0.17 * s + 0.06 * j) % 1.0,
                        part_hue=(0.17 * s + 0.5) % 1.0,
                        part_angle=2 * math.pi * (0.15 * j),
                        part_shape=("disc", "square")[j % 2],
                        aspect=1.0,
                    ),
                    supercategory,
                    kingdom,
                )
            )
    return out


def write_inat18(root: Path, spec: INat18Spec, seed: int) -> dict[str, int]:
    """``root/train_val2018/<Super>/<id>/<hash>.jpg`` with train2018.json, val2018.json and
    categories.json; category_id equals the folder number, as in the real files."""
    species = inat_species_styles(spec)
    categories = [
        {
            "id": style.index,
            "name": f"Synthetica species{style.index:02d}",
            "supercategory": sup,
            "kingdom": kingdom,
            "phylum": f"{sup}phyta",
            "class": sup,
            "order": f"{sup}ales",
            "family": f"{sup}aceae",
            "genus": f"Genus{style.index // spec.species_per_supercategory}",
        }
        for style, sup, kingdom in species
    ]
    counts = {}
    image_id = 0
    for split in ("train", "val"):
        images, annotations = [], []
        for style, sup, _ in species:
            folder = root / "train_val2018" / sup / str(style.index)
            folder.mkdir(parents=True, exist_ok=True)
            if split == "train":  # long tail: later species of each supercategory have fewer images
                frac = (style.index % spec.species_per_supercategory) / max(
                    1, spec.species_per_supercategory - 1
                )
                count = int(round(spec.max_train - frac * (spec.max_train - spec.min_train)))
            else:
                count = spec.val_per_class
            for i in range(count):
                rng = seeded(seed, INAT, SPLIT_IDS[split], style.index, i)
                picture = render(
                    [random_instance(style, rng, spec.side, spec.side)], spec.side, spec.side, rng
                )
                digest = hashlib.sha1(f"{seed}-{split}-{style.index}-{i}".encode()).hexdigest()[:32]
                (folder / f"{digest}.jpg").write_bytes(encode_jpeg(picture.pixels))
                image_id += 1
                images.append(
                    {
                        "id": image_id,
                        "file_name": f"train_val2018/{sup}/{style.index}/{digest}.jpg",
                        "width": spec.side,
                        "height": spec.side,
                    }
                )
                annotations.append({"id": image_id, "image_id": image_id, "category_id": style.index})
        payload = {
            "info": {"description": "npidbench synthetic iNaturalist 2018", "year": 2018},
            "images": images,
            "annotations": annotations,
            "categories": [
                {"id": c["id"], "name": c["name"], "supercategory": c["supercategory"]} for c in categories
            ],
            "licenses": [],
        }
        (root / f"{split}2018.json").write_text(json.dumps(payload, indent=1, sort_keys=True))
        counts[split] = len(images)
    (root / "categories.json").write_text(json.dumps(categories, indent=1, sort_keys=True))
    return counts
