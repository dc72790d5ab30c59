"""Infer which torchvision ResNet a state dict belongs to, from tensor shapes alone.

The depth comes from the block type and the number of blocks per stage, the width from the
channels of the stem and first block, the CIFAR-style stem (solo-learn's 3x3 stride-1 conv1
without max-pool) from conv1's kernel. Width-multiplied ResNet-50s (SimCLR v1 2x/4x, SwAV
RN50-w2/w4/w5: every layer widened, stem included, built by backbones/resnet.py) are named
``resnet50w<N>`` from conv1's 64N channels and the stage widths; other width-multiplied depths are
refused. timm's deep-stem ResNets (ResNet-C: ``conv1.0/.1/.3/.4/.6``; ResNet-D: plus the average-
pool shortcut ``downsample.1/.2``) keep timm's names and are named as timm does (``resnet50d``,
``DEEP_STEM_ARCHS``, built by backbones/resnet.py on torchvision's blocks). Refused are the
variants that reuse these names for another network: other deep stems (timm ResNet-S/T,
mmpretrain ResNetV1c/V1d), average-pool shortcuts without a deep stem, GroupNorm,
squeeze-excitation, and complete layouts of a depth torchvision does not build (timm resnet26). A
layout with gaps or a missing stage is a damaged file instead: it maps to the smallest ResNet
containing it, so that the strict load names the missing keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from npidbench.backbones.resnet import DEEP_STEM_RESNETS, DEEP_STEM_WIDTHS, wide_resnet50_width
from npidbench.errors import BadInput


@dataclass(frozen=True)
class ArchSpec:
    """A torchvision ResNet builder name plus the stem variant."""

    name: str
    cifar_stem: bool = False
    # conv1 padding of a CIFAR stem when the user names it (--arch resnet18-cifar-pad1); None: the
    # writing framework's (shapes cannot tell). Not part of the comparison with inferred specs.
    stem_padding: int | None = field(default=None, compare=False)

    @property
    def label(self) -> str:
        return f"{self.name} (CIFAR stem)" if self.cifar_stem else self.name

    @property
    def deep_stem(self) -> bool:
        """timm's ResNet-C/D (``DEEP_STEM_ARCHS``)."""
        return self.name in DEEP_STEM_RESNETS


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
# Width multiples of ResNet-50 (backbones/resnet.py width_multiplied_resnet50): the released ones
# (SimCLR v1 2x/4x, SwAV w2/w4/w5); another ``resnet50w<N>`` is built and inferred alike.
WIDE_ARCHS = ("resnet50w2", "resnet50w4", "resnet50w5")
SUPPORTED_ARCHS = tuple(sorted(set(_KNOWN.values()))) + WIDE_ARCHS
# timm's deep-stem ResNet-C/D (backbones/resnet.py DEEP_STEM_RESNETS): evaluated and converted, not
# in SUPPORTED_ARCHS, which are also the torchvision networks the pretrainer builds.
DEEP_STEM_ARCHS = tuple(DEEP_STEM_RESNETS)
# (block, blocks per stage, inner width of layer1, groups, average-pool shortcut) -> timm name.
_DEEP_KNOWN: dict[tuple[str, tuple[int, ...], int, int, bool], str] = {
    (config.kind, config.layers, config.inner, config.groups, config.avg_down): name
    for name, config in DEEP_STEM_RESNETS.items()
}
_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


def infer_arch(state: dict[str, torch.Tensor]) -> ArchSpec:
    """The torchvision ResNet whose layout these (torchvision-named) tensors follow, the
    width-multiplied ResNet-50 (``resnet50w<N>``, SimCLR v1 / SwAV) built on its blocks, or timm's
    deep-stem ResNet-C/D (``resnet50d``, ``DEEP_STEM_ARCHS``; timm's names).

    ResNet variants that share these names but are other networks (other deep stems, average-pool
    shortcuts without one, GroupNorm, squeeze-excitation, depths torchvision does not build) are
    named and refused. When a stage has gaps or a stage is missing (keys renamed or lost), the smallest
    architecture that contains the blocks present is returned, so that the strict load can name
    the missing keys instead of failing on an unknown layout.

    Raises:
        BadInput: other width-multiplied depths, uneven widths, or otherwise non-torchvision layouts.
    """
    variant = non_torchvision_variant(state)
    if variant:
        raise BadInput(variant)
    if has_deep_stem(state):
        return _deep_stem_arch(state)
    conv1 = state.get("conv1.weight")
    block = _block_type(state)
    multiples = _width_multiples(state, block)
    if any(m != 1 for m in multiples.values()):
        return _width_multiplied(state, block, multiples)
    cifar_stem = conv1 is not None and conv1.ndim == 4 and conv1.shape[-1] == 3
    counts = _block_counts(state)
    inner, groups = _width_and_groups(state, block)
    exact = _KNOWN.get((block, tuple(counts), inner, groups))
    if exact:
        return ArchSpec(exact, cifar_stem)
    if _layout_complete(state, block, counts) and not any(
        (b, tuple(counts)) == (block, layout) for b, layout, _, _ in _KNOWN
    ):
        # Every stage complete and contiguous: a deliberate depth, not a damaged file.
        hint = _OTHER_DEPTHS.get((block, tuple(counts)))
        raise BadInput(
            f"a {block.capitalize()} ResNet with blocks {tuple(counts)}"
            f"{f' ({hint})' if hint else ''}: no torchvision ResNet has this depth "
            f"({', '.join(SUPPORTED_ARCHS)}); npidbench cannot evaluate it"
        )
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


