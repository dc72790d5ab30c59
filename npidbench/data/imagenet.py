"""ImageNet-style class-folder datasets (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``).

Class discovery and file filtering are torchvision's ImageFolder; this module adds the checks a
user needs when a tree is half-prepared: a missing split folder, and the most common trap, a
flat ``val/`` folder of 50,000 JPEGs that was never sorted into class folders.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from npidbench.data.splits import DatasetSplit
from npidbench.errors import BadInput

SYNTHETIC_MANIFEST = "npidbench-synthetic.json"


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
            f"{folder} not found: expected {dataset} in ImageFolder layout "
            f"({root}/{split}/<class>/<image>.JPEG)"
        )
    entries = list(os.scandir(folder))
    subdirs = [e for e in entries if e.is_dir()]
    images = [e for e in entries if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)]
    if images and not subdirs:
        raise BadInput(
            f"{folder} holds {len(images)} images directly, not in class folders: sort them into "
            f"{folder}/<wnid>/ using the devkit's validation labels (e.g. the widely used "
            "valprep.sh), then run again"
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
        fingerprint=folder_fingerprint(root, samples),
    )


def folder_fingerprint(root: Path, samples: list[tuple[str, int]]) -> str:
    """Identity of a dataset's content for the feature cache.

    The synthetic generator writes a manifest with a content hash; for real data, every file's
    relative path, label, size and modification time (a replaced or re-encoded image changes
    it; a full content hash of ImageNet would take longer than the extraction it guards).
    """
    manifest = root / SYNTHETIC_MANIFEST
    digest = hashlib.sha256()
    if manifest.exists():
        digest.update(manifest.read_bytes())
    for path, label in samples:
        stat = os.stat(path)
        rel = os.path.relpath(path, root)
        digest.update(f"{rel}\t{label}\t{stat.st_size}".encode())
        if not manifest.exists():
            digest.update(f"\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()
