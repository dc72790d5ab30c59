"""The networks the NPID pretrainer builds, by recipe ``arch`` name: torchvision ResNets
(checkpoint/arch.py's names), plain timm ViTs and timm ConvNeXts.

ViTs are ``vit_{tiny,small,base}_patch{16,8,14}``: timm's sizes (vit_tiny_patch16_224: 192 wide,
3 heads; vit_small: 384, 6; vit_base: 768, 12; all 12 blocks, mlp 4x, qkv bias [timm
models/vision_transformer.py:3410-3518]), without layer scale or registers, built by
backbones/vit.py with ``img_size`` the training crop so that the position embedding is trained
at the grid it sees. ConvNeXts are ``convnext_{tiny,small,base}`` with timm's depths and widths
[timm models/convnext.py:1292-1308] and layer scale, built by backbones/convnext.py.

NPID's head (Wu et al. 2018: a linear projection of the global feature to 128-d, L2-normalised;
pretrain/npid.py EmbeddingModel) reads each family's default global feature, the one the
evaluators read: a ResNet's global average pool, a ViT's class token after the final norm
(timm's forward with ``num_classes=0, global_pool="token"``), a ConvNeXt's head-normed global
average (timm's ``forward_head(pre_logits=True)``).

timm is imported only when a ViT or ConvNeXt is built.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import nn

from npidbench.backbones.convnext import ConvNeXtSpec
from npidbench.backbones.vit import ViTSpec, whole_patches
from npidbench.checkpoint.arch import SUPPORTED_ARCHS as RESNET_ARCHS

# (width, heads) of timm's ViT sizes; every one has 12 blocks.
_VIT_SIZES = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
_VIT_PATCHES = (16, 8, 14)
VIT_ARCHS = tuple(f"vit_{size}_patch{patch}" for patch in _VIT_PATCHES for size in _VIT_SIZES)
_CONVNEXT_SPECS = {
    "convnext_tiny": ConvNeXtSpec((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ConvNeXtSpec((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ConvNeXtSpec((3, 3, 27, 3), (128, 256, 512, 1024)),
}
CONVNEXT_ARCHS = tuple(_CONVNEXT_SPECS)
PRETRAIN_ARCHS = tuple(RESNET_ARCHS) + VIT_ARCHS + CONVNEXT_ARCHS


def arch_family(arch: str) -> str:
    """The backbones.FAMILIES entry of a recipe arch: resnet, vit or convnext."""
    if arch in VIT_ARCHS:
        return "vit"
    if arch in CONVNEXT_ARCHS:
        return "convnext"
    return "resnet"


def patch_size(arch: str) -> int:
    """A ViT's patch size; 1 for the convolutional families (any input size)."""
    return int(arch.rsplit("patch", 1)[1]) if arch in VIT_ARCHS else 1


def fit_to_patches(arch: str, size: int) -> int:
    """``size`` rounded up to a whole number of patches: timm's patch embedding refuses inputs
    that are not a multiple of the patch [timm layers/patch_embed.py PatchEmbed.forward]. The
    embedded recipe's 56 px becomes 64 for patch 16 (4 x 4 patches; the images are 64-88 px);
    patch 8 and 14 take 56 as it is. Unchanged for ResNets and ConvNeXts."""
    return whole_patches(size, patch_size(arch))


def vit_spec(arch: str, input_size: int) -> ViTSpec:
    """The plain ViT of ``arch`` with its position embedding at the training crop."""
    size, patch = arch.removeprefix("vit_").split("_patch")
    width, heads = _VIT_SIZES[size]
    return ViTSpec(
        depth=12,
        embed_dim=width,
        num_heads=heads,
        patch_size=int(patch),
        img_size=fit_to_patches(arch, input_size),
        pos_interpolation="timm",  # trained through timm's forward: evaluated likewise
    )


def backbone_spec(arch: str, input_size: int) -> dict[str, Any] | None:
    """What the checkpoint records to rebuild a ViT or ConvNeXt exactly (plain types); None
    for ResNets (their name says it all)."""
    family = arch_family(arch)
    if family == "vit":
        return asdict(vit_spec(arch, input_size))
    if family == "convnext":
        spec = _CONVNEXT_SPECS[arch]
        return {"depths": list(spec.depths), "dims": list(spec.dims), "layer_scale": spec.layer_scale}
    return None


def build_pretrain_backbone(arch: str, input_size: int) -> tuple[nn.Module, int]:
    """A randomly initialised backbone of ``arch`` (no classifier) and the width of its
    global feature, the input of NPID's projection head."""
    family = arch_family(arch)
    if family == "vit":
        from npidbench.backbones.vit import build_vit

        model = build_vit(vit_spec(arch, input_size))
        return model, int(model.num_features)
    if family == "convnext":
        from npidbench.backbones.convnext import build_convnext

        model = build_convnext(_CONVNEXT_SPECS[arch])
        return model, int(model.num_features)
    from npidbench.backbones.resnet import build_resnet, layer_channels

    model = build_resnet(arch)
    return model, layer_channels(model)["AvgPool"]