def _width_multiples(state: dict[str, torch.Tensor], block: str) -> dict[str, float]:
    """How many times wider than torchvision's each part present is: conv1 (64 channels) and each
    stage's output (its first block's last conv: 256..2048 for Bottleneck, 64..512 for Basic).
    All 1 for torchvision's ResNets, wide_resnet50_2 and the ResNeXts (their inner 3x3 widens only)."""
    last_conv, base = ("conv3", 256) if block == "bottleneck" else ("conv2", 64)
    found: dict[str, float] = {}
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.ndim == 4:
        found["conv1"] = int(conv1.shape[0]) / 64
    for stage in range(1, 5):
        indices = sorted(int(m[2]) for k in state if (m := _BLOCK_KEY.match(k)) and m[1] == str(stage))
        for index in indices:
            weight = state.get(f"layer{stage}.{index}.{last_conv}.weight")
            if weight is not None and weight.ndim == 4:
                found[f"layer{stage}"] = int(weight.shape[0]) / (base * 2 ** (stage - 1))
                break
    return found


def _width_multiplied(state: dict[str, torch.Tensor], block: str, multiples: dict[str, float]) -> ArchSpec:
    """The ``resnet50w<N>`` of a ResNet-50 widened N times everywhere (SimCLR v1's width_mult
    [resnet_wider.py:111-135], SwAV's widen [src/resnet50.py:159-193]), or a one-line refusal."""
    conv1 = state.get("conv1.weight")
    shown = multiples.get("conv1", next(iter(multiples.values())))
    depth = _depth_guess(state, block)
    counts = tuple(_block_counts(state))
    if block != "bottleneck" or not all(c <= n for c, n in zip(counts, (3, 4, 6, 3), strict=True)):
        channels = f"conv1 has {conv1.shape[0]} channels, not 64" if conv1 is not None else "wider stages"
        raise BadInput(
            f"this is a width-multiplied {depth} x{shown:g} (SimCLR/SwAV style: {channels}); npidbench "
            f"builds width multiples of ResNet-50 only ({', '.join(WIDE_ARCHS)}, any resnet50wN)"
        )
    widths = sorted(set(multiples.values()))
    if len(widths) > 1:
        parts = ", ".join(f"{name} x{m:g}" for name, m in multiples.items())
        raise BadInput(
            f"a ResNet-50 whose layers are widened unevenly ({parts}): SimCLR/SwAV widen the stem and "
            "every stage alike; not a network npidbench builds"
        )
    width = widths[0]
    if width != int(width) or width < 2:
        raise BadInput(
            f"a ResNet-50 {width:g} times as wide as torchvision's (conv1 {64 * width:g} channels): only "
            f"whole width multiples are built ({', '.join(WIDE_ARCHS)}, any resnet50wN)"
        )
    if conv1 is not None and conv1.ndim == 4 and conv1.shape[-1] != 7:
        raise BadInput(
            f"a width-multiplied ResNet-50 x{width:g} with a {conv1.shape[-1]}x{conv1.shape[-1]} stem: "
            "only the standard 7x7 stem is built for width multiples"
        )
    inner = int(width) * 64
    for stage in range(1, 5):
        first = state.get(f"layer{stage}.0.conv1.weight")
        second = state.get(f"layer{stage}.0.conv2.weight")
        expected = inner * 2 ** (stage - 1)
        if (first is not None and first.shape[0] != expected) or (
            second is not None and second.ndim == 4 and second.shape[1] != second.shape[0]
        ):
            got = first.shape[0] if first is not None else "?"
            raise BadInput(
                f"a ResNet-50 x{width:g} whose layer{stage} bottleneck is {got} wide (not {expected}) or "
                "grouped: SimCLR/SwAV width multiples widen the bottleneck by the same factor; not a "
                "network npidbench builds"
            )
    return ArchSpec(f"resnet50w{int(width)}")


