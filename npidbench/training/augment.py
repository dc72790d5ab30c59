"""Training images for the supervised protocols (linear probes, semi-supervised fine-tuning).

Augmentations per PROTOCOLS.md "Linear probes" / "Semi-supervised": torchvision's v2 transforms
on uint8 tensors. Every random draw of an image comes from a generator seeded by (seed, epoch,
index), so a resumed run and a run on another number of processes see the same augmented image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torchvision.transforms.v2 as T

from npidbench.data.images import IMAGENET_STD, decode_error_reason, decode_rgb
from npidbench.data.splits import DatasetSplit
from npidbench.pretrain.data import SplitImages, mix_seed, seeded_cpu_rng

Augmentation = Literal["rrc", "rrc-jitter-lighting", "places"]  # a config field's type
AUGMENTATIONS: tuple[str, ...] = get_args(Augmentation)

# PCA of ImageNet RGB pixels (Krizhevsky et al. 2012), as used by fb.resnet.torch and mmselfsup's
# Lighting transform: eigenvalues and eigenvectors (columns) in [0, 1] pixel units.
_PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
_PCA_EIGVEC = torch.tensor(
    [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
)


@dataclass(frozen=True)
class TrainAugment:
    """A protocol's training augmentation.

    ``rrc``: RandomResizedCrop(crop) + flip (MoCo's linear protocol, iNat, fine-tuning).
    ``rrc-jitter-lighting``: + ColorJitter(0.4, 0.4, 0.4) and PCA lighting (mmselfsup ImageNet).
    ``places``: resize ``resize``, center crop ``resize``, random crop ``crop`` + flip (Places205).
    """

    kind: Augmentation = "rrc"
    crop: int = 224
    resize: int = 256
    color_jitter: float = 0.4
    lighting: float = 0.1  # standard deviation of the PCA lighting weights
    # The random crop's resize: bilinear (torchvision's default: the ResNet protocols, DINO's
    # eval_linear) or bicubic (MAE's linprobe and DINOv2's linear, PROTOCOLS-ARCH.md section 2).
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.kind not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.kind}; choose one of {', '.join(AUGMENTATIONS)}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"unknown interpolation {self.interpolation}; choose bilinear or bicubic")
        if self.crop < 1 or self.resize < self.crop:
            raise ValueError(f"need 1 <= crop <= resize, got crop {self.crop}, resize {self.resize}")

    def build(self) -> T.Compose:
        if self.kind == "places":
            steps = [
                T.Resize(self.resize, antialias=True),
                T.CenterCrop(self.resize),
                T.RandomCrop(self.crop),
            ]
        else:
            mode = (
                T.InterpolationMode.BICUBIC
                if self.interpolation == "bicubic"
                else T.InterpolationMode.BILINEAR
            )
            steps = [T.RandomResizedCrop(self.crop, interpolation=mode, antialias=True)]
        steps.append(T.RandomHorizontalFlip())
        if self.kind == "rrc-jitter-lighting" and self.color_jitter > 0:
            jitter = self.color_jitter
            steps.append(T.ColorJitter(jitter, jitter, jitter))
        return T.Compose(steps)

    @property
    def uses_lighting(self) -> bool:
        return self.kind == "rrc-jitter-lighting" and self.lighting > 0


class TrainImages(SplitImages):
    """(uint8 augmented image or None, label, lighting offset, error) per index, deterministic per
    (seed, epoch, index). Decoding errors travel to the main process, which names the file."""

    def __init__(
        self, split: DatasetSplit, augment: TrainAugment, seed: int, extra: Callable | None = None
    ) -> None:
        """``extra``: a transform of the augmented uint8 image after ``augment`` (MAE's
        RandAugment), drawing from the same per-image seed."""
        self.augment = augment
        transform = augment.build() if extra is None else T.Compose([augment.build(), extra])
        super().__init__(split, transform, seed)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, torch.Tensor, int, str | None]:
        label = self.split.samples[index][1]
        if self.images is not None:
            image = self.images[index]
        else:
            try:
                image = decode_rgb(self.split.samples[index][0])
            except (RuntimeError, OSError, ValueError) as exc:
                return None, label, torch.zeros(3), index, decode_error_reason(exc)
        with seeded_cpu_rng(mix_seed(self.seed, self.epoch, index)):
            out = self.transform(image)
            offset = torch.zeros(3)
            if self.augment.uses_lighting:
                alpha = torch.randn(3) * self.augment.lighting
                offset = _PCA_EIGVEC @ (alpha * _PCA_EIGVAL)
        return out, label, offset, index, None


@dataclass
class TrainBatch:
    images: torch.Tensor | None  # uint8 (B, 3, H, W); None when an image could not be read
    labels: torch.Tensor
    lighting: torch.Tensor  # (B, 3) RGB offsets in [0, 1] pixel units
    error: tuple[int, str] | None = None  # (index, reason) of the first unreadable image


def collate_train(items: list[tuple[torch.Tensor | None, int, torch.Tensor, int, str | None]]) -> TrainBatch:
    """Stack a batch. An unreadable image is carried as an error rather than raised in a worker
    (where it would reach the user as a wrapped traceback)."""
    labels = torch.tensor([item[1] for item in items], dtype=torch.long)
    for item in items:
        if item[4] is not None:
            return TrainBatch(None, labels, torch.zeros(len(items), 3), (item[3], item[4]))
    return TrainBatch(
        torch.stack([item[0] for item in items]), labels, torch.stack([item[2] for item in items])
    )


def apply_lighting(
    normalised: torch.Tensor, offsets: torch.Tensor, *, imagenet_norm: bool = True
) -> torch.Tensor:
    """Add the PCA lighting offsets to an ImageNet-normalised batch (the offset is in [0, 1]
    pixel units, so it is divided by the channel's std). Applying it after normalisation rather
    than before on uint8 avoids rounding the small offsets away. ``imagenet_norm=False``: the
    batch is in [0, 1] pixel units already and the offsets are added as they are."""
    if not imagenet_norm:
        return normalised + offsets.to(normalised.device, normalised.dtype).view(-1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=normalised.device, dtype=normalised.dtype)
    shift = (offsets.to(normalised.device, normalised.dtype) / std).view(-1, 3, 1, 1)
    return normalised + shift
