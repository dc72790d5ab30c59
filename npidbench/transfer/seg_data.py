"""Segmentation images for training and testing (PROTOCOLS.md "Segmentation"; mmseg 0.x pipelines
as mmselfsup's benchmark configs run them).

Training, in mmseg's order (mmselfsup 0.x configs/benchmarks/mmsegmentation/_base_/datasets/
pascal_voc12.py lines 7-18, cityscapes_769x769.py lines 5-16: Resize -> RandomCrop -> RandomFlip ->
PhotoMetricDistortion -> Normalize -> Pad): random rescale (ratio 0.5-2.0 of a (long, short) scale,
aspect kept, bilinear without antialiasing as cv2), a random crop in which no class covers 75% or
more of the labelled pixels (up to 10 checks), flip, photometric distortion (mmseg's, in OpenCV's
8-bit HSV), padding to the crop. mmseg pads after Normalize (image with 0 in normalised space,
mask with 255); the images here stay uint8 up to the device, so each item carries its valid
(height, width) and ``normalize_crops`` zeroes the padding after normalising. Every draw is seeded
by (seed, pass, index). Testing: the image rescaled to the test scale, aspect kept; the prediction
is resized back to the mask's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from npidbench.data.images import decode_error_reason, decode_rgb, normalize_batch
from npidbench.data.splits import SegmentationSplit
from npidbench.data.voc import read_voc_mask
from npidbench.errors import BadInput
from npidbench.pretrain.data import mix_seed, seeded_cpu_rng

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
    """Item ``code`` = pass * len + index -> (uint8 image crop, int64 mask crop, valid (height,
    width) of the crop before padding, error or None)."""

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

    def __getitem__(
        self, code: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, str | None]:
        pass_number, index = divmod(code, len(self.split))
        try:
            image, mask = self.cache[index] if self.cache is not None else self._load(index)
        except (RuntimeError, OSError, ValueError) as exc:
            return None, None, None, f"{self.split.pairs[index][0]}: {decode_error_reason(exc)}"
        rng = np.random.default_rng(mix_seed(self.seed, pass_number, index))
        with seeded_cpu_rng(mix_seed(self.seed, pass_number, index, 1)):
            image, mask, valid = augment_pair(
                image, torch.from_numpy(mask.astype(np.int64)), self.augment, rng
            )
        return image, mask, torch.tensor(valid, dtype=torch.int64), None


def augment_pair(
    image: torch.Tensor, mask: torch.Tensor, augment: SegAugment, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """mmseg 0.x's train pipeline on one (uint8 (3, H, W) image, (H, W) mask) pair -> the image
    and mask padded to (crop, crop) (image 0, mask 255) and the (height, width) before padding."""
    # Resize(img_scale, ratio_range): ratio = random_sample() * (max - min) + min, scale =
    # int(long * ratio), int(short * ratio), mmcv.imrescale keeping the aspect ratio (cv2 bilinear:
    # no antialiasing when shrinking; the mask nearest).
    ratio = rng.uniform(*augment.ratio)
    scale = (int(augment.scale[0] * ratio), int(augment.scale[1] * ratio))
    size = list(keep_ratio_size(image.shape[-2], image.shape[-1], scale))
    image = TF.resize(image, size, antialias=False)
    mask = TF.resize(mask[None], size, interpolation=TF.InterpolationMode.NEAREST)[0]
    top, left = random_crop_offsets(mask, augment.crop, augment.cat_max_ratio, rng)
    crop = augment.crop
    image = image[:, top : top + crop, left : left + crop]
    mask = mask[top : top + crop, left : left + crop]
    if rng.random() < 0.5:  # RandomFlip(prob=0.5): flip when rand() < prob
        image, mask = image.flip(-1), mask.flip(-1)
    if augment.photometric:
        image = photometric_distortion(image, rng)
    valid = (int(image.shape[-2]), int(image.shape[-1]))
    pad_h, pad_w = crop - valid[0], crop - valid[1]
    if pad_h > 0 or pad_w > 0:  # Pad(size=crop, pad_val=0, seg_pad_val=255): bottom and right
        image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), value=0)
        mask = torch.nn.functional.pad(mask, (0, pad_w, 0, pad_h), value=255)
    return image.contiguous(), mask.contiguous(), valid


def random_crop_offsets(
    mask: torch.Tensor, crop: int, cat_max_ratio: float, rng: np.random.Generator, ignore: int = 255
) -> tuple[int, int]:
    """mmseg 0.x RandomCrop(crop_size, cat_max_ratio): a window drawn uniformly (offsets in [0,
    margin]); while it is checked fewer than 10 times and fails (one class only, or one class with
    a share >= cat_max_ratio of the non-``ignore`` pixels), a new window is drawn. After ten
    failures the eleventh window is kept unchecked, as mmseg does."""

    def draw() -> tuple[int, int]:
        top = int(rng.integers(0, max(mask.shape[0] - crop, 0) + 1))
        left = int(rng.integers(0, max(mask.shape[1] - crop, 0) + 1))
        return top, left

    top, left = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            window = mask[top : top + crop, left : left + crop]
            counts = torch.bincount(window[window != ignore].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return top, left


def normalize_crops(pixels: torch.Tensor, valid: torch.Tensor, *, imagenet_norm: bool = True) -> torch.Tensor:
    """uint8 (B, 3, S, S) crops padded at the bottom and right -> normalised floats with the padding
    exactly 0: mmseg normalises first and pads after (Pad(pad_val=0) follows Normalize).
    ``imagenet_norm=False``: pixels in [0, 1] without mean/std, the padding 0 all the same."""
    images = normalize_batch(pixels, imagenet_norm=imagenet_norm)
    valid = valid.to(images.device)
    rows = torch.arange(images.shape[-2], device=images.device)
    cols = torch.arange(images.shape[-1], device=images.device)
    inside = (rows[None, :, None] < valid[:, 0, None, None]) & (cols[None, None, :] < valid[:, 1, None, None])
    return images.masked_fill_(~inside[:, None], 0.0)


# OpenCV's 8-bit BGR<->HSV (hue range 180), which mmcv.bgr2hsv / hsv2bgr call: the forward
# conversion is fixed point with these tables (imgproc/src/color_hsv.simd.hpp, RGB2HSV_b,
# hsv_shift 12); the backward conversion works in float32 and truncates (HSV2RGB_b's vector path,
# which converts all but the last few pixels of a row block).
_HSV_SHIFT = 12
_SDIV = torch.tensor([0] + [round((255 << _HSV_SHIFT) / i) for i in range(1, 256)], dtype=torch.int32)
_HDIV = torch.tensor([0] + [round((180 << _HSV_SHIFT) / (6 * i)) for i in range(1, 256)], dtype=torch.int32)
_INV255 = torch.tensor(1.0, dtype=torch.float32) / 255
_HSCALE = torch.tensor(6.0, dtype=torch.float32) / 180


def rgb_to_hsv_cv(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) RGB -> uint8 (3, H, W) HSV as cv2.cvtColor(COLOR_BGR2HSV) on the BGR image:
    H in [0, 180), S and V in [0, 255]."""
    r, g, b = image.to(torch.int32).unbind(0)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> _HSV_SHIFT
    h = torch.where(h < 0, h + 180, h)
    return torch.stack([h, s, v]).clamp(0, 255).to(torch.uint8)