# Depths other libraries build with torchvision's names (timm resnet.py: resnet26 is Bottleneck
# (2, 2, 2, 2), resnet200 Bottleneck (3, 24, 36, 3)).
_OTHER_DEPTHS = {
    ("bottleneck", (2, 2, 2, 2)): "timm resnet26",
    ("bottleneck", (3, 24, 36, 3)): "timm resnet200",
}
_MMPRETRAIN_STEM = re.compile(r"^stem\.\d+\.conv\.weight$")  # ConvModule(conv, bn) in a Sequential
_AVG_DOWN = re.compile(r"^layer[1-4]\.\d+\.downsample\.2\.")  # AvgPool, conv, norm
_ATTENTION = re.compile(r"^(?P<block>layer[1-4]\.\d+)\.(?P<name>se|se_layer|se_module)\.(?P<rest>.+)$")


def non_torchvision_variant(state: dict[str, torch.Tensor]) -> str | None:
    """Name a ResNet variant that reuses torchvision's key names but is another network.

    Each of these loads "completely" into a torchvision ResNet if its extra or renamed tensors are
    dropped, and computes different features; so each is refused with what it is.
    """
    avg_down = any(_AVG_DOWN.match(k) for k in state)
    if any(_MMPRETRAIN_STEM.match(k) for k in state):
        # mmpretrain resnet.py: ResNetV1c = deep_stem; ResNetV1d = deep_stem + avg_down.
        if avg_down:
            return (
                "mmpretrain ResNetV1d (deep stem + average-pool shortcut: stem.N.conv/stem.N.bn, "
                "downsample.1 conv after an AvgPool): not a torchvision ResNet; npidbench cannot "
                "evaluate it yet"
            )
        return (
            "mmpretrain ResNetV1c (deep stem of three 3x3 convs under stem.N.conv/stem.N.bn): not a "
            "torchvision ResNet; npidbench cannot evaluate it yet"
        )
    deep_stem = has_deep_stem(state)
    if deep_stem:
        # timm's ResNet-C/D are built (infer_arch); other deep stems of the same names are not.
        other_stem = _other_deep_stem(state)
        if other_stem:
            return other_stem
    norms = [k for k in state if re.match(r"^(bn1|layer[1-4]\.\d+\.bn\d)\.weight$", k)]
    if norms and not any(k.endswith(("running_mean", "running_var")) for k in state):
        # timm resnet50_gn: norm_layer=GroupNorm, weight and bias only.
        return (
            "GroupNorm ResNet (no BatchNorm statistics; timm resnet50_gn): its norm layers have "
            "weight/bias but no running_mean/running_var, so it is not a torchvision ResNet (or the "
            "file was saved without its buffers)"
        )
    attention = sorted(
        {(m["block"], m["name"], m["rest"].split(".")[0]) for k in state if (m := _ATTENTION.match(k))}
    )
    if attention:
        block, name, part = attention[0]
        where = f"{block}.{name}.*"
        if part in ("fc1", "fc2", "conv1", "conv2"):
            # timm SEModule: se.fc1/se.fc2 (1x1 convs); mmpretrain SELayer: se_layer.conv1/conv2.
            block_type = _block_type(state)
            layout = (block_type, tuple(_block_counts(state)), *_width_and_groups(state, block_type))
            such_as = _SE_NAMES.get(_KNOWN.get(layout, ""), "timm seresnet50")
            return (
                f"squeeze-excitation modules ({where}): a SE-ResNet such as {such_as}, not a "
                "torchvision ResNet; npidbench cannot evaluate it yet"
            )
        return (
            f"channel-attention modules ({where}, e.g. timm's ECA/CBAM ResNets): not a torchvision "
            "ResNet; npidbench cannot evaluate it yet"
        )
    if avg_down and not deep_stem:
        return (
            "average-pool shortcut (downsample.0 AvgPool, downsample.1 conv, downsample.2 norm; the "
            "ResNet-D shortcut): not a torchvision ResNet; npidbench cannot evaluate it yet"
        )
    return None


_DEEP_STEM_KEY = re.compile(r"^conv1\.\d+\.")  # timm stem_type='deep': conv1 is a Sequential


def has_deep_stem(state: dict[str, torch.Tensor]) -> bool:
    """conv1 is a Sequential (``conv1.0.weight``, ...): a timm deep stem, complete or not."""
    return any(_DEEP_STEM_KEY.match(k) for k in state)


