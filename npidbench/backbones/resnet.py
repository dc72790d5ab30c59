"""The backbone: a torchvision ResNet, and one forward pass that yields Feature1..5 + AvgPool.

Layers and pooling follow PROTOCOLS.md ("Multi-layer features"): Feature1 is the stem after
BN+ReLU (before max-pool), Feature2..5 the outputs of layer1..layer4, each average-pooled with a
fixed (kernel, stride, padding) chosen for 224x224 input; AvgPool is the global average of layer4.
At other input sizes the same output grid is reached with adaptive average pooling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

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


# Width-multiplied ResNet-50s: ``resnet50w2`` (SimCLR v1 2x, SwAV RN50-w2), ``resnet50w4``, ``resnet50w5``.
WIDE_RESNET50 = re.compile(r"resnet50w(?P<width>[1-9]\d*)")


def wide_resnet50_width(arch: str) -> int | None:
    """The width multiplier of a ``resnet50w<N>`` name (N >= 2), None for any other arch."""
    match = WIDE_RESNET50.fullmatch(arch)
    return int(match["width"]) if match and int(match["width"]) >= 2 else None


def build_resnet(arch: str, cifar_stem: bool = False, *, stem_padding: int = 1) -> nn.Module:
    """A randomly initialised torchvision ResNet without its classifier (fc = Identity).

    ``stem_padding`` is the padding of the CIFAR stem's 3x3 conv (ignored for the standard
    stem): the shapes are the same either way, only the framework that wrote a file knows it.
    ``resnet50w<N>`` builds the width-multiplied ResNet-50 (``width_multiplied_resnet50``).
    """
    width = wide_resnet50_width(arch)
    if width is not None:
        if cifar_stem:
            raise ValueError(f"{arch}: width-multiplied ResNet-50s have the standard stem only")
        model = width_multiplied_resnet50(width)
        model.fc = nn.Identity()
        return model
    model = torchvision.models.get_model(arch, weights=None)
    if cifar_stem:
        # CIFAR variant: 3x3 stride-1 conv1 and no max-pool. solo-learn builds it with
        # padding=2 (solo/methods/base.py); the common CIFAR ResNets use padding=1.
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=stem_padding, bias=False)
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model


def width_multiplied_resnet50(width: int) -> torchvision.models.ResNet:
    """A torchvision ResNet-50 with every layer ``width`` times wider: stem 64w, bottleneck
    widths 64w..512w, outputs 256w..2048w, with torchvision's names and Bottleneck blocks.

    This is SimCLR v1's ``width_mult`` (stem and every stage widened [simclr-converter
    resnet_wider.py:111-135]) and SwAV's ``widen`` [swav src/resnet50.py:159-193]; SwAV's stem
    ConstantPad2d(1) + conv padding 2 equals padding 3. Not torchvision's ``wide_resnet50_2``,
    which widens only the inner 3x3 convs and keeps 2048 outputs.
    """
    if width < 1:
        raise ValueError(f"width multiplier must be at least 1, not {width}")
    # torchvision's ResNet hard-codes the widths: build its skeleton without memory, then put
    # the widened stem and stages in its modules (relu, maxpool, avgpool have no parameters).
    with torch.device("meta"):
        model = torchvision.models.ResNet(Bottleneck, [3, 4, 6, 3])
    stem = 64 * width
    model.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(stem)
    inplanes = stem
    for index, blocks in enumerate((3, 4, 6, 3)):
        planes = stem * 2**index
        setattr(
            model, f"layer{index + 1}", _bottleneck_stage(inplanes, planes, blocks, 1 if index == 0 else 2)
        )
        inplanes = planes * Bottleneck.expansion
    model.fc = nn.Linear(inplanes, 1000)
    # torchvision's initialisation (ResNet.__init__): He normal fan-out convs, BN weight 1, bias 0.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.constant_(module.weight, 1)
            nn.init.constant_(module.bias, 0)
    return model


def _bottleneck_stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """A stage as torchvision's ResNet._make_layer builds it (stride in the 3x3 conv, projection
    shortcut ``downsample.0`` conv1x1 + ``downsample.1`` BN on the first block)."""
    out = planes * Bottleneck.expansion
    shortcut = nn.Sequential(
        nn.Conv2d(inplanes, out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out)
    )
    layers = [Bottleneck(inplanes, planes, stride, shortcut)]
    layers += [Bottleneck(out, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


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
