"""The backbone: a torchvision ResNet (or timm's deep-stem ResNet-C/D, built on torchvision's
blocks), and one forward pass that yields Feature1..5 + AvgPool.

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
from torchvision.models.resnet import BasicBlock, Bottleneck

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
    ``resnet50w<N>`` builds the width-multiplied ResNet-50 (``width_multiplied_resnet50``), the
    names of ``DEEP_STEM_RESNETS`` timm's ResNet-C/D (``deep_stem_resnet``).
    """
    if arch in DEEP_STEM_RESNETS:
        if cifar_stem:
            raise ValueError(f"{arch}: a deep-stem ResNet has its own stem, not the CIFAR one")
        model = deep_stem_resnet(arch)
        model.fc = nn.Identity()
        return model
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


@dataclass(frozen=True)
class DeepStemConfig:
    """One of timm's deep-stem ResNets (``stem_width=32, stem_type='deep'``): ResNet-C, plus the
    average-pool shortcut (``avg_down``) for ResNet-D."""

    block: type[nn.Module]
    layers: tuple[int, int, int, int]
    avg_down: bool
    groups: int = 1
    width_per_group: int = 64

    @property
    def kind(self) -> str:
        return "bottleneck" if self.block is Bottleneck else "basic"

    @property
    def inner(self) -> int:
        """Channels inside layer1's first block (64 for BasicBlock; torchvision's Bottleneck
        width, planes * width_per_group / 64 * groups with planes 64)."""
        return self.width_per_group * self.groups if self.block is Bottleneck else 64


# timm 1.0.31 models/resnet.py register_model entries, by name: resnet18d 1538-1542, resnet34d
# 1554-1558, resnet26d 1578-1582, resnet50c/50d 1594-1606, resnet101c/101d 1634-1646, resnet152c/152d
# 1666-1678, resnet200d 1698-1702, resnext50d_32x4d 1745-1751. Not here: ResNet-S (stem_width 64),
# ResNet-T (stem_type 'deep_tiered'), and the SE / ECA / anti-aliased / blur-pool variants.
DEEP_STEM_RESNETS: dict[str, DeepStemConfig] = {
    "resnet18d": DeepStemConfig(BasicBlock, (2, 2, 2, 2), avg_down=True),
    "resnet26d": DeepStemConfig(Bottleneck, (2, 2, 2, 2), avg_down=True),
    "resnet34d": DeepStemConfig(BasicBlock, (3, 4, 6, 3), avg_down=True),
    "resnet50c": DeepStemConfig(Bottleneck, (3, 4, 6, 3), avg_down=False),
    "resnet50d": DeepStemConfig(Bottleneck, (3, 4, 6, 3), avg_down=True),
    "resnet101c": DeepStemConfig(Bottleneck, (3, 4, 23, 3), avg_down=False),
    "resnet101d": DeepStemConfig(Bottleneck, (3, 4, 23, 3), avg_down=True),
    "resnet152c": DeepStemConfig(Bottleneck, (3, 8, 36, 3), avg_down=False),
    "resnet152d": DeepStemConfig(Bottleneck, (3, 8, 36, 3), avg_down=True),
    "resnet200d": DeepStemConfig(Bottleneck, (3, 24, 36, 3), avg_down=True),
    "resnext50d_32x4d": DeepStemConfig(Bottleneck, (3, 4, 6, 3), avg_down=True, groups=32, width_per_group=4),
}
# The deep stem's conv widths (timm ResNet.__init__, resnet.py:555-571: stem_width, stem_width,
# 2 * stem_width with stem_width=32); its output (64) is what layer1 takes, as after the 7x7 stem.
DEEP_STEM_WIDTHS = (32, 32, 64)


def deep_stem_resnet(arch: str) -> torchvision.models.ResNet:
    """timm's ResNet-C/D ``arch`` (a ``DEEP_STEM_RESNETS`` name) with timm's parameter names.

    Built on torchvision's ResNet and blocks rather than with ``timm.create_model``: timm's
    BasicBlock/Bottleneck compute the same ops in the same order as torchvision's (stride in the
    3x3 conv, ReLU after the residual add) under the same parameter names, so only the stem and the
    shortcut are replaced; and the network keeps torchvision's module names and block classes
    (``relu``, ``Bottleneck``) that the rest of npidbench reads (transfer/detection.py's C4 trunk
    takes ``resnet.relu``). tests/checkpoint/test_deep_stem.py checks that the features equal those
    of timm's own network on the same weights, bit for bit.

    Stem (timm resnet.py:555-573): ``conv1`` = Sequential(conv 3->32 3x3 s2, BN, ReLU, conv 32->32,
    BN, ReLU, conv 32->64), then torchvision's ``bn1``, ``relu``, ``maxpool``. ResNet-D shortcut
    (timm ``downsample_avg``, resnet.py:321-345, used by make_blocks 413-424): ``downsample`` =
    Sequential(AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False), or Identity at
    stride 1; 1x1 conv stride 1; BN).
    """
    config = DEEP_STEM_RESNETS[arch]
    model = torchvision.models.ResNet(
        config.block, list(config.layers), groups=config.groups, width_per_group=config.width_per_group
    )
    first, second, out = DEEP_STEM_WIDTHS
    model.conv1 = nn.Sequential(
        nn.Conv2d(3, first, kernel_size=3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(first),
        nn.ReLU(inplace=True),
        nn.Conv2d(first, second, kernel_size=3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(second),
        nn.ReLU(inplace=True),
        nn.Conv2d(second, out, kernel_size=3, stride=1, padding=1, bias=False),
    )
    fresh: list[nn.Module] = [model.conv1]
    if config.avg_down:
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            shortcut = stage[0].downsample
            if shortcut is None:  # layer1 of a BasicBlock ResNet: identity shortcut in both
                continue
            projection = shortcut[0]
            stride = projection.stride[0]
            pool = (
                nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
                if stride != 1
                else nn.Identity()
            )
            stage[0].downsample = nn.Sequential(
                pool,
                nn.Conv2d(projection.in_channels, projection.out_channels, kernel_size=1, bias=False),
                shortcut[1],
            )
            fresh.append(stage[0].downsample)
    # torchvision's initialisation of the replaced convs (ResNet.__init__); BN is already 1/0.
    for part in fresh:
        for module in part.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model


def stem_channels(model: nn.Module) -> int:
    """Channels of the stem's output: conv1's, or the last conv of a deep stem (Sequential)."""
    conv1 = model.conv1
    if isinstance(conv1, nn.Conv2d):
        return conv1.out_channels
    return [m for m in conv1.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def layer_channels(model: nn.Module) -> dict[str, int]:
    """Channels of each layer's map, read from the modules (works for every ResNet depth)."""

    def out_channels(stage: nn.Sequential) -> int:
        last = stage[-1]
        conv = getattr(last, "conv3", None) or last.conv2
        return conv.out_channels

    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    channels = {"Feature1": stem_channels(model)}
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
        # The stem's activation: ``relu`` in torchvision's ResNet (and the deep-stem ones built here),
        # ``act1`` in timm's. Kept by name, so that it is not registered twice as a submodule.
        self.stem_act = "relu" if hasattr(model, "relu") else "act1"
        # Stop after the deepest stage any requested layer needs.
        self.depth = max(_STAGE[name] for name in self.layers)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.model
        maps = {"Feature1": getattr(m, self.stem_act)(m.bn1(m.conv1(images)))}
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
