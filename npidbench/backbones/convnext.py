"""ConvNeXt (Liu et al. 2022) as timm's ConvNeXt, behind the Backbone interface.

Layers: ``Stage<i>`` (1-4) is the global average of stage i's output map (the "pooled stage
outputs" the multi-layer protocols read: no published ConvNeXt SVM protocol exists, records
say so); ``AvgPool`` is the global average of the last stage through the head's LayerNorm
(timm's pre-logits feature, the paper's classifier input): the default global feature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from npidbench.backbones import Backbone, Layer

# The paper's sizes by (depths, first width) (ConvNeXt Table / timm convnext.py model defs).
_NAMES = {
    ((3, 3, 9, 3), 96): "convnext_tiny",
    ((3, 3, 27, 3), 96): "convnext_small",
    ((3, 3, 27, 3), 128): "convnext_base",
    ((3, 3, 27, 3), 192): "convnext_large",
    ((3, 3, 27, 3), 256): "convnext_xlarge",
}


@dataclass(frozen=True)
class ConvNeXtSpec:
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    layer_scale: bool = True  # gamma per block (ls_init_value); ConvNeXt V1 releases have it

    @property
    def name(self) -> str:
        known = _NAMES.get((self.depths, self.dims[0]))
        return known or f"convnext_d{'-'.join(map(str, self.depths))}_w{self.dims[0]}"


def build_convnext(spec: ConvNeXtSpec) -> nn.Module:
    """A randomly initialised timm ConvNeXt of ``spec`` without a classifier (head.fc absent)."""
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(
        depths=spec.depths,
        dims=spec.dims,
        num_classes=0,
        ls_init_value=1e-6 if spec.layer_scale else None,
    )


class ConvNeXtBackbone(Backbone):
    """timm ConvNeXt: Stage1..4 (global averages), AvgPool (head-normed global average)."""

    family = "convnext"
    interpolation = "bicubic"  # the ConvNeXt evaluation (and timm's convnext configs)
    # The frozen-feature protocols (semisup: its logistic-regression method; the ResNet
    # fine-tuning grid is refused by semisup's backbone check) and dense transfer (segmentation:
    # the ConvNeXt repo's UperNet; detection: Mask R-CNN FPN, as the ConvNeXt paper), the ResNet
    # protocols of those refused by the families' backbone checks. The mmselfsup Feature1..5
    # linear protocol is ResNet-only: refused.
    supports = frozenset({"knn", "voc-svm", "frozen-linear", "semisup", "detection", "segmentation"})

    def layers(self) -> dict[str, Layer]:
        dims = [int(stage.blocks[-1].mlp.fc2.out_features) for stage in self.model.stages]
        exposed = {f"Stage{i}": Layer(f"Stage{i}", dim) for i, dim in enumerate(dims, start=1)}
        exposed["AvgPool"] = Layer("AvgPool", dims[-1])
        return exposed

    @property
    def feature_layers(self) -> tuple[str, ...]:
        return ("Stage1", "Stage2", "Stage3", "Stage4")

    @property
    def default_layer(self) -> str:
        return "AvgPool"

    def extractor(self, names: Sequence[str]) -> nn.Module:
        self.check_layers(names)
        return ConvNeXtFeatures(self.model, tuple(names))


class ConvNeXtFeatures(nn.Module):
    """One pass through the stages the names need."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.depth = max(4 if name == "AvgPool" else int(name.removeprefix("Stage")) for name in names)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        m: Any = self.model
        x = m.stem(images)
        maps = {}
        for index, stage in enumerate(m.stages[: self.depth], start=1):
            x = stage(x)
            maps[index] = x
        out = {}
        for name in self.names:
            if name == "AvgPool":
                out[name] = m.forward_head(m.norm_pre(maps[4]), pre_logits=True)
            else:
                out[name] = maps[int(name.removeprefix("Stage"))].mean(dim=(2, 3))
        return out
