"""The neck and decode heads of the ViT / ConvNeXt segmentation protocols (PROTOCOLS-ARCH.md
section 3), written from torch parts after the facts of mmsegmentation and DINOv2, not their code.

- ``Feature2Pyramid`` (mmseg necks/featurepyramid.py): one ViT map per chosen block, rescaled by
  4, 2, 1 and 0.5: x4 = ConvTranspose2d(k2, s2) + BN + GELU + ConvTranspose2d(k2, s2); x2 = one
  ConvTranspose2d(k2, s2); x1 the map; x0.5 MaxPool2d(2). Its norm is the configs' norm_cfg, SyncBN
  (configs/_base_/models/upernet_mae.py): BatchNorm2d here, SyncBN under torchrun.
- ``UPerHead`` (mmseg decode_heads/uper_head.py, psp_head.py PPM): the PSP pooling module on the
  last level (adaptive average pools 1, 2, 3, 6, each a 1x1 ConvModule, upsampled and concatenated
  with the level, a 3x3 bottleneck), 1x1 lateral ConvModules on the other levels, the top-down sum,
  3x3 FPN ConvModules, every level upsampled to the first and fused by a 3x3 ConvModule, then the
  classifier. mmseg's ConvModule is conv (no bias) + BN + ReLU: ``ConvBNReLU``.
- ``BNHead`` (DINOv2 eval/segmentation/models/decode_heads/linear_head.py): BN over the
  concatenated maps, then a 1x1 classifier. iBOT's linear head (evaluation/semantic_segmentation/
  configs/linear/vit_base_512_ade20k_160k.py: FCNHead with num_convs=0) is the 1x1 conv without
  the BN.
Every classifier is mmseg's cls_seg: dropout (0.1; 0 in the linear heads), a 1x1 conv initialised
normal(0, 0.01) with zero bias (BaseDecodeHead.init_weights). Upsampling is bilinear with the
heads' align_corners (False in every config here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from npidbench.transfer.segmentation import ConvBNReLU

PYRAMID_RESCALES = (4, 2, 1, 0.5)  # mmseg MAE / BEiT configs: neck rescales
POOL_SCALES = (1, 2, 3, 6)  # UPerHead pool_scales


def classifier(channels: int, classes: int) -> nn.Conv2d:
    """mmseg's conv_seg: 1x1, weights normal(0, 0.01), bias 0."""
    conv = nn.Conv2d(channels, classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


def resized(x: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class Feature2Pyramid(nn.Module):
    """Four maps of stride s (the ViT's patch) -> strides s/4, s/2, s, 2s (module docstring)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
            nn.BatchNorm2d(width),
            nn.GELU(),
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(width, width, kernel_size=2, stride=2)
        self.down2 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(maps) != len(PYRAMID_RESCALES):
            raise ValueError(f"Feature2Pyramid takes {len(PYRAMID_RESCALES)} maps, got {len(maps)}")
        return [self.up4(maps[0]), self.up2(maps[1]), maps[2], self.down2(maps[3])]


class UPerHead(nn.Module):
    """UPerNet's head on a pyramid of ``widths`` (shallow to deep) -> logits at the first level."""

    def __init__(
        self, widths: Sequence[int], channels: int, classes: int, align_corners: bool = False
    ) -> None:
        super().__init__()
        self.align_corners = align_corners
        top = widths[-1]
        self.pools = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvBNReLU(top, channels, 1)) for scale in POOL_SCALES
        )
        self.bottleneck = ConvBNReLU(top + len(POOL_SCALES) * channels, channels, 3)
        self.laterals = nn.ModuleList(ConvBNReLU(width, channels, 1) for width in widths[:-1])
        self.fpn = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in widths[:-1])
        self.fuse = ConvBNReLU(len(widths) * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = classifier(channels, classes)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        top = levels[-1]
        pooled = [top] + [resized(pool(top), top.shape[-2:], self.align_corners) for pool in self.pools]
        laterals = [conv(level) for conv, level in zip(self.laterals, levels, strict=False)]
        laterals.append(self.bottleneck(torch.cat(pooled, dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level plus the one above it
            laterals[i - 1] = laterals[i - 1] + resized(
                laterals[i], laterals[i - 1].shape[-2:], self.align_corners
            )
        outs = [conv(lateral) for conv, lateral in zip(self.fpn, laterals, strict=False)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [resized(out, size, self.align_corners) for out in outs[1:]]
        return self.classifier(self.dropout(self.fuse(torch.cat(outs, dim=1))))


class BNHead(nn.Module):
    """DINOv2's linear head: BatchNorm over ``width`` concatenated channels, 1x1 classifier
    (dropout 0)."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(width)
        self.classifier = classifier(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bn(x))
