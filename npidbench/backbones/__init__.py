"""What the benchmarks need from a network, in one interface (``Backbone``), and the registry
of implementations by family.

A ``Backbone`` wraps a strictly loaded ``nn.Module`` without changing it (its state_dict keys
stay the framework's, so conversion and resume states are unaffected) and says: which named
layers it exposes and their pooled sizes, how one forward pass returns only the layers asked
for, which layer the global-feature protocols (kNN, low-shot) read by default, and which
benchmark families it supports. Tasks, feature extraction and cache keys speak to it.

Implemented: torchvision-layout ResNets (``resnet``: the FAIR benchmark's Feature1..5 + AvgPool,
PROTOCOLS.md "Multi-layer features"), plain ViTs (``vit``, backbones/vit.py: CLS, Block<i>,
AvgPatch) and ConvNeXt (``convnext``, backbones/convnext.py: Stage1..4, AvgPool), both on timm.
A family adds a class and an entry in ``FAMILIES``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from npidbench.errors import BadInput


@dataclass(frozen=True)
class Layer:
    """A named feature of a backbone: channels (or token width) and the side of its pooled grid
    (0: a vector, e.g. a global average or a CLS token)."""

    name: str
    channels: int
    grid: int = 0

    @property
    def dim(self) -> int:
        """The flattened size a classifier or SVM sees."""
        return self.channels * self.grid**2 if self.grid else self.channels


class Backbone(ABC):
    """A loaded network as the benchmarks see it (see the module docstring)."""

    family: ClassVar[str]
    # The benchmark families (TaskFamily.name) it runs, others refused in one line; None: every
    # family (the ResNets every protocol, and a plugin family, is written for).
    supports: ClassVar[frozenset[str] | None]

    # The evaluation resize of its framework (EvalTransform.interpolation).
    interpolation: ClassVar[str] = "bilinear"

    @property
    def patch_size(self) -> int:
        """Input sides must be a multiple of this (a ViT's patch; 1: any size)."""
        return 1

    def __init__(self, model: nn.Module, arch: str) -> None:
        self.model = model
        self.arch = arch

    @abstractmethod
    def layers(self) -> dict[str, Layer]:
        """Every exposed layer by name, shallow to deep."""

    @property
    @abstractmethod
    def feature_layers(self) -> tuple[str, ...]:
        """The layers of the multi-layer protocols (VOC07 SVM, the linear FeatureN heads)."""

    @property
    @abstractmethod
    def default_layer(self) -> str:
        """The global feature of kNN and of the pooled-feature heads (AvgPool for a ResNet)."""

    @abstractmethod
    def extractor(self, names: Sequence[str]) -> nn.Module:
        """A module whose forward(images) returns {name: (N, dim) features} for ``names`` only,
        in one pass that stops at the deepest layer asked for."""

    def forward_layers(self, images: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.extractor(names)(images)

    def linear_input(self, last_blocks: int, avgpool: bool) -> tuple[str, ...] | None:
        """The layers whose concatenation is a linear probe's input "class tokens of the last
        ``last_blocks`` blocks (+ the mean patch token)" (DINO / DINOv2 / iBOT linear,
        PROTOCOLS-ARCH.md section 2); None where the backbone has no such input. A backbone
        without tokens has one: its global feature (n = 1, no avgpool)."""
        return (self.default_layer,) if last_blocks == 1 and not avgpool else None

    def check_layers(self, names: Sequence[str], setting: str = "layers") -> None:
        unknown = [n for n in names if n not in self.layers()]
        if unknown:
            raise BadInput(
                f"{setting}: {self.arch} has no layer {', '.join(unknown)}; choose from {', '.join(self.layers())}"
            )

    def check_supports(self, family: str) -> None:
        """One line naming what runs ``family`` when this backbone does not."""
        if self.supports is not None and family not in self.supports:
            able = sorted(n for n, cls in FAMILIES.items() if cls.supports is None or family in cls.supports)
            instead = INSTEAD.get(family)
            raise BadInput(
                f"{family} does not run on {self.family} backbones ({self.arch}); it runs on: "
                f"{', '.join(able)}" + (f"; {instead}" if instead else "")
            )


# What evaluates a backbone instead of a family written for ResNets (a refusal names it).
INSTEAD = {
    "linear": "for other backbones run linear-imagenet-dino, linear-imagenet-mae or linear-imagenet-sweep "
    "(frozen-linear: DINO's, MAE's and DINOv2's protocols)",
}


class ResNetBackbone(Backbone):
    """torchvision-layout ResNets (every depth, CIFAR stems): Feature1..5 + AvgPool."""

    family = "resnet"
    supports = None

    def layers(self) -> dict[str, Layer]:
        from npidbench.backbones.resnet import LAYERS, POOLING, layer_channels

        channels = layer_channels(self.model)
        return {
            name: Layer(name, channels[name], POOLING[name].grid if name in POOLING else 0) for name in LAYERS
        }

    @property
    def feature_layers(self) -> tuple[str, ...]:
        from npidbench.backbones.resnet import FEATURE_LAYERS

        return FEATURE_LAYERS

    @property
    def default_layer(self) -> str:
        return "AvgPool"

    def extractor(self, names: Sequence[str]) -> nn.Module:
        from npidbench.backbones.resnet import MultiLayerFeatures

        return MultiLayerFeatures(self.model, tuple(names))


def _families() -> dict[str, type[Backbone]]:
    # timm is imported when one of these is built, not here
    from npidbench.backbones.convnext import ConvNeXtBackbone
    from npidbench.backbones.vit import ViTBackbone

    return {cls.family: cls for cls in (ResNetBackbone, ViTBackbone, ConvNeXtBackbone)}


FAMILIES: dict[str, type[Backbone]] = _families()


def backbone_for(model: nn.Module, arch: str, family: str = "resnet") -> Backbone:
    """The interface to a loaded ``model`` of ``family``."""
    cls = FAMILIES.get(family)
    if cls is None:
        raise BadInput(f"no backbone family {family!r}; known: {', '.join(FAMILIES)}")
    return cls(model, arch)