def _deep_stem_shapes() -> dict[str, tuple[int, ...]]:
    """The conv shapes of timm's ResNet-C/D stem (timm resnet.py:555-571, stem_width 32)."""
    first, second, out = DEEP_STEM_WIDTHS
    return {
        "conv1.0.weight": (first, 3, 3, 3),
        "conv1.3.weight": (second, first, 3, 3),
        "conv1.6.weight": (out, second, 3, 3),
    }


def _other_deep_stem(state: dict[str, torch.Tensor]) -> str | None:
    """The refusal for a deep stem that is not ResNet-C/D's 32-32-64 one (only the convs present
    are compared: a missing one is named by the strict load)."""
    expected = _deep_stem_shapes()
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if not wrong:
        return None
    first = state.get("conv1.0.weight")
    such_as = ""
    if first is not None and first.ndim == 4 and tuple(first.shape[1:]) == (3, 3, 3):
        # timm resnet.py:555-559: stem_width 64 (resnet50s), or 'deep_tiered' (resnet50t: 24-32-64).
        such_as = {
            64: " (timm's ResNet-S such as resnet50s: stem 64-64-128)",
            24: " (timm's ResNet-T such as resnet50t: tiered stem 24-32-64)",
        }.get(int(first.shape[0]), "")

    def shape(dims: tuple[int, ...]) -> str:
        return "x".join(str(d) for d in dims)

    return (
        f"a deep stem (conv1.0/conv1.3/conv1.6) whose {wrong[0]} is {shape(tuple(state[wrong[0]].shape))}, "
        f"not {shape(expected[wrong[0]])}{such_as}: npidbench builds timm's ResNet-C/D stem only (3x3 convs "
        f"3-{DEEP_STEM_WIDTHS[0]}-{DEEP_STEM_WIDTHS[1]}-{DEEP_STEM_WIDTHS[2]}: {', '.join(DEEP_STEM_ARCHS)})"
    )


def _deep_stem_arch(state: dict[str, torch.Tensor]) -> ArchSpec:
    """The timm ResNet-C/D (``DEEP_STEM_ARCHS``) of a deep-stem layout whose stem is ResNet-C/D's
    (non_torchvision_variant has refused the others): block type, blocks per stage, width and groups
    as for torchvision's, and ResNet-D's average-pool shortcut from ``downsample.2``. A damaged
    layout maps to the smallest such network containing it, as in infer_arch."""
    block = _block_type(state)
    counts = tuple(_block_counts(state))
    inner, groups = _width_and_groups(state, block)
    avg_down = any(_AVG_DOWN.match(k) for k in state)
    kind = "ResNet-D (deep stem + average-pool shortcut)" if avg_down else "ResNet-C (deep stem)"
    multiples = _width_multiples(state, block)
    if any(m != 1 for m in multiples.values()):
        parts = ", ".join(f"{name} x{m:g}" for name, m in multiples.items() if m != 1)
        raise BadInput(
            f"a width-multiplied timm {kind} ({parts}): npidbench builds "
            f"{', '.join(DEEP_STEM_ARCHS)} at their own widths only"
        )
    exact = _DEEP_KNOWN.get((block, counts, inner, groups, avg_down))
    if exact:
        return ArchSpec(exact)
    shortcut = "downsample.1" if avg_down else "downsample.0"
    complete = all(counts) and _blocks_complete(state, block, list(counts), shortcut)
    fits = [
        (sum(layout), name)
        for (b, layout, w, g, a), name in _DEEP_KNOWN.items()
        if (b, w, g, a) == (block, inner, groups, avg_down)
        and all(c <= n for c, n in zip(counts, layout, strict=True))
    ]
    if fits and any(counts) and not complete:
        return ArchSpec(min(fits)[1])
    raise BadInput(
        f"a timm {kind} with {block} blocks {counts} (width {inner}, groups {groups}): not one of the "
        f"deep-stem ResNets npidbench builds ({', '.join(DEEP_STEM_ARCHS)})"
    )


def foreign_tensors_message(extra: list[str], arch: str) -> str:
    """The refusal for tensors inside conv1/bn1/layer1..4 that the built ResNet does not have."""
    modules = []
    for name in extra:
        module = name.rsplit(".", 1)[0] + ".*"
        if module not in modules:
            modules.append(module)
    shown = ", ".join(modules[:3]) + (f", +{len(modules) - 3} more" if len(modules) > 3 else "")
    count = f"{len(extra)} tensor{'s' if len(extra) != 1 else ''}"
    library = "timm" if arch in DEEP_STEM_RESNETS else "torchvision"
    return (
        f"{count} inside the backbone's own modules that a {library} {arch} does not "
        f"have ({shown}): a modified ResNet, not a {library} ResNet; refusing rather than dropping them"
    )


