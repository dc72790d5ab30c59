"""Infer which torchvision ResNet a state dict belongs to, from tensor shapes alone.

The depth comes from the block type and the number of blocks per stage, the width from the
channels of the stem and first block, the CIFAR-style stem (solo-learn's 3x3 stride-1 conv1
without max-pool) from conv1's kernel. Width-multiplied ResNets (SimCLR/SwAV x2/x4 widen every
layer, stem included) are not torchvision models and are named and refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from npidbench.errors import BadInput


@dataclass(frozen=True)
class ArchSpec:
    """A torchvision ResNet builder name plus the stem variant."""

    name: str
    cifar_stem: bool = False

    @property
    def label(self) -> str:
        return f"{self.name} (CIFAR stem)" if self.cifar_stem else self.name


# (block, blocks per stage, bottleneck inner width of layer1, groups) -> torchvision builder.
_KNOWN: dict[tuple[str, tuple[int, ...], int, int], str] = {
    ("basic", (2, 2, 2, 2), 64, 1): "resnet18",
    ("basic", (3, 4, 6, 3), 64, 1): "resnet34",
    ("bottleneck", (3, 4, 6, 3), 64, 1): "resnet50",
    ("bottleneck", (3, 4, 23, 3), 64, 1): "resnet101",
    ("bottleneck", (3, 8, 36, 3), 64, 1): "resnet152",
    ("bottleneck", (3, 4, 6, 3), 128, 1): "wide_resnet50_2",
    ("bottleneck", (3, 4, 23, 3), 128, 1): "wide_resnet101_2",
    ("bottleneck", (3, 4, 6, 3), 128, 32): "resnext50_32x4d",
    ("bottleneck", (3, 4, 23, 3), 256, 32): "resnext101_32x8d",
    ("bottleneck", (3, 4, 23, 3), 256, 64): "resnext101_64x4d",
}
SUPPORTED_ARCHS = tuple(sorted(set(_KNOWN.values())))
_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


def infer_arch(state: dict[str, torch.Tensor]) -> ArchSpec:
    """The torchvision ResNet whose layout these (torchvision-named) tensors follow.

    When a stage has fewer blocks than any known depth (keys renamed or missing), the smallest
    architecture that contains the blocks present is returned, so that the strict load can name
    the missing keys instead of failing on an unknown layout.

    Raises:
        BadInput: width-multiplied or otherwise non-torchvision layouts.
    """
    conv1 = state.get("conv1.weight")
    if conv1 is None and "conv1.0.weight" in state:
        raise BadInput(
            "the backbone has a deep stem (conv1.0/conv1.1/..., timm's ResNet-C/D such as "
            "resnet50d); it is not a torchvision ResNet and cannot be evaluated yet"
        )
    block = "bottleneck" if any(k.endswith(".conv3.weight") for k in state) else "basic"
    if conv1 is not None and conv1.ndim == 4 and conv1.shape[0] != 64:
        multiplier = conv1.shape[0] / 64
        depth = _depth_guess(state, block)
        raise BadInput(
            f"this is a width-multiplied {depth} x{multiplier:g} (SimCLR/SwAV style: conv1 has "
            f"{conv1.shape[0]} channels, not 64); it is not a torchvision model and npidbench "
            "cannot evaluate it yet"
        )
    cifar_stem = conv1 is not None and conv1.ndim == 4 and conv1.shape[-1] == 3
    counts = [0, 0, 0, 0]
    for key in state:
        match = _BLOCK_KEY.match(key)
        if match:
            stage, index = int(match[1]) - 1, int(match[2])
            counts[stage] = max(counts[stage], index + 1)
    inner, groups = 64, 1
    first = state.get("layer1.0.conv1.weight")
    second = state.get("layer1.0.conv2.weight")
    if block == "bottleneck" and first is not None and second is not None:
        inner = int(first.shape[0])
        groups = max(1, int(second.shape[0]) // max(1, int(second.shape[1])))
    exact = _KNOWN.get((block, tuple(counts), inner, groups))
    if exact:
        return ArchSpec(exact, cifar_stem)
    fits = [
        (sum(layout), name)
        for (b, layout, w, g), name in _KNOWN.items()
        if b == block
        and w == inner
        and g == groups
        and all(c <= n for c, n in zip(counts, layout, strict=True))
    ]
    if fits and any(counts):
        return ArchSpec(min(fits)[1], cifar_stem)
    raise BadInput(
        f"the backbone's layout ({block} blocks {tuple(counts)}, width {inner}, groups {groups}) "
        f"matches no torchvision ResNet ({', '.join(SUPPORTED_ARCHS)})"
    )


def _depth_guess(state: dict[str, torch.Tensor], block: str) -> str:
    counts = [0, 0, 0, 0]
    for key in state:
        match = _BLOCK_KEY.match(key)
        if match:
            counts[int(match[1]) - 1] = max(counts[int(match[1]) - 1], int(match[2]) + 1)
    for (b, layout, _, _), name in _KNOWN.items():
        if b == block and tuple(counts) == layout:
            return {
                "resnet18": "ResNet-18",
                "resnet34": "ResNet-34",
                "resnet50": "ResNet-50",
                "resnet101": "ResNet-101",
                "resnet152": "ResNet-152",
            }.get(name, name)
    return "ResNet"


def parse_arch(name: str) -> ArchSpec:
    """A user's ``--arch`` value: a torchvision name, optionally with ``-cifar`` for the stem."""
    cifar = name.endswith(("-cifar", "_cifar"))
    base = name[: -len("-cifar")] if cifar else name
    if base not in SUPPORTED_ARCHS:
        raise BadInput(
            f"--arch {name} is not supported; choose one of {', '.join(SUPPORTED_ARCHS)} "
            "(append -cifar for the 3x3 stride-1 stem)"
        )
    return ArchSpec(base, cifar)
