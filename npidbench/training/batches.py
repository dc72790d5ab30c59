"""Batches for the supervised protocols: augmented training images, evaluation images, and
cached feature rows, each sharded over torchrun's processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from npidbench.data.images import EvalTransform, ImageList, collate, normalize_batch
from npidbench.data.splits import DatasetSplit
from npidbench.distributed import DistInfo
from npidbench.errors import BadInput
from npidbench.pretrain.data import mix_seed
from npidbench.training.augment import TrainBatch, TrainImages, apply_lighting, collate_train
from npidbench.training.loop import epoch_indices


def augmented_batches(
    images: TrainImages,
    world: DistInfo,
    batch_size: int,
    workers: int,
    device: torch.device,
    *,
    drop_last: bool = False,
) -> Callable[[int], Iterator[TrainBatch]]:
    """epoch -> this rank's augmented batches (``batch_size`` per process); ``drop_last``: without
    the last partial batch, as MAE's and DINOv2's loaders (a BatchNorm head cannot train on one
    image)."""
    if drop_last and len(epoch_indices(len(images), world, images.seed, 0)) < batch_size:
        raise BadInput(
            f"{len(images)} training images give no full batch of {batch_size} per process "
            "(this protocol drops partial batches): lower the batch size with --set"
        )

    def for_epoch(epoch: int) -> Iterator[TrainBatch]:
        images.epoch = epoch
        order = epoch_indices(len(images), world, images.seed, epoch)
        loader = DataLoader(
            images,
            batch_size=batch_size,
            sampler=order,
            num_workers=0 if images.images is not None else workers,
            collate_fn=collate_train,
            pin_memory=device.type == "cuda",
            drop_last=drop_last,
        )
        for batch in loader:
            if batch.error is not None:
                index, reason = batch.error
                raise BadInput(
                    f"unreadable training image {images.split.samples[index][0]}: {reason} (replace the file)"
                )
            yield batch

    return for_epoch


def training_input(batch: TrainBatch, device: torch.device, *, imagenet_norm: bool = True) -> torch.Tensor:
    """uint8 batch -> normalised float on ``device`` with the batch's PCA lighting applied
    (``imagenet_norm=False``: pixels in [0, 1] without mean/std, ``LoadedBackbone.input_normalised``)."""
    assert batch.images is not None
    images = normalize_batch(batch.images.to(device, non_blocking=True), imagenet_norm=imagenet_norm)
    if batch.lighting.abs().sum() > 0:
        images = apply_lighting(images, batch.lighting, imagenet_norm=imagenet_norm)
    return images


def eval_batches(
    split: DatasetSplit, transform: EvalTransform, world: DistInfo, batch_size: int, workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share (every world-th image) of ``split`` as (uint8 images, labels)."""
    shard = list(range(world.rank, len(split), world.world_size))
    dataset = ImageList([split.samples[i] for i in shard], transform)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    for batch in loader:
        if batch.errors:
            index, reason = batch.errors[0]
            raise BadInput(f"unreadable image {split.samples[shard[index]][0]}: {reason} (replace the file)")
        yield batch.images, batch.labels


def row_batches(
    size: int, world: DistInfo, batch_size: int, seed: int
) -> Callable[[int], Iterator[torch.Tensor]]:
    """epoch -> this rank's batches of row indices into cached feature arrays."""

    def for_epoch(epoch: int) -> Iterator[torch.Tensor]:
        order = torch.tensor(epoch_indices(size, world, seed, epoch), dtype=torch.long)
        yield from order.split(batch_size)

    return for_epoch


def stream_codes(size: int, seed: int, start: int, count: int) -> list[int]:
    """Positions ``start .. start + count`` of an endless stream of seeded passes over ``size``
    items, each as ``pass * size + index`` (iteration-based schedules: detection, segmentation)."""
    codes = []
    position = start
    while position < start + count:
        number, offset = divmod(position, size)
        generator = torch.Generator().manual_seed(mix_seed(seed, number, 11))
        order = torch.randperm(size, generator=generator)
        take = min(size - offset, start + count - position)
        codes.extend((number * size + order[offset : offset + take]).tolist())
        position += take
    return codes


def window_batches(
    dataset: Dataset,
    size: int,
    world: DistInfo,
    global_batch: int,
    iterations: int,
    seed: int,
    workers: int,
    collate,
) -> Callable[[int], Iterator]:
    """window -> this rank's batches of the window's ``iterations`` steps: global batch g takes
    stream positions [g * B, (g + 1) * B), rank r every world-th of them."""

    def for_window(window: int) -> Iterator:
        codes = stream_codes(size, seed, window * iterations * global_batch, iterations * global_batch)
        local = [
            code
            for step in range(iterations)
            for code in codes[step * global_batch : (step + 1) * global_batch][world.rank :: world.world_size]
        ]
        yield from DataLoader(
            dataset,
            batch_size=global_batch // world.world_size,
            sampler=local,
            num_workers=workers,
            collate_fn=collate,
        )

    return for_window