def hsv_to_rgb_cv(hsv: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) HSV (H in [0, 180)) -> uint8 RGB as cv2.cvtColor(COLOR_HSV2BGR)."""
    h, s, v = hsv.to(torch.float32).unbind(0)
    h = h * _HSCALE
    sector = h.trunc()
    h = h - sector
    sector = sector - 6 * (sector * (torch.tensor(1.0) / 6)).trunc()
    s, v = s * _INV255, v * _INV255
    one = torch.tensor(1.0)
    tab = (v, v * (one - s), v * (one - s * h), v * (one - s * (one - h)))
    # (b, g, r) taken from tab[...] for sectors 0..5, OpenCV's sector_data table
    order = ((1, 3, 0), (1, 0, 2), (3, 0, 1), (0, 2, 1), (0, 1, 3), (2, 1, 0))
    b, g, r = torch.zeros_like(v), torch.zeros_like(v), torch.zeros_like(v)
    for index, (bi, gi, ri) in enumerate(order):
        here = sector == index
        b = torch.where(here, tab[bi], b)
        g = torch.where(here, tab[gi], g)
        r = torch.where(here, tab[ri], r)
    return (torch.stack([r, g, b]) * 255).trunc().clamp(0, 255).to(torch.uint8)


def _convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion.convert: float32 x * alpha + beta, clipped to [0, 255], then
    astype(uint8), which truncates."""
    return (x.to(torch.float32) * alpha + beta).clamp(0, 255).to(torch.uint8)


def photometric_distortion(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """mmseg 0.x PhotoMetricDistortion on a uint8 (3, H, W) RGB image, each step with probability
    1/2: brightness + U(-32, 32); contrast x U(0.5, 1.5) either second or last (one coin);
    saturation: S x U(0.5, 1.5) in OpenCV's 8-bit HSV; hue: H + randint(-18, 18) (18 excluded, as
    numpy's randint) modulo 180. Every step ends in uint8 (truncating)."""
    if rng.random() < 0.5:
        image = _convert(image, beta=rng.uniform(-32, 32))
    contrast_first = rng.random() < 0.5  # mmseg: mode == 1 -> contrast first

    def contrast(image: torch.Tensor) -> torch.Tensor:
        return _convert(image, alpha=rng.uniform(0.5, 1.5)) if rng.random() < 0.5 else image

    if contrast_first:
        image = contrast(image)
    if rng.random() < 0.5:
        hsv = rgb_to_hsv_cv(image)
        hsv[1] = _convert(hsv[1], alpha=rng.uniform(0.5, 1.5))
        image = hsv_to_rgb_cv(hsv)
    if rng.random() < 0.5:
        hsv = rgb_to_hsv_cv(image)
        hsv[0] = ((hsv[0].to(torch.int64) + int(rng.integers(-18, 18))) % 180).to(torch.uint8)
        image = hsv_to_rgb_cv(hsv)
    if not contrast_first:
        image = contrast(image)
    return image


def collate_seg(
    items: list,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, str | None]:
    """-> (uint8 images, int64 masks, (B, 2) valid heights and widths, error or None)."""
    for item in items:
        if item[3] is not None:
            return None, None, None, item[3]
    return (
        torch.stack([i[0] for i in items]),
        torch.stack([i[1] for i in items]),
        torch.stack([i[2] for i in items]),
        None,
    )
