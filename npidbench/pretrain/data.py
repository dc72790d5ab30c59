"""Training images for NPID: the paper's augmentation, deterministic per (seed, epoch, image).

Every random draw of an image's augmentation comes from a generator seeded by (seed, epoch,
index), and the epoch order from (seed, epoch): the batches do not depend on the number of
processes or workers, and a resumed run sees exactly what an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torchvision.transforms.v2 as T
from torch.utils.data import Dataset, Sampler

from npidbench.data.images import decode_error_reason, decode_rgb
from npidbench.data.splits import DatasetSplit
from npidbench.errors import BadInput
from npidbench.pretrain.archs import fit_to_patches
from npidbench.pretrain.recipe import Recipe

PRELOAD_LIMIT = 20_000  # splits up to this size are decoded once and kept in memory (the synthetic ones)


def paper_augmentation(recipe: Recipe) -> T.Compose:
    """RandomResizedCrop, RandomGrayscale, ColorJitter, flip (PROTOCOLS.md "NPID pretraining").
    A ViT's crops are a whole number of patches (archs.fit_to_patches: 56 px -> 64 for patch 16)."""
    jitter = recipe.color_jitter
    return T.Compose(
        [
            T.RandomResizedCrop(
                fit_to_patches(recipe.arch, recipe.input_size), scale=tuple(recipe.crop_scale), antialias=True
            ),
            T.RandomGrayscale(p=recipe.grayscale),
            T.ColorJitter(jitter, jitter, jitter, min(jitter, 0.5)),
            T.RandomHorizontalFlip(),
        ]
    )


class SplitImages(Dataset):
    """A split's training images under ``transform``, augmented per (seed, ``epoch``, index) by
    the subclass's ``__getitem__``; a small split (the synthetic pools) is decoded once and kept
    in memory (``images``), an unreadable image there is a BadInput naming the file."""

    def __init__(self, split: DatasetSplit, transform: T.Compose, seed: int) -> None:
        self.split, self.transform, self.seed = split, transform, seed
        self.epoch = 0
        self.images: list[torch.Tensor] | None = None
        if len(split) <= PRELOAD_LIMIT:
            self.images = [self.decode(i) for i in range(len(split))]

    def decode(self, index: int) -> torch.Tensor:
        path = self.split.samples[index][0]
        try:
            return decode_rgb(path)
        except (RuntimeError, OSError, ValueError) as exc:
            raise BadInput(f"unreadable training image {path}: {decode_error_reason(exc)}") from exc

    def __len__(self) -> int:
        return len(self.split)


class AugmentedImages(SplitImages):
    """(uint8 augmented image, dataset index) with the paper's augmentation."""

    def __init__(self, split: DatasetSplit, recipe: Recipe) -> None:
        super().__init__(split, paper_augmentation(recipe), recipe.seed)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index] if self.images is not None else self.decode(index)
        with seeded_cpu_rng(mix_seed(self.seed, self.epoch, index)):
            return self.transform(image), index


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (seed, epoch, image index): independent streams."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & (2**63 - 1)
    return value


@contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """The CPU generator that CPU-side transforms draw from, seeded with ``seed`` inside the block
    and restored after it; CUDA's is left alone. torch.manual_seed would also seed CUDA, and in a
    CUDA build whose CUDA is not initialised it queues that call with a formatted stack trace
    each time (104 us against 1.3 us here, per image); the CPU draws are the same."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def epoch_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch, 7))
    return torch.randperm(size, generator=generator)


class ShardSampler(Sampler[int]):
    """This rank's indices of an epoch, from a given step on. Global batch g is made of
    order[g * B : (g + 1) * B]; rank r takes every world-th of them (r, r + world, ...), so the
    union of the ranks' batches is the single-process batch. The last incomplete batch is dropped."""

    def __init__(
        self, size: int, global_batch: int, seed: int, epoch: int, start_step: int, rank: int, world: int
    ) -> None:
        self.order = epoch_order(size, seed, epoch)
        self.steps = size // global_batch
        self.global_batch, self.start_step, self.rank, self.world = global_batch, start_step, rank, world

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            batch = self.order[step * self.global_batch : (step + 1) * self.global_batch]
            yield from batch[self.rank :: self.world].tolist()

    def __len__(self) -> int:
        return (self.steps - self.start_step) * (self.global_batch // self.world)
