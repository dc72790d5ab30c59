"""Pascal VOC 2007/2012: classification labels, detection boxes, segmentation masks (+ SBD aug).

Layout (devkit): ``VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets/{Main,Segmentation},
SegmentationClass}`` and the SBD-derived ``VOC2012/SegmentationClassAug`` with a train_aug list.
XML is parsed with torchvision's VOCDetection parser; lists may end in CRLF (the devkit's own).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets import VOCDetection

from npidbench.data.splits import (
    DatasetSplit,
    DetectionImage,
    DetectionSplit,
    SegmentationSplit,
    lazy_fingerprint,
)
from npidbench.errors import BadInput

# Canonical order (devkit, FAIR benchmark, mmselfsup): the label matrix's columns.
VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
SEG_CLASSES = ("background", *VOC_CLASSES)
IGNORE = 255
# Where SBD-augmented training lists are found: mmsegmentation's aug.txt, the common train_aug.txt.
AUG_LISTS = ("ImageSets/Segmentation/train_aug.txt", "ImageSets/Segmentation/aug.txt", "train_aug.txt")


def voc_palette() -> list[int]:
    """The devkit's colour map (labelcolormap.m): bits of the index spread over R, G, B."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def find_year_dir(root: Path, year: str) -> Path:
    """``VOC<year>`` under any of: the folder itself, ``root/VOC<year>``, ``root/VOCdevkit/VOC<year>``."""
    root = Path(root)
    for candidate in (root, root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"):
        if (candidate / "ImageSets").is_dir() or (candidate / "JPEGImages").is_dir():
            return candidate
    raise BadInput(
        f"VOC{year} not found under {root}: expected VOCdevkit/VOC{year}/ with JPEGImages/, Annotations/ "
        "and ImageSets/"
    )


def read_id_list(path: Path) -> list[str]:
    """Image ids of an ImageSets list (LF or CRLF, blank lines ignored, first column)."""
    if not path.exists():
        raise BadInput(f"{path} not found (the VOC image-set list)")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def read_class_list(path: Path) -> dict[str, int]:
    """``<id> <1|-1|0>`` lines of ImageSets/Main/<class>_<split>.txt."""
    if not path.exists():
        raise BadInput(f"{path} not found (VOC per-class list: ImageSets/Main/<class>_<split>.txt)")
    labels = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
            raise BadInput(f"{path}:{number}: expected '<image id> <1|-1|0>', got {line.strip()!r}")
        labels[parts[0]] = int(parts[1])
    return labels


@dataclass
class VocObject:
    name: str
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax as written (1-based pixels)
    difficult: bool
    truncated: bool


@dataclass
class VocAnnotation:
    width: int
    height: int
    objects: list[VocObject] = field(default_factory=list)


def parse_annotation(path: Path) -> VocAnnotation:
    """One Annotations/<id>.xml. ``<part>`` elements are ignored; missing ``difficult`` or
    ``truncated`` tags count as 0; coordinates may be floats."""
    if not Path(path).exists():
        raise BadInput(f"{path} is missing (VOC annotation: Annotations/<id>.xml for every listed image)")
    try:
        tree = VOCDetection.parse_voc_xml(ET.parse(path).getroot())["annotation"]
    except (ET.ParseError, OSError, KeyError) as exc:
        raise BadInput(f"{path} is not a readable VOC annotation ({exc})") from exc
    size = tree.get("size", {})
    annotation = VocAnnotation(int(float(size.get("width", 0))), int(float(size.get("height", 0))))
    for obj in tree.get("object", []):
        box = obj.get("bndbox")
        if not box:
            raise BadInput(f"{path}: object {obj.get('name')!r} has no bndbox")
        annotation.objects.append(
            VocObject(
                name=obj["name"].strip(),
                box=tuple(float(box[k]) for k in ("xmin", "ymin", "xmax", "ymax")),  # type: ignore[arg-type]
                difficult=bool(int(float(obj.get("difficult", 0) or 0))),
                truncated=bool(int(float(obj.get("truncated", 0) or 0))),
            )
        )
    return annotation


def labels_from_annotation(annotation: VocAnnotation) -> np.ndarray:
    """VOC07 classification labels from boxes: 1 = a non-difficult object of the class, 0 = only
    difficult ones, -1 = none (the devkit's convention, PROTOCOLS.md "VOC07 SVM")."""
    labels = np.full(len(VOC_CLASSES), -1, dtype=np.int8)
    for obj in annotation.objects:
        if obj.name not in VOC_CLASSES:
            continue
        c = VOC_CLASSES.index(obj.name)
        labels[c] = 1 if not obj.difficult else max(labels[c], 0)
    return labels


def load_classification(root: Path, split: str, year: str = "2007", synthetic: bool = False) -> DatasetSplit:
    """VOC classification split with its (N, 20) label matrix in the VOC 1 / -1 / 0 convention.

    Labels come from ImageSets/Main/<class>_<split>.txt; when none of those lists exist they are
    derived from the XML annotations (same convention)."""
    year_dir = find_year_dir(root, year)
    main = year_dir / "ImageSets" / "Main"
    ids = read_id_list(main / f"{split}.txt")
    class_lists = [main / f"{name}_{split}.txt" for name in VOC_CLASSES]
    present = [p.exists() for p in class_lists]
    matrix = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.int8)
    if any(present):
        if not all(present):
            missing = class_lists[present.index(False)]
            raise BadInput(f"{missing} not found: the 20 per-class lists of {split} must all be present")
        position = {image_id: i for i, image_id in enumerate(ids)}
        for c, path in enumerate(class_lists):
            labels = read_class_list(path)
            if set(labels) != set(ids):
                extra = sorted(set(labels) ^ set(ids))[:3]
                raise BadInput(f"{path} lists other images than {main / f'{split}.txt'} (e.g. {extra})")
            for image_id, value in labels.items():
                matrix[position[image_id], c] = value
        source = "ImageSets/Main per-class lists"
    else:
        for i, image_id in enumerate(ids):
            matrix[i] = labels_from_annotation(parse_annotation(year_dir / "Annotations" / f"{image_id}.xml"))
        source = "Annotations XML"
    samples = [(str(year_dir / "JPEGImages" / f"{image_id}.jpg"), 0) for image_id in ids]
    return DatasetSplit(
        dataset=f"voc{year[2:]}",
        split=split,
        root=year_dir,
        samples=samples,
        classes=list(VOC_CLASSES),
        synthetic=synthetic,
        label_matrix=matrix,
        label_source=source,
        fingerprint_fn=lazy_fingerprint(year_dir, samples, extra=matrix.tobytes()),
    )


