"""The backbone: a torchvision ResNet, and one forward pass that yields Feature1..5 + AvgPool.

Layers and pooling follow PROTOCOLS.md ("Multi-layer features"): Feature1 is the stem after
BN+ReLU (before max-pool), Feature2..5 the outputs of layer1..layer4, each average-pooled with a
fixed (kernel, stride, padding) chosen for 224x224 input; AvgPool is the global average of layer4.
At other input sizes the same output grid is reached with adaptive average pooling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision
from torch import nn

LAYERS = ("Feature1", "Feature2", "Feature3", "Feature4", "Feature5", "AvgPool")
FEATURE_LAYERS = LAYERS[:5]


@dataclass(frozen=True)
class Pooling:
    """AvgPool2d(kernel, stride, padding) of the protocol at 224 input, and its output grid."""

    kernel: int
    stride: int
    padding: int
    grid: int
    map_at_224: int  # spatial size of the map at 224x224 input (standard stem)


# PROTOCOLS.md table (FAIR benchmark / VISSL / mmselfsup agree).
POOLING = {
    "Feature1": Pooling(10, 10, 4, 12, 112),
    "Feature2": Pooling(16, 8, 0, 6, 56),
    "Feature3": Pooling(13, 5, 0, 4, 28),
    "Feature4": Pooling(8, 3, 0, 3, 14),
    "Feature5": Pooling(6, 1, 0, 2, 7),
}


def build_resnet(arch: str, cifar_stem: bool = False, *, stem_padding: int = 1) -> nn.Module:
    """A randomly initialised torchvision ResNet without its classifier (fc = Identity).

    ``stem_padding`` is the padding of the CIFAR stem's 3x3 conv (ignored for the standard
    stem): the shapes are the same either way, only the framework that wrote a file knows it.
    """
    model = torchvision.models.get_model(arch, weights=None)
    if cifar_stem:
        # CIFAR variant: 3x3 stride-1 conv1 and no max-pool. solo-learn builds it with
        # padding=2 (solo/methods/base.py); the common CIFAR ResNets use padding=1.
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=stem_padding, bias=False)
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model


def layer_channels(model: nn.Module) -> dict[str, int]:
    """Channels of each layer's map, read from the modules (works for every ResNet depth)."""

    def out_channels(stage: nn.Sequential) -> int:
        last = stage[-1]
        conv = getattr(last, "conv3", None) or last.conv2
        return conv.out_channels

    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    channels = {"Feature1": model.conv1.out_channels}
    for i, stage in enumerate(stages, start=2):
        channels[f"Feature{i}"] = out_channels(stage)
    channels["AvgPool"] = channels["Feature5"]
    return channels


def layer_dims(model: nn.Module, layers: tuple[str, ...] = LAYERS) -> dict[str, int]:
    """Flattened feature size per layer (e.g. 9216 for ResNet-50 Feature1)."""
    channels = layer_channels(model)
    return {name: channels[name] * (1 if name == "AvgPool" else POOLING[name].grid ** 2) for name in layers}


class MultiLayerFeatures(nn.Module):
    """Runs the backbone once and returns the requested pooled, flattened layers.

    Written out rather than built with torchvision's create_feature_extractor: its FX graph
    turns the residual ``out += identity`` into an out-of-place add, which measured 10-13% slower
    on CPU (benchmarks/extraction_throughput.py) for the same numbers.
    """

    def __init__(self, model: nn.Module, layers: tuple[str, ...] = LAYERS) -> None:
        super().__init__()
        unknown = [name for name in layers if name not in LAYERS]
        if unknown:
            raise ValueError(f"unknown layers {unknown}; choose from {LAYERS}")
        self.layers = tuple(layers)
        self.model = model
        # Stop after the deepest stage any requested layer needs.
        self.depth = max(_STAGE[name] for name in self.layers)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.model
        maps = {"Feature1": m.relu(m.bn1(m.conv1(images)))}
        x = m.maxpool(maps["Feature1"])
        for stage, block in enumerate((m.layer1, m.layer2, m.layer3, m.layer4), start=2):
            if stage > self.depth:
                break
            x = block(x)
            maps[f"Feature{stage}"] = x
        out: dict[str, torch.Tensor] = {}
        for name in self.layers:
            if name == "AvgPool":
                out[name] = maps["Feature5"].mean(dim=(2, 3))
            else:
                out[name] = pool_layer(name, maps[name]).flatten(1)
        return out


# The stage (Feature number) each layer is read from.
_STAGE = {"Feature1": 1, "Feature2": 2, "Feature3": 3, "Feature4": 4, "Feature5": 5, "AvgPool": 5}


def pool_layer(name: str, feature_map: torch.Tensor) -> torch.Tensor:
    """The protocol's fixed AvgPool2d at the 224 map size, adaptive pooling to its grid otherwise."""
    spec = POOLING[name]
    if feature_map.shape[-1] == spec.map_at_224 and feature_map.shape[-2] == spec.map_at_224:
        # count_include_pad=True, as nn.AvgPool2d in the anchors.
        return nn.functional.avg_pool2d(feature_map, spec.kernel, spec.stride, spec.padding)
    return nn.functional.adaptive_avg_pool2d(feature_map, spec.grid)
