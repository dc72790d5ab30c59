"""The on-disk feature cache: crash-safe, resumable, shared by every task.

Layout under the cache root::

    entries/<digest>/features.npy, labels.npy, meta.json   one layer of one split, complete
    jobs/<digest>/<layer>.npy, labels.npy, job.json,       an extraction in progress
                  progress-rank<r>.json

An entry only ever appears by renaming a finished folder into ``entries/`` (meta.json written
first), so a reader never sees a partial entry. A job writes rows into memory-mapped .npy files
and records how many rows are on disk in progress-rank<r>.json (atomically replaced, after the
rows are flushed); a killed extraction resumes from there. A lock serialises two processes that
want the same job.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from npidbench.atomic import atomic_write_text
from npidbench.errors import BadInput

EXTRACTOR_VERSION = 1  # bump when pooling, layers or preprocessing change
COMMIT_EVERY_S = 2.0  # how often progress is flushed: at most this much work is redone on resume

# How features are stored (``npidbench run --cache-dtype``): float32 as computed, or float16 at
# half the bytes (ResNet-50 Feature1..5 + AvgPool of ImageNet train: 236 GB -> 118 GB). Readers
# upcast float16 rows where they compute (the solvers work in float32 / float64).
STORAGE_DTYPES = ("float32", "float16")
DEFAULT_DTYPE = "float32"
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: larger values would be stored as inf


class OutOfFloat16Range(BadInput):
    """A feature too large for float16 storage: the job is discarded (it could never finish)."""


def check_storage_dtype(dtype: str) -> str:
    """``dtype`` if it is a storage dtype; else BadInput naming the choices."""
    if dtype not in STORAGE_DTYPES:
        raise BadInput(f"--cache-dtype {dtype} is not supported; choose {' or '.join(STORAGE_DTYPES)}")
    return dtype


def entry_bytes(rows: int, dims: dict[str, int], dtype: str = DEFAULT_DTYPE) -> int:
    """Bytes of the entries of ``dims`` for ``rows`` images: features plus int64 labels."""
    return rows * (sum(dims.values()) * np.dtype(dtype).itemsize + 8 * len(dims))


@dataclass(frozen=True)
class FeatureKey:
    """Everything that determines one cached feature matrix."""

    checkpoint_sha256: str
    branch: str
    arch: str
    dataset: str
    dataset_fingerprint: str
    split: str
    transform: str
    layer: str
    extractor_version: int = EXTRACTOR_VERSION
    dtype: str = DEFAULT_DTYPE  # storage dtype: a float16 entry never serves a float32 request

    def identity(self) -> dict[str, Any]:
        """The fields that name the entry. ``dtype`` only when it is not float32, so the entries
        and interrupted jobs written before storage dtypes existed keep their digests."""
        fields = asdict(self)
        if fields["dtype"] == DEFAULT_DTYPE:
            del fields["dtype"]
        return fields

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:32]

    def group(self) -> str:
        """Every layer of one (checkpoint, data, split, transform, dtype): one forward pass makes
        them all, so they share one lock and one job folder."""
        fields = {k: v for k, v in self.identity().items() if k != "layer"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class CachedFeatures:
    """A complete cache entry, memory-mapped read-only."""

    key: FeatureKey
    features: np.ndarray  # (N, D) in the key's storage dtype (float32 or float16), memory-mapped
    labels: np.ndarray  # (N,) int64
    path: Path
    skipped: list[dict[str, Any]] = field(default_factory=list)  # unreadable images (--skip-corrupt)

    @property
    def valid(self) -> np.ndarray:
        """(N,) bool: rows of images that were read (skipped rows hold zeros)."""
        mask = np.ones(len(self.labels), dtype=bool)
        mask[[s["index"] for s in self.skipped]] = False
        return mask

    def rows(self, index: Any = slice(None)) -> np.ndarray:
        """Rows ``index`` of the features as float32 (a float16 entry upcast; always a copy)."""
        return np.array(self.features[index], dtype=np.float32)


@dataclass
class EntryInfo:
    """What ``cache ls`` shows about an entry."""

    digest: str
    path: Path
    meta: dict[str, Any]
    bytes: int

    @property
    def dtype(self) -> str:
        """The storage dtype (entries written before dtypes were recorded are float32)."""
        return self.meta.get("key", {}).get("dtype", DEFAULT_DTYPE)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class FeatureCache:
    """Feature entries and extraction jobs under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.entries_dir = self.root / "entries"
        self.jobs_dir = self.root / "jobs"

    def lookup(self, key: FeatureKey) -> CachedFeatures | None:
        """The complete entry for ``key``, or None."""
        path = self.entries_dir / key.digest()
        if not (path / "meta.json").exists():
            return None
        features = np.load(path / "features.npy", mmap_mode="r")
        labels = np.load(path / "labels.npy", mmap_mode="r")
        skipped = json.loads((path / "meta.json").read_text()).get("skipped", [])
        return CachedFeatures(key, features, labels, path, skipped)

    def entries(self) -> list[EntryInfo]:
        """Every complete entry, newest first."""
        found = []
        if self.entries_dir.is_dir():
            for path in self.entries_dir.iterdir():
                meta_path = path / "meta.json"
                if meta_path.exists():
                    meta = json.loads(meta_path.read_text())
                    found.append(EntryInfo(path.name, path, meta, _dir_bytes(path)))
        return sorted(found, key=lambda e: e.meta.get("created_at", 0), reverse=True)

    def partial_jobs(self) -> list[Path]:
        """Interrupted extractions (resumable) still on disk."""
        return sorted(p for p in self.jobs_dir.iterdir() if p.is_dir()) if self.jobs_dir.is_dir() else []

    def clear(self, checkpoint_prefix: str | None = None) -> tuple[int, int]:
        """Delete entries (all, or those of checkpoints whose sha256 starts with a prefix) and
        interrupted jobs. Returns (entries removed, bytes freed)."""
        removed, freed = 0, 0
        for entry in self.entries():
            sha = entry.meta.get("key", {}).get("checkpoint_sha256", "")
            if checkpoint_prefix and not sha.startswith(checkpoint_prefix):
                continue
            freed += entry.bytes
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
        if checkpoint_prefix is None:
            for job in self.partial_jobs():
                with open(self.jobs_dir / f"{job.name}.lock", "a") as lock:
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # an extraction is running right now: leave it alone
                    freed += _dir_bytes(job)
                    shutil.rmtree(job, ignore_errors=True)
                    fcntl.flock(lock, fcntl.LOCK_UN)
        return removed, freed

    def check_space(self, needed: int, what: str, dtype: str = DEFAULT_DTYPE, layers: int = 1) -> None:
        """Refuse before extracting when the cache's disk cannot hold the result: the refusal
        names the size and what shrinks it (float16 storage, fewer of the ``layers`` asked)."""
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        margin = 256 * 1024**2
        if needed + margin > free:
            fixes = []
            if dtype != "float16":
                fixes.append(f"--cache-dtype float16 halves it (to about {_human(needed / 2)})")
            if layers > 1:
                fixes.append("asking for fewer layers shrinks it (e.g. --set layers=AvgPool,Feature5)")
            fixes.append("or point NPIDBENCH_CACHE / --cache at a larger disk")
            raise BadInput(
                f"extracting {what} needs {_human(needed)} ({dtype}) in the feature cache but "
                f"{self.root} has {_human(free)} free; {', '.join(fixes)}"
            )

    @contextlib.contextmanager
    def locked(self, key: FeatureKey, rank: int = 0) -> Iterator[None]:
        """Exclusive use of a key's group (rank 0 locks; other ranks follow rank 0's barriers)."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        with open(self.jobs_dir / f"{key.group()}.lock", "a") as lock:
            if rank == 0:
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if rank == 0:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def job(
        self, keys: list[FeatureKey], rows: int, dims: dict[str, int], world_size: int = 1, rank: int = 0
    ) -> ExtractionJob:
        """The (possibly interrupted) extraction of ``keys``; call under ``locked``."""
        return ExtractionJob(self, self.jobs_dir / keys[0].group(), keys, rows, dims, world_size, rank)


def _fsync(path: Path) -> None:
    """Flush a file's or folder's metadata to disk (power-loss durability of published entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_float16_range(features: dict[str, np.ndarray], layers: list[str]) -> None:
    """float16 holds |x| <= 65504; a larger feature would be stored as inf: refuse instead."""
    for layer in layers:
        values = features[layer]
        if values.size and (peak := float(np.nanmax(np.abs(values)))) > FLOAT16_MAX:
            raise OutOfFloat16Range(
                f"{layer} features reach {peak:.4g}, beyond float16's range (65504): "
                "extract them with --cache-dtype float32"
            )


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1024 or unit == "TB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TB"


class ExtractionJob:
    """Memory-mapped output files of one extraction and its per-rank progress."""

    def __init__(
        self,
        cache: FeatureCache,
        path: Path,
        keys: list[FeatureKey],
        rows: int,
        dims: dict[str, int],
        world_size: int,
        rank: int,
    ) -> None:
        self.cache, self.path, self.keys = cache, path, keys
        self.rows, self.dims, self.world_size, self.rank = rows, dims, world_size, rank
        self.layers = [k.layer for k in keys]
        self.dtype = np.dtype(keys[0].dtype)  # one forward pass, one group: one storage dtype
        self.skipped: list[dict[str, Any]] = []  # this rank's unreadable images (when skipping)
        self._arrays: dict[str, np.memmap] = {}
        self._last_commit = time.monotonic()

    # -- set-up -----------------------------------------------------------------------------
    def description(self) -> dict[str, Any]:
        return {
            "keys": [k.identity() for k in self.keys],  # as before dtypes: old jobs still resume
            "rows": self.rows,
            "dims": self.dims,
            "world_size": self.world_size,
        }

    def create_or_resume(self) -> None:
        """Rank 0: keep a matching job on disk, else start fresh. Other ranks call ``attach``."""
        job_file = self.path / "job.json"
        if job_file.exists():
            try:
                matches = json.loads(job_file.read_text()) == self.description()
            except json.JSONDecodeError:
                matches = False
            if matches and all((self.path / f"{layer}.npy").exists() for layer in self.layers):
                self.attach()
                return
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        for layer in self.layers:
            np.lib.format.open_memmap(
                self.path / f"{layer}.npy", mode="w+", dtype=self.dtype, shape=(self.rows, self.dims[layer])
            )
        np.lib.format.open_memmap(self.path / "labels.npy", mode="w+", dtype=np.int64, shape=(self.rows,))
        atomic_write_text(job_file, json.dumps(self.description()))
        self.attach()

    def attach(self) -> None:
        for layer in self.layers:
            self._arrays[layer] = np.load(self.path / f"{layer}.npy", mmap_mode="r+")
        self._arrays["labels"] = np.load(self.path / "labels.npy", mmap_mode="r+")

    def shard(self) -> tuple[int, int]:
        """This rank's contiguous rows [start, end)."""
        start = self.rows * self.rank // self.world_size
        end = self.rows * (self.rank + 1) // self.world_size
        return start, end

    def resume_row(self) -> int:
        """The first row of this rank's shard not yet safely on disk."""
        start, end = self.shard()
        progress = self.path / f"progress-rank{self.rank}.json"
        if progress.exists():
            state = json.loads(progress.read_text())
            self.skipped = [s for s in state.get("skipped", []) if s["index"] < state.get("done", start)]
            return min(max(state.get("done", start), start), end)
        return start

    # -- writing ----------------------------------------------------------------------------
    def write(self, rows: np.ndarray, features: dict[str, np.ndarray], labels: np.ndarray) -> None:
        """Write a batch's rows (ascending, within this rank's shard; skipped rows stay zero)."""
        if len(rows) == 0:
            return
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        where = slice(lo, hi) if hi - lo == len(rows) else rows
        if self.dtype == np.float16:
            _check_float16_range(features, self.layers)
        for layer in self.layers:
            self._arrays[layer][where] = features[layer]  # float16: rounded to nearest
        self._arrays["labels"][where] = labels

    def skip(self, index: int, path: str, reason: str) -> None:
        """Record an unreadable image that the user chose to skip (--skip-corrupt)."""
        self.skipped.append({"index": int(index), "path": path, "reason": reason})

    def commit(self, done: int, force: bool = False) -> None:
        """Flush rows to disk, then record ``done`` (rows before it are complete)."""
        now = time.monotonic()
        if not force and now - self._last_commit < COMMIT_EVERY_S:
            return
        for array in self._arrays.values():
            array.flush()
        state = {"done": done, "skipped": self.skipped}
        atomic_write_text(self.path / f"progress-rank{self.rank}.json", json.dumps(state))
        self._last_commit = now

    def discard(self) -> None:
        """Rank 0: remove a job that cannot complete (nothing of it is worth resuming)."""
        self._arrays.clear()
        shutil.rmtree(self.path, ignore_errors=True)

    def finalize(self, extra_meta: dict[str, Any]) -> None:
        """Rank 0, after every rank committed: move each layer into its own complete entry."""
        for array in self._arrays.values():
            array.flush()
        self._arrays.clear()
        skipped = []
        for rank in range(self.world_size):
            progress = self.path / f"progress-rank{rank}.json"
            skipped += json.loads(progress.read_text()).get("skipped", []) if progress.exists() else []
        extra_meta = {**extra_meta, "skipped": sorted(skipped, key=lambda s: s["index"])}
        entries = self.cache.entries_dir
        entries.mkdir(parents=True, exist_ok=True)
        for key in self.keys:
            final = entries / key.digest()
            if (final / "meta.json").exists():
                continue
            staging = entries / f".{key.digest()}.tmp-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            os.replace(self.path / f"{key.layer}.npy", staging / "features.npy")
            shutil.copyfile(self.path / "labels.npy", staging / "labels.npy")
            meta = {
                "key": asdict(key),
                "rows": self.rows,
                "dim": self.dims[key.layer],
                "created_at": time.time(),
                **extra_meta,
            }
            (staging / "meta.json").write_text(json.dumps(meta, indent=2))
            for name in ("features.npy", "labels.npy", "meta.json"):
                _fsync(staging / name)
            _fsync(staging)
            if final.exists() and not (final / "meta.json").exists():
                shutil.rmtree(final, ignore_errors=True)  # a stale folder that never completed
            try:
                os.rename(staging, final)
            except OSError:  # published meanwhile (same content): keep that one
                shutil.rmtree(staging, ignore_errors=True)
            _fsync(entries)
        shutil.rmtree(self.path, ignore_errors=True)
