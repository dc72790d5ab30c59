"""The embedded synthetic suite: every benchmark dataset, seeded, in its real on-disk layout.

``ensure_suite()`` generates it once into the cache (``NPIDBENCH_DATA``) and returns its root, laid
out like a ``--data-root``: ``imagenet/``, ``places205/``, ``inat2018/``, ``VOCdevkit/VOC2007``,
``VOCdevkit/VOC2012``, ``coco/``, ``cityscapes/``, ``ADEChallengeData2016/``. Each dataset folder
carries a manifest (``npidbench-synthetic.json``) with the generator version, spec, counts and a
content hash; the loaders read it all back exactly like real data.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from npidbench.data.splits import SYNTHETIC_MANIFEST
from npidbench.data.synthetic.ade20k import ADE20KSpec, write_ade20k
from npidbench.data.synthetic.cityscapes import CityscapesSpec, write_cityscapes
from npidbench.data.synthetic.classification import (
    ImageNetSpec,
    INat18Spec,
    Places205Spec,
    synthetic_wnid,
    write_imagenet,
    write_inat18,
    write_places205,
)
from npidbench.data.synthetic.coco import CocoSpec, write_coco
from npidbench.data.synthetic.voc import VocSpec, write_voc
from npidbench.paths import synthetic_data_dir

GENERATOR_VERSION = 6  # bump when any byte could change: the feature cache keys on the manifest


@dataclass(frozen=True)
class SuiteSpec:
    """Everything the embedded suite contains; its hash names the generated folder."""

    seed: int = 0
    imagenet: ImageNetSpec = field(default_factory=ImageNetSpec)
    places205: Places205Spec = field(default_factory=Places205Spec)
    inat18: INat18Spec = field(default_factory=INat18Spec)
    voc: VocSpec = field(default_factory=VocSpec)
    coco: CocoSpec = field(default_factory=CocoSpec)
    cityscapes: CityscapesSpec = field(default_factory=CityscapesSpec)
    ade20k: ADE20KSpec = field(default_factory=ADE20KSpec)

    def key(self) -> str:
        text = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return f"synthetic-v{GENERATOR_VERSION}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def _writers(spec: SuiteSpec) -> dict[str, tuple[str, Callable[[Path], dict]]]:
    """dataset -> (sub-path under the suite root, writer)."""
    seed = spec.seed
    return {
        "imagenet": ("imagenet", lambda root: write_imagenet(root, spec.imagenet, seed)),
        "places205": ("places205", lambda root: write_places205(root, spec.places205, seed)),
        "inat18": ("inat2018", lambda root: write_inat18(root, spec.inat18, seed)),
        "voc": ("VOCdevkit", lambda root: write_voc(root, spec.voc, seed)),
        "coco": ("coco", lambda root: write_coco(root, spec.coco, seed)),
        "cityscapes": ("cityscapes", lambda root: write_cityscapes(root, spec.cityscapes, seed)),
        "ade20k": ("ADEChallengeData2016", lambda root: write_ade20k(root, spec.ade20k, seed)),
    }


def generate_suite(root: Path, spec: SuiteSpec, only: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Write the suite (or the datasets in ``only``) under ``root``. Returns counts per dataset.

    The datasets are independent (each drawn from its own seeded generators, no global random
    state), so they are written by parallel threads, one per core: the output is byte-identical
    to a sequential run. Threads rather than processes: JPEG / PNG encoding and numpy release the
    GIL (19 s -> 16 s on 2 cores), and a spawned process would re-import a user script's
    unguarded top level, a forked one can deadlock beside torch's OpenMP threads."""
    names = [name for name in _writers(spec) if only is None or name in only]
    workers = min(len(names), os.cpu_count() or 1)
    if workers <= 1:
        return {name: _write_dataset(root, spec, name) for name in names}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        # The largest (VOC, about half the work) first, so the others share the remaining cores.
        order = sorted(names, key=lambda name: name != "voc")
        futures = {name: pool.submit(_write_dataset, root, spec, name) for name in order}
        return {name: futures[name].result() for name in names}


def _write_dataset(root: Path, spec: SuiteSpec, name: str) -> dict:
    """One dataset of the suite and its manifest; returns its counts."""
    subpath, write = _writers(spec)[name]
    folder = root / subpath
    folder.mkdir(parents=True, exist_ok=True)
    counts = write(folder)
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "dataset": name,
        "seed": spec.seed,
        "spec": asdict(getattr(spec, name)),
        "counts": counts,
        "content_sha256": _tree_hash(folder),
    }
    (folder / SYNTHETIC_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return counts


def _tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != SYNTHETIC_MANIFEST):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
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


def write_suite(root: Path, spec: SuiteSpec) -> Path:
    """Write the whole suite as a data root at ``root`` (which must not exist or be empty),
    through a temporary sibling renamed into place when complete."""
    root = Path(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        generate_suite(tmp, spec)
        if root.exists():
            root.rmdir()  # empty (checked by the caller)
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


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
            from npidbench.progress import log

            log(f"generating the synthetic suite into {final} (once)")
            generate_suite(tmp, spec)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


__all__ = [
    "GENERATOR_VERSION",
    "SuiteSpec",
    "ImageNetSpec",
    "Places205Spec",
    "INat18Spec",
    "VocSpec",
    "CocoSpec",
    "CityscapesSpec",
    "ADE20KSpec",
    "ensure_suite",
    "generate_suite",
    "synthetic_wnid",
    "write_suite",
]
