"""ImageNet-style class folders, SimCLR 1% / 10% subset lists, Places205 list files and the
iNaturalist 2018 JSON: the classification datasets.

Class discovery and file filtering for class folders are torchvision's ImageFolder; the adapters
add the checks a user needs when a tree is half-prepared (a missing split folder, a flat
``val/`` of 50,000 JPEGs never sorted into classes). iNat needs its own JSON adapter: torchvision's
INaturalist indexes the whole train_val2018 tree and cannot give the official train/val split.
"""

from __future__ import annotations

import json
import lzma
import os
from importlib import resources
from pathlib import Path

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from npidbench.data.splits import DatasetSplit, lazy_fingerprint
from npidbench.errors import BadInput


def load_imagefolder(
    root: Path, split: str, dataset: str = "imagenet", synthetic: bool = False
) -> DatasetSplit:
    """Read ``root/split`` as class folders.

    Raises:
        BadInput: the folder is missing, empty, or flat (images not sorted into classes).
    """
    folder = root / split
    if not folder.is_dir():
        raise BadInput(
            f"{folder} not found: expected {dataset} in ImageFolder layout ({root}/{split}/<class>/<image>.JPEG)"
        )
    entries = list(os.scandir(folder))
    subdirs = [e for e in entries if e.is_dir()]
    images = [e for e in entries if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)]
    if images and not subdirs:
        raise BadInput(
            f"{folder} holds {len(images)} images directly, not in class folders: sort them into "
            f"{folder}/<wnid>/ using the devkit's validation labels (e.g. the widely used valprep.sh), then run again"
        )
    try:
        folder_ds = ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as exc:
        raise BadInput(f"{folder}: {str(exc).splitlines()[0]}") from exc
    samples = [(path, label) for path, label in folder_ds.samples]
    return DatasetSplit(
        dataset=dataset,
        split=split,
        root=root,
        samples=samples,
        classes=list(folder_ds.classes),
        synthetic=synthetic,
        fingerprint_fn=lazy_fingerprint(root, samples),
    )


# SimCLR's lists by label fraction, shipped xz-compressed (npidbench/data/subsets/SOURCE.md).
SIMCLR_SUBSETS = {0.01: "1percent.txt.xz", 0.1: "10percent.txt.xz"}


def simclr_subset(fraction: float) -> Path:
    """The shipped SimCLR list of ``fraction`` (0.01 or 0.1) of the ImageNet train labels."""
    name = SIMCLR_SUBSETS.get(fraction)
    if name is None:
        raise BadInput(
            f"SimCLR's imagenet_subsets exist for fraction 0.01 and 0.1, not {fraction:g}: use "
            "--set split=drawn for a seeded class-balanced draw, or split_file=LIST"
        )
    return Path(str(resources.files("npidbench.data").joinpath("subsets", name)))


def read_subset_list(path: Path) -> list[str]:
    """A SimCLR imagenet_subsets file: one train file name per line (``n04235860_14959.JPEG``);
    ``.xz`` files are decompressed (the shipped copies)."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"subset list {path} not found")
    try:
        text = lzma.decompress(path.read_bytes()).decode() if path.suffix == ".xz" else path.read_text()
    except (lzma.LZMAError, UnicodeDecodeError) as exc:
        raise BadInput(f"subset list {path} is not a text list of file names: {exc}") from exc
    names = [line.strip() for line in text.splitlines() if line.strip()]
    bad = next((n for n in names if "_" not in n or not n.split("_")[0]), None)
    if bad is not None:
        raise BadInput(f"{path}: {bad!r} is not an ImageNet train file name (<synset>_<number>.JPEG)")
    return names


def load_imagenet_subset(train: DatasetSplit, list_file: Path) -> DatasetSplit:
    """The images of ``train`` named in a SimCLR-format list; a name not in the tree is an error."""
    names = read_subset_list(list_file)
    index = {os.path.basename(path): i for i, (path, _) in enumerate(train.samples)}
    missing = [n for n in names if n not in index]
    if missing:
        synset = missing[0].split("_")[0]
        raise BadInput(
            f"{len(missing)} of the {len(names)} images in {list_file} are not in {train.root / train.split} "
            f"(first: {synset}/{missing[0]})"
        )
    stem = Path(list_file).name.split(".")[0]  # 1percent.txt.xz -> 1percent
    return train.subset([index[n] for n in names], f"{train.split}-{stem}")


# --- Places205 ------------------------------------------------------------------------------

PLACES_LISTS = ("trainvalsplit_places205/{split}_places205.csv", "{split}_places205.csv", "{split}.txt")


def load_places205(root: Path, split: str, synthetic: bool = False) -> DatasetSplit:
    """Places205 from its list files (``<relative path> <label>`` per line). Images are resolved
    against ``root/images256`` (the release's folder) or ``root`` itself."""
    list_path = next(
        (root / p.format(split=split) for p in PLACES_LISTS if (root / p.format(split=split)).exists()), None
    )
    if list_path is None:
        expected = ", ".join(str(root / p.format(split=split)) for p in PLACES_LISTS[:2])
        raise BadInput(f"Places205 {split} list not found: expected {expected}")
    image_root = root / "images256" if (root / "images256").is_dir() else root
    samples = []
    for number, line in enumerate(list_path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise BadInput(f"{list_path}:{number}: expected '<relative path> <label>', got {line.strip()!r}")
        samples.append((str(image_root / parts[0]), int(parts[1])))
    if not samples:
        raise BadInput(f"{list_path} lists no images")
    classes = _class_names(samples, lambda path: Path(path).parent.name)
    return DatasetSplit(
        "places205", split, root, samples, classes, synthetic, lazy_fingerprint(root, samples)
    )


def _class_names(samples: list[tuple[str, int]], name_of) -> list[str]:
    count = max(label for _, label in samples) + 1
    names = [str(i) for i in range(count)]
    for path, label in samples:
        names[label] = name_of(path)
    return names


# --- iNaturalist 2018 -----------------------------------------------------------------------


def load_inat18(root: Path, split: str, synthetic: bool = False) -> DatasetSplit:
    """iNat 2018 from ``{split}2018.json`` (COCO-like: images, annotations with category_id).
    The label is the category_id (which equals the folder number in the real files);
    ``categories.json``, when present, names the classes."""
    path = root / f"{split}2018.json"
    if not path.exists():
        raise BadInput(
            f"{path} not found: expected iNaturalist 2018 with {split}2018.json and train_val2018/"
        )
    try:
        data = json.loads(path.read_text())
        files = {image["id"]: image["file_name"] for image in data["images"]}
        labels = {ann["image_id"]: int(ann["category_id"]) for ann in data["annotations"]}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BadInput(f"{path} is not an iNaturalist annotation file ({exc})") from exc
    unlabelled = [i for i in files if i not in labels]
    if unlabelled:
        raise BadInput(f"{path}: image {files[unlabelled[0]]} has no annotation ({len(unlabelled)} such)")
    samples = [(str(root / files[i]), labels[i]) for i in sorted(files)]
    names: dict[int, str] = {}
    categories = root / "categories.json"
    if categories.exists():
        names = {int(c["id"]): c.get("name", str(c["id"])) for c in json.loads(categories.read_text())}
    count = max(labels.values()) + 1
    if names and set(labels.values()) <= set(names):  # categories.json describes these labels
        count = max(count, max(names) + 1)
    classes = [names.get(i, str(i)) for i in range(count)]
    return DatasetSplit("inat18", split, root, samples, classes, synthetic, lazy_fingerprint(root, samples))
