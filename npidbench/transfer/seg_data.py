"""Segmentation images for training and testing (PROTOCOLS.md "Segmentation"; mmseg pipelines).

Training: random rescale (ratio 0.5-2.0 of a (long, short) scale, aspect kept), a random crop in
which no class covers more than 75% of the labelled pixels (up to 10 tries), flip, photometric
distortion, padding to the crop (image 0, mask 255). Every draw is seeded by (seed, pass,
index). Testing: the image rescaled to the test scale, aspect kept; the prediction is resized
back to the mask's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from npidbench.data.images import decode_error_reason, decode_rgb
from npidbench.data.splits import SegmentationSplit
from npidbench.data.voc import read_voc_mask
from npidbench.errors import BadInput
from npidbench.pretrain.data import mix_seed

PRELOAD_LIMIT = 5_000


def read_mask(split: SegmentationSplit, path: str) -> np.ndarray:
    """A mask as train ids (uint8, ``split.ignore_index`` for void)."""
    try:
        if split.dataset in ("voc12", "voc12aug"):
            return read_voc_mask(path)
        with Image.open(path) as image:
            mask = np.array(image)
    except (OSError, ValueError) as exc:
        raise BadInput(f"unreadable mask {path}: {exc}") from exc
    if mask.ndim != 2:
        raise BadInput(f"{path}: a mask must be one channel of class ids, got shape {mask.shape}")
    return split.label_map[mask] if split.label_map is not None else mask.astype(np.uint8)


def keep_ratio_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's rescale_size: the largest size that fits (long, short) = ``scale``, aspect kept."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


@dataclass(frozen=True)
class SegAugment:
    scale: tuple[int, int] = (2048, 512)  # (long, short) before the random ratio
    ratio: tuple[float, float] = (0.5, 2.0)
    crop: int = 512
    cat_max_ratio: float = 0.75
    photometric: bool = True


class SegTrainImages(Dataset):
    """Item ``code`` = pass * len + index -> (uint8 image crop, int64 mask crop, error or None)."""

    def __init__(self, split: SegmentationSplit, augment: SegAugment, seed: int) -> None:
        self.split, self.augment, self.seed = split, augment, seed
        self.cache: list[tuple[torch.Tensor, np.ndarray]] | None = None
        if len(split) <= PRELOAD_LIMIT:
            self.cache = [self._load_or_raise(i) for i in range(len(split))]

    def _load(self, index: int) -> tuple[torch.Tensor, np.ndarray]:
        image_path, mask_path = self.split.pairs[index]
        image = decode_rgb(image_path)
        mask = read_mask(self.split, mask_path)
        if tuple(image.shape[-2:]) != mask.shape:
            raise BadInput(f"{mask_path} is {mask.shape[1]}x{mask.shape[0]}, its image {image_path} is not")
        return image, mask

    def _load_or_raise(self, index: int) -> tuple[torch.Tensor, np.ndarray]:
        try:
            return self._load(index)
        except (RuntimeError, OSError, ValueError) as exc:
            raise BadInput(
                f"unreadable image {self.split.pairs[index][0]}: {decode_error_reason(exc)}"
            ) from exc

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, code: int) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
        pass_number, index = divmod(code, len(self.split))
        try:
            image, mask = self.cache[index] if self.cache is not None else self._load(index)
        except (RuntimeError, OSError, ValueError) as exc:
            return None, None, f"{self.split.pairs[index][0]}: {decode_error_reason(exc)}"
        rng = np.random.default_rng(mix_seed(self.seed, pass_number, index))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, pass_number, index, 1))
            return (*augment_pair(image, torch.from_numpy(mask.astype(np.int64)), self.augment, rng), None)


def augment_pair(
    image: torch.Tensor, mask: torch.Tensor, augment: SegAugment, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    ratio = rng.uniform(*augment.ratio)
    scale = (int(augment.scale[0] * ratio), int(augment.scale[1] * ratio))
    size = list(keep_ratio_size(image.shape[-2], image.shape[-1], scale))
    image = TF.resize(image, size, antialias=True)
    mask = TF.resize(mask[None], size, interpolation=TF.InterpolationMode.NEAREST)[0]
    crop = augment.crop
    for _ in range(10):  # mmseg RandomCrop with cat_max_ratio
        top = int(rng.integers(0, max(size[0] - crop, 0) + 1))
        left = int(rng.integers(0, max(size[1] - crop, 0) + 1))
        window = mask[top : top + crop, left : left + crop]
        counts = torch.bincount(window[window != 255].flatten())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < augment.cat_max_ratio:
            break
    image = image[:, top : top + crop, left : left + crop]
    mask = mask[top : top + crop, left : left + crop]
    if rng.random() < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    if augment.photometric:
        image = photometric_distortion(image, rng)
    pad_h, pad_w = crop - image.shape[-2], crop - image.shape[-1]
    if pad_h > 0 or pad_w > 0:
        image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), value=0)
        mask = torch.nn.functional.pad(mask, (0, pad_w, 0, pad_h), value=255)
    return image.contiguous(), mask.contiguous()


def photometric_distortion(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion, each with probability 1/2: brightness +-32, contrast and
    saturation x[0.5, 1.5], hue +-18 of 180 (OpenCV units); contrast first or last at random."""
    x = image.float()
    if rng.random() < 0.5:
        x = (x + rng.uniform(-32, 32)).clamp(0, 255)
    contrast_first = rng.random() < 0.5

    def contrast(x: torch.Tensor) -> torch.Tensor:
        return (x * rng.uniform(0.5, 1.5)).clamp(0, 255) if rng.random() < 0.5 else x

    if contrast_first:
        x = contrast(x)
    if rng.random() < 0.5:
        x = TF.adjust_saturation(x / 255, rng.uniform(0.5, 1.5)) * 255
    if rng.random() < 0.5:
        x = TF.adjust_hue(x / 255, rng.uniform(-18, 18) / 180) * 255
    if not contrast_first:
        x = contrast(x)
    return x.round().clamp(0, 255).to(torch.uint8)


def collate_seg(items: list) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
    for item in items:
        if item[2] is not None:
            return None, None, item[2]
    return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]), None
