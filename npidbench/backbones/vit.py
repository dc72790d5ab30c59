"""Plain ViTs (DINO, DINOv2, MoCo v3, MAE, iBOT, timm) as timm's VisionTransformer, behind the
Backbone interface. Attention is timm's, never reimplemented (its names are the ones DINO, MAE
and MoCo v3 write; PROTOCOLS-ARCH.md section 1).

Layers (PROTOCOLS-ARCH.md section 2): ``CLS`` is the class token after the final LayerNorm
(DINO's and DINOv2's kNN feature, VISSL's ``lastCLS``): the default global feature.
``Block<i>`` (1-based) is the class token of block i through the same final norm, as DINO's
``get_intermediate_layers`` gives it; the multi-layer protocols (VOC07 SVM) read four evenly
spaced blocks (3/6/9/12 of 12: no published ViT SVM protocol exists, records say so).
``AvgPatch`` is the mean of the last block's patch tokens after the norm (registers and CLS
excluded), the avgpool half of DINO's and DINOv2's linear features. The position embedding is
interpolated to the evaluation resolution (timm's dynamic_img_size, bicubic as DINO).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from npidbench.backbones import Backbone, Layer


@dataclass(frozen=True)
class ViTSpec:
    """What builds the network a file holds (all read from its tensors)."""

    depth: int
    embed_dim: int
    num_heads: int
    patch_size: int
    img_size: int  # the resolution its position embedding was trained at
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None  # layer scale (DINOv2: ls1.gamma / ls2.gamma)
    reg_tokens: int = 0  # DINOv2 "reg4" registers
    no_embed_class: bool = False  # DINOv2 converted by timm: the class token carries no position
    fc_norm: bool = False  # MAE's global-pool fine-tuning head norm (not in pretraining files)

    @property
    def name(self) -> str:
        size = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}.get(
            self.embed_dim, f"d{self.embed_dim}"
        )
        registers = f"_reg{self.reg_tokens}" if self.reg_tokens else ""
        return f"vit_{size}_patch{self.patch_size}{registers}_{self.img_size}"


def build_vit(spec: ViTSpec) -> nn.Module:
    """A randomly initialised timm VisionTransformer of ``spec`` without a classifier."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=spec.qkv_bias,
        init_values=spec.init_values,
        reg_tokens=spec.reg_tokens,
        no_embed_class=spec.no_embed_class,
        fc_norm=spec.fc_norm,
        num_classes=0,
        global_pool="token",
        dynamic_img_size=True,  # evaluation at another resolution interpolates pos_embed
    )
    return model


class ViTBackbone(Backbone):
    """timm VisionTransformer: CLS, Block<i> (CLS of block i), AvgPatch."""

    family = "vit"
    # Frozen-feature protocols so far; fine-tuning and dense transfer follow their own ViT
    # protocols (MAE's AdamW + layer decay, ViTDet, UperNet): refused until they are built.
    supports = frozenset({"knn", "voc-svm"})

    def layers(self) -> dict[str, Layer]:
        width = int(self.model.embed_dim)
        exposed = {f"Block{i}": Layer(f"Block{i}", width) for i in range(1, len(self.model.blocks) + 1)}
        exposed["AvgPatch"] = Layer("AvgPatch", width)
        exposed["CLS"] = Layer("CLS", width)
        return exposed

    @property
    def feature_layers(self) -> tuple[str, ...]:
        depth = len(self.model.blocks)
        return tuple(f"Block{round(depth * q / 4)}" for q in (1, 2, 3, 4))

    @property
    def default_layer(self) -> str:
        return "CLS"

    def extractor(self, names: Sequence[str]) -> nn.Module:
        self.check_layers(names)
        return ViTFeatures(self.model, tuple(names))


class ViTFeatures(nn.Module):
    """One forward pass through the blocks the names need; class tokens through the final norm."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names
        depth = len(model.blocks)
        self.blocks = sorted({_block_of(name, depth) for name in names})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        m: Any = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        normed: dict[int, torch.Tensor] = {}
        for index, block in enumerate(m.blocks[: self.blocks[-1]], start=1):
            x = block(x)
            if index in self.blocks:
                normed[index] = m.norm(x)
        depth = len(m.blocks)
        out = {}
        for name in self.names:
            tokens = normed[_block_of(name, depth)]
            if name == "AvgPatch":
                out[name] = tokens[:, m.num_prefix_tokens :].mean(dim=1)
            else:
                out[name] = tokens[:, 0]
        return out


def _block_of(name: str, depth: int) -> int:
    return depth if name in ("CLS", "AvgPatch") else int(name.removeprefix("Block"))