def load_detection(parts: list[tuple[Path, str, str]], synthetic: bool = False) -> DetectionSplit:
    """Detection images of one or more (root, year, split) parts, e.g. VOC07 + VOC12 trainval."""
    images: list[DetectionImage] = []
    roots = []
    for root, year, split in parts:
        year_dir = find_year_dir(root, year)
        roots.append(year_dir)
        for image_id in read_id_list(year_dir / "ImageSets" / "Main" / f"{split}.txt"):
            annotation = parse_annotation(year_dir / "Annotations" / f"{image_id}.xml")
            objects = [o for o in annotation.objects if o.name in VOC_CLASSES]
            images.append(
                DetectionImage(
                    path=str(year_dir / "JPEGImages" / f"{image_id}.jpg"),
                    width=annotation.width,
                    height=annotation.height,
                    boxes=np.array([o.box for o in objects], dtype=np.float32).reshape(-1, 4),
                    labels=np.array([VOC_CLASSES.index(o.name) for o in objects], dtype=np.int64),
                    difficult=np.array([o.difficult for o in objects], dtype=bool),
                    crowd=np.zeros(len(objects), dtype=bool),
                    image_id=image_id,
                )
            )
    name = "+".join(f"voc{year[2:]}-{split}" for _, year, split in parts)
    return DetectionSplit(
        dataset="voc",
        split=name,
        root=roots[0],
        images=images,
        classes=list(VOC_CLASSES),
        synthetic=synthetic,
    )


def find_aug_list(year_dir: Path) -> Path:
    for relative in AUG_LISTS:
        if (year_dir / relative).exists():
            return year_dir / relative
    raise BadInput(
        f"no SBD train_aug list under {year_dir}: expected one of {', '.join(AUG_LISTS)} "
        "(10,582 ids: VOC2012 train + SBD, without VOC2012 val)"
    )


def load_segmentation(
    root: Path, split: str, aug: bool = False, synthetic: bool = False
) -> SegmentationSplit:
    """VOC2012 segmentation: ``split`` train/val from SegmentationClass, or with ``aug`` the
    train_aug list with SegmentationClassAug masks (val stays VOC2012 val)."""
    year_dir = find_year_dir(root, "2012")
    if aug and split in ("train", "train_aug"):
        ids = read_id_list(find_aug_list(year_dir))
        mask_dir = year_dir / "SegmentationClassAug"
    else:
        ids = read_id_list(year_dir / "ImageSets" / "Segmentation" / f"{split}.txt")
        mask_dir = year_dir / ("SegmentationClassAug" if aug else "SegmentationClass")
    pairs = [(str(year_dir / "JPEGImages" / f"{i}.jpg"), str(mask_dir / f"{i}.png")) for i in ids]
    return SegmentationSplit(
        dataset="voc12aug" if aug else "voc12",
        split=split,
        root=year_dir,
        pairs=pairs,
        classes=list(SEG_CLASSES),
        ignore_index=IGNORE,
        synthetic=synthetic,
    )


def read_voc_mask(path: str | Path) -> np.ndarray:
    """A VOC mask as class indices: palette (P) and grayscale (L) PNGs hold indices directly;
    RGB masks are mapped back through the devkit colour map (void colour -> 255)."""
    with Image.open(path) as image:
        if image.mode in ("P", "L"):
            return np.array(image, dtype=np.uint8)
        rgb = np.array(image.convert("RGB"))
    palette = np.array(voc_palette(), dtype=np.int32).reshape(256, 3)
    codes = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
    lookup = {int(code): index for index, code in enumerate(codes[: len(SEG_CLASSES)])}
    lookup[int(codes[IGNORE])] = IGNORE
    flat = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    out = np.full(flat.shape, IGNORE, dtype=np.uint8)
    for code in np.unique(flat):
        if int(code) not in lookup:
            raise BadInput(f"{path}: colour #{int(code):06x} is not a VOC class colour")
        out[flat == code] = lookup[int(code)]
    return out