_SE_NAMES = {
    "resnet18": "timm seresnet18",
    "resnet34": "timm seresnet34",
    "resnet50": "timm seresnet50",
    "resnet101": "timm seresnet101",
    "resnet152": "timm seresnet152",
    "resnext50_32x4d": "timm seresnext50_32x4d",
}


def _block_type(state: dict[str, torch.Tensor]) -> str:
    return "bottleneck" if any(re.match(r"^layer[1-4]\.\d+\.conv3\.weight$", k) for k in state) else "basic"


def _width_and_groups(state: dict[str, torch.Tensor], block: str) -> tuple[int, int]:
    """(inner width of layer1's bottleneck, groups of its 3x3 conv): (64, 1) for plain ResNets,
    (128, 1) wide_resnet50_2, (128, 32) resnext50_32x4d."""
    first = state.get("layer1.0.conv1.weight")
    second = state.get("layer1.0.conv2.weight")
    if block != "bottleneck" or first is None or second is None:
        return 64, 1
    return int(first.shape[0]), max(1, int(second.shape[0]) // max(1, int(second.shape[1])))


def _block_counts(state: dict[str, torch.Tensor]) -> list[int]:
    counts = [0, 0, 0, 0]
    for key in state:
        match = _BLOCK_KEY.match(key)
        if match:
            stage, index = int(match[1]) - 1, int(match[2])
            counts[stage] = max(counts[stage], index + 1)
    return counts


def _layout_complete(state: dict[str, torch.Tensor], block: str, counts: list[int]) -> bool:
    """Stem, every block of every stage (no gaps) and each stage's projection shortcut present."""
    if not all(counts) or "conv1.weight" not in state or "bn1.weight" not in state:
        return False
    return _blocks_complete(state, block, counts, "downsample.0")


def _blocks_complete(state: dict[str, torch.Tensor], block: str, counts: list[int], shortcut: str) -> bool:
    """Every block of every stage (no gaps) and each stage's projection shortcut (its conv is
    ``shortcut``: downsample.0, or downsample.1 after ResNet-D's AvgPool) present."""
    convs = (1, 2, 3) if block == "bottleneck" else (1, 2)
    for stage, count in enumerate(counts, start=1):
        for index in range(count):
            for k in convs:
                if f"layer{stage}.{index}.conv{k}.weight" not in state:
                    return False
                if f"layer{stage}.{index}.bn{k}.weight" not in state:
                    return False
        needs_shortcut = stage > 1 or block == "bottleneck"
        if needs_shortcut and f"layer{stage}.0.{shortcut}.weight" not in state:
            return False
    return True


def _depth_guess(state: dict[str, torch.Tensor], block: str) -> str:
    counts = _block_counts(state)
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
    """A user's ``--arch`` value: a torchvision name, optionally with ``-cifar`` for the 3x3
    stride-1 stem, and ``-cifar-pad1`` / ``-cifar-pad2`` to say its conv1 padding (solo-learn
    pads by 2, other CIFAR ResNets by 1; without it, the format's is used); or a timm deep-stem
    name (``resnet50d``, ``DEEP_STEM_ARCHS``)."""
    match = re.fullmatch(r"(?P<base>.+?)(?P<cifar>[-_]cifar(?:-pad(?P<pad>[12]))?)?", name)
    base = match["base"] if match else name
    if base not in SUPPORTED_ARCHS and base not in DEEP_STEM_ARCHS and wide_resnet50_width(base) is None:
        raise BadInput(
            f"--arch {name} is not supported; choose one of {', '.join(SUPPORTED_ARCHS)}, resnet50wN or "
            f"a timm deep-stem ResNet ({', '.join(DEEP_STEM_ARCHS)}) (append -cifar for the 3x3 stride-1 "
            "stem, -cifar-pad1 / -cifar-pad2 to set its padding)"
        )
    if match and match["cifar"] and base in DEEP_STEM_ARCHS:
        raise BadInput(f"--arch {name}: {base} has timm's deep stem, not a CIFAR one; pass {base}")
    if match and match["cifar"] and wide_resnet50_width(base) is not None:
        raise BadInput(f"--arch {name}: width-multiplied ResNet-50s have the standard stem only; pass {base}")
    padding = int(match["pad"]) if match and match["pad"] else None
    return ArchSpec(base, bool(match and match["cifar"]), padding)
