"""Decode and resize images for evaluation, fast, and report unreadable files by path.

Decoding uses torchvision.io (libjpeg-turbo, libpng) and resizing torchvision's tensor
transforms on uint8 with antialiasing, which track PIL's results closely and cost a fraction of
PIL's time on a small CPU. Workers hand back uint8 tensors (4x less inter-process traffic than
float); normalisation happens on the batch in the main process (``normalize_batch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.io
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalTransform:
    """Deterministic evaluation resize.

    ``center-crop``: short side to ``resize``, then a center crop of ``crop`` (linear probes, kNN).
    ``squash``: short side to ``resize``, then exactly ``crop`` x ``crop`` without cropping, the
    aspect ratio not kept (the VOC07 SVM protocol, PROTOCOLS.md "Multi-layer features").
    """

    resize: int = 256
    crop: int = 224
    mode: str = "center-crop"
    # bilinear: the ResNet protocols; bicubic: DINO's / DINOv2's / timm's ViT and ConvNeXt
    # evaluation (Resize(256, interpolation=3), PROTOCOLS-ARCH.md section 2): Backbone.interpolation
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.mode not in ("center-crop", "squash"):
            raise ValueError(f"unknown resize mode {self.mode}; choose center-crop or squash")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"unknown interpolation {self.interpolation}; choose bilinear or bicubic")

    @property
    def fingerprint(self) -> str:
        """What the feature cache keys on: any change here is a different feature."""
        return self.fingerprint_for(imagenet_norm=True)

    def fingerprint_for(self, imagenet_norm: bool) -> str:
        """The fingerprint of this resize followed by ``normalize_batch(imagenet_norm=...)``:
        pixels in [0, 1] without mean/std are another network input, hence other features."""
        scaling = "imagenet-norm" if imagenet_norm else "unit-range"
        return f"{self.mode}:resize{self.resize}:crop{self.crop}:{self.interpolation}-aa:{scaling}:v1"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        mode = (
            TF.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
        )
        image = TF.resize(image, [self.resize], interpolation=mode, antialias=True)
        if self.mode == "squash":
            return TF.resize(image, [self.crop, self.crop], interpolation=mode, antialias=True)
        return TF.center_crop(image, [self.crop, self.crop])


def decode_rgb(path: str | Path) -> torch.Tensor:
    """A file's pixels as a uint8 RGB tensor (C, H, W). Raises on unreadable data."""
    data = torchvision.io.read_file(str(path))
    image = torchvision.io.decode_image(data, mode=torchvision.io.ImageReadMode.RGB)
    if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16: rescale, do not truncate
        image = TF.to_dtype(image, torch.uint8, scale=True)
    return image


class ImageList(Dataset):
    """(path, label) samples decoded through a transform.

    ``__getitem__`` never raises for a bad image: it returns the error with the path so that the
    main process can stop with one clear line (an exception raised inside a DataLoader worker
    reaches the user as a wrapped traceback).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: EvalTransform) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, int, str | None]:
        path, label = self.samples[index]
        try:
            image = self.transform(decode_rgb(path))
        except (RuntimeError, OSError, ValueError) as exc:
            return None, label, index, decode_error_reason(exc)
        return image, label, index, None


def decode_error_reason(exc: BaseException) -> str:
    """torchvision's decoders prefix messages with their C++ source location: keep the reason."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.split(",")[-1].strip() if ".cpp:" in text else text


@dataclass
class Batch:
    images: torch.Tensor | None  # uint8 (B, 3, H, W) of the readable images
    labels: torch.Tensor
    indices: torch.Tensor
    errors: list[tuple[int, str]]  # (index, reason) of unreadable images
    end: int  # one past the last index of the batch, readable or not


def collate(items: list[tuple[torch.Tensor | None, int, int, str | None]]) -> Batch:
    """Stack the decoded images; carry decoding errors along instead of raising in a worker."""
    good = [item for item in items if item[3] is None]
    return Batch(
        images=torch.stack([item[0] for item in good]) if good else None,
        labels=torch.tensor([item[1] for item in good], dtype=torch.long),
        indices=torch.tensor([item[2] for item in good], dtype=torch.long),
        errors=[(item[2], item[3]) for item in items if item[3] is not None],
        end=max(item[2] for item in items) + 1,
    )


def normalize_batch(
    images: torch.Tensor, dtype: torch.dtype = torch.float32, *, imagenet_norm: bool = True
) -> torch.Tensor:
    """uint8 (B,3,H,W) -> ImageNet-normalised float, channels-last (faster convolutions).

    ``imagenet_norm=False``: pixels scaled to [0, 1] only, for networks trained without mean/std
    (SimCLR v1's converted models, ``Inspection.input_normalised``)."""
    if not imagenet_norm:
        return (images.to(dtype) / 255).contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    out = (images.to(dtype) - mean) / std
    return out.contiguous(memory_format=torch.channels_last)
