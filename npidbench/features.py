"""Feature extraction: one forward pass per image for every requested layer, cached on disk.

Fast where it matters on small machines: JPEG decoding and resizing run in DataLoader workers
on uint8 tensors, the forward pass runs in inference mode and channels-last, pooled features are
written straight into memory-mapped cache files. Under torchrun each rank extracts its own
contiguous shard into the shared cache files and rank 0 publishes the entries.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from npidbench.cache import (
    DEFAULT_DTYPE,
    CachedFeatures,
    FeatureCache,
    FeatureKey,
    OutOfFloat16Range,
    check_storage_dtype,
    entry_bytes,
)
from npidbench.checkpoint import LoadedBackbone
from npidbench.data.images import EvalTransform, ImageList, collate, normalize_batch
from npidbench.data.splits import DatasetSplit
from npidbench.errors import BadInput
from npidbench.progress import log, make_progress


@dataclass(frozen=True)
class ExtractOptions:
    """How to run the forward pass and store its output (the CLI's --device, --workers,
    --eval-batch-size, --skip-corrupt, --cache-dtype)."""

    device: str = "cpu"
    workers: int = 0  # decoding worker processes (the runner picks a default per machine)
    batch_size: int = 64
    skip_corrupt: bool = False  # the user's explicit opt-in: unreadable images are skipped, listed
    cache_dtype: str = DEFAULT_DTYPE  # float16: half the cache's bytes (part of the cache key)

    def __post_init__(self) -> None:
        check_storage_dtype(self.cache_dtype)


@dataclass
class ExtractStats:
    """What a record says about extraction: hits, images, time."""

    cache_hit: bool = True
    images: int = 0
    seconds: float = 0.0
    layers: list[str] = field(default_factory=list)
    cache_dtype: str | None = None  # the storage dtype of the features read (None: none read)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _stem_suffix(cifar_stem: bool, padding: int | None) -> str:
    """The stem is part of the network: solo-learn's padding-2 CIFAR stem gives other features
    than the padding-1 one of the same file read before (keys of padding 1 unchanged)."""
    if not cifar_stem:
        return ""
    return "-cifar" if padding in (None, 1) else f"-cifar-pad{padding}"


def feature_keys(
    backbone: LoadedBackbone,
    split: DatasetSplit,
    transform: EvalTransform,
    layers: Sequence[str],
    dtype: str = DEFAULT_DTYPE,
) -> list[FeatureKey]:
    info = backbone.inspection
    return [
        FeatureKey(
            checkpoint_sha256=info.sha256,
            branch=info.branch or "",
            arch=backbone.arch + _stem_suffix(info.cifar_stem, info.stem_padding),
            dataset=split.dataset,
            dataset_fingerprint=split.fingerprint,
            split=split.split,
            # Unnormalised-input networks (SimCLR v1) see [0, 1] pixels: another input, another key;
            # every other key is the transform's fingerprint as before.
            transform=transform.fingerprint_for(imagenet_norm=backbone.input_normalised),
            layer=layer,
            dtype=dtype,
        )
        for layer in layers
    ]


def extract(
    backbone: LoadedBackbone,
    split: DatasetSplit,
    transform: EvalTransform,
    layers: Sequence[str],
    cache: FeatureCache,
    options: ExtractOptions,
    stats: ExtractStats | None = None,
) -> dict[str, CachedFeatures]:
    """Features of ``layers`` for every image of ``split``, from the cache when present.

    Only the missing layers are computed, in one pass. Raises BadInput for an unreadable image
    (named by path) or when the cache's disk cannot hold the result.
    """
    stats = stats if stats is not None else ExtractStats()
    backbone.backbone.check_layers(layers)
    keys = feature_keys(backbone, split, transform, layers, options.cache_dtype)
    stats.cache_dtype = options.cache_dtype
    if not _missing(cache, keys):
        return _cache_hit(cache, keys, split, options)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    with cache.locked(keys[0], rank):
        # Under the lock, look again: another process may have just written what we need.
        missing = _missing(cache, keys)
        if world > 1:
            shared = [missing]
            dist.broadcast_object_list(shared, src=0)  # every rank extracts what rank 0 found missing
            missing = shared[0]
        if not missing:
            return _cache_hit(cache, keys, split, options)
        stats.cache_hit = False
        exposed = backbone.backbone.layers()
        dims = {k.layer: exposed[k.layer].dim for k in missing}
        cache.check_space(
            entry_bytes(len(split), dims, options.cache_dtype),
            f"{'+'.join(dims)} for {len(split):,} {split.display_name} images",
            options.cache_dtype,
            layers=len(dims),
        )
        started = time.perf_counter()
        job = cache.job(missing, len(split), dims, world, rank)
        if rank == 0:
            job.create_or_resume()
        if world > 1:
            dist.barrier()
            if rank != 0:
                job.attach()
        begin, end = job.shard()
        resume = job.resume_row()
        if resume > begin:
            log(f"resuming extraction at image {resume:,} of {end:,}")
        try:
            _run_forward(backbone, split, transform, job, resume, end, options, stats)
        except OutOfFloat16Range:
            if rank == 0:
                job.discard()  # it would refuse again on every resume: `cache ls` must not offer it
            raise
        job.commit(end, force=True)
        if world > 1:
            dist.barrier()
        if rank == 0:
            job.finalize({"dataset_root": str(split.root), "synthetic": split.synthetic})
        if world > 1:
            dist.barrier()
    stats.seconds += time.perf_counter() - started
    stats.layers = [k.layer for k in missing]
    out = {}
    for key in keys:
        entry = cache.lookup(key)
        if entry is None:  # pragma: no cover - finalize failed without raising
            raise RuntimeError(f"feature cache entry for {key.layer} was not written")
        out[key.layer] = entry
    _refuse_skipped_unless_allowed(out, options)
    return out


def _missing(cache: FeatureCache, keys: list[FeatureKey]) -> list[FeatureKey]:
    return [k for k in keys if cache.lookup(k) is None]


def _cache_hit(
    cache: FeatureCache, keys: list[FeatureKey], split: DatasetSplit, options: ExtractOptions
) -> dict[str, CachedFeatures]:
    found = {k.layer: cache.lookup(k) for k in keys}
    _refuse_skipped_unless_allowed(found, options)
    log(
        f"cache hit: {split.display_name} {split.split} {', '.join(found)} ({len(split)} images, no forward pass)"
    )
    return found  # type: ignore[return-value]


def _refuse_skipped_unless_allowed(found: dict[str, CachedFeatures | None], options: ExtractOptions) -> None:
    """Entries made with --skip-corrupt lack some images: never hand them out silently."""
    for entry in found.values():
        if entry is not None and entry.skipped and not options.skip_corrupt:
            first = entry.skipped[0]
            raise BadInput(
                f"unreadable image {first['path']}: {first['reason']} ({len(entry.skipped)} in this split); "
                "replace the files, or pass --skip-corrupt to leave them out (they are listed in the record)"
            )


def _run_forward(
    backbone: LoadedBackbone,
    split: DatasetSplit,
    transform: EvalTransform,
    job,
    begin: int,
    end: int,
    options: ExtractOptions,
    stats: ExtractStats,
) -> None:
    if begin >= end:
        return
    device = torch.device(options.device)
    extractor = backbone.backbone.extractor(job.layers).to(device).eval()
    extractor = extractor.to(memory_format=torch.channels_last)
    dataset = Subset(ImageList(split.samples, transform), range(begin, end))
    loader = DataLoader(
        dataset,
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=options.workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if options.workers > 0 else None,
    )
    done = begin
    with make_progress() as progress, torch.inference_mode():
        task = progress.add_task(f"extract {split.display_name} {split.split}", total=end - begin)
        for batch in loader:
            for index, reason in batch.errors:
                path = split.samples[index][0]
                if not options.skip_corrupt:
                    raise BadInput(
                        f"unreadable image {path}: {reason} (a truncated or corrupt file: replace it, or "
                        "pass --skip-corrupt to leave such images out; they are listed in the record)"
                    )
                job.skip(index, path, reason)
            if batch.images is not None:
                images = batch.images.to(device, non_blocking=True)
                pooled = extractor(normalize_batch(images, imagenet_norm=backbone.input_normalised))
                job.write(
                    batch.indices.numpy(),
                    {k: v.float().cpu().numpy() for k, v in pooled.items()},
                    batch.labels.numpy().astype(np.int64),
                )
            job.commit(batch.end)
            stats.images += len(batch.indices)
            progress.advance(task, batch.end - done)
            done = batch.end
