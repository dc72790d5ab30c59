"""Detection images and targets for torchvision's detectors.

Training targets follow detectron2's dataset mappers: VOC boxes are made 0-based (x1 - 1,
y1 - 1, as detectron2's VOC loader), difficult objects are kept, COCO crowd objects are left
out, boxes of width or height <= 0 dropped; a horizontal flip with probability 1/2 seeded by
(seed, pass, index). The resize to the drawn short side happens inside the model
(GeneralizedRCNNTransform).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from npidbench.data.coco import decode_segmentation
from npidbench.data.images import decode_error_reason, decode_rgb
from npidbench.data.splits import DetectionImage, DetectionSplit
from npidbench.pretrain.data import mix_seed


def training_target(image: DetectionImage, dataset: str, masks: bool) -> dict[str, torch.Tensor]:
    keep = ~image.crowd
    boxes = image.boxes[keep].astype(np.float32).copy()
    if dataset == "voc":
        boxes[:, :2] -= 1.0  # VOC pixel indices are 1-based
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    target = {
        "boxes": torch.from_numpy(boxes[valid]).reshape(-1, 4),
        "labels": torch.from_numpy(image.labels[keep][valid] + 1),  # 0 is the background
    }
    if masks:
        segmentations = [s for s, k in zip(image.segmentations or [], keep, strict=False) if k]
        decoded = [decode_segmentation(s, image.height, image.width) for s in segmentations]
        stack = np.stack(decoded) if decoded else np.zeros((0, image.height, image.width), dtype=np.uint8)
        target["masks"] = torch.from_numpy(stack[valid[: len(stack)]] if len(stack) else stack)
    return target


class DetectionImages(Dataset):
    """Item ``code`` = pass * len + index -> (uint8 image, target, error or None)."""

    def __init__(self, split: DetectionSplit, seed: int, masks: bool) -> None:
        self.split, self.seed, self.masks = split, seed, masks

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, code: int) -> tuple[torch.Tensor | None, dict | None, str | None]:
        pass_number, index = divmod(code, len(self.split))
        image = self.split.images[index]
        try:
            pixels = decode_rgb(image.path)
        except (RuntimeError, OSError, ValueError) as exc:
            return None, None, f"{image.path}: {decode_error_reason(exc)}"
        target = training_target(image, self.split.dataset, self.masks)
        if np.random.default_rng(mix_seed(self.seed, pass_number, index)).random() < 0.5:
            width = pixels.shape[-1]
            pixels = pixels.flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
            target["boxes"] = boxes
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return pixels, target, None


def collate_detection(items: list) -> tuple[list[torch.Tensor], list[dict], str | None]:
    for item in items:
        if item[2] is not None:
            return [], [], item[2]
    return [i[0] for i in items], [i[1] for i in items], None
