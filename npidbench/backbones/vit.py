"""Plain ViTs (DINO, DINOv2, MoCo v3, MAE, iBOT, timm) as timm's VisionTransformer, behind the
Backbone interface. Attention is timm's, never reimplemented (its names are the ones DINO, MAE
and MoCo v3 write; PROTOCOLS-ARCH.md section 1).

Layers (PROTOCOLS-ARCH.md section 2): ``CLS`` is the class token after the final LayerNorm
(DINO's and DINOv2's kNN feature, VISSL's ``lastCLS``): the default global feature.
``Block<i>`` (1-based) is the class token of block i through the same final norm, as DINO's
``get_intermediate_layers`` gives it; the multi-layer protocols (VOC07 SVM) read four evenly
spaced blocks (3/6/9/12 of 12: no published ViT SVM protocol exists, records say so).
``AvgPatch`` is the mean of the last block's patch tokens after the norm (registers and CLS
excluded), the avgpool half of DINO's and DINOv2's linear features; a model with MAE's fc_norm
(global-pool fine-tuned) gives fc_norm of that mean, its evaluated feature, and it is then the
default layer. The position embedding is interpolated to the evaluation grid as the framework
that trained it does (``ViTSpec.pos_interpolation``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
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
    # How the position embedding reaches another grid: "timm" (timm's resample: bicubic to the
    # size, antialiased; what DINOv2's register models do too) or "dino" (DINO, iBOT and DINOv2
    # without registers: bicubic by the scale factor (g + 0.1) / M, no antialias
    # [dino vision_transformer.py:174-194; dinov2 models/vision_transformer.py:179-210]).
    pos_interpolation: str = "timm"

    @property
    def name(self) -> str:
        """timm's name of the size (vit_small_patch16_224), with what differs from that size's
        standard depth and head count said (MoCo v3's 12-head ViT-S: ``..._heads12``), so that two
        different networks never share a name."""
        size, depth, heads = _SIZES.get(self.embed_dim, (f"d{self.embed_dim}", None, None))
        registers = f"_reg{self.reg_tokens}" if self.reg_tokens else ""
        other = (f"_depth{self.depth}" if self.depth != depth else "") + (
            f"_heads{self.num_heads}" if heads is not None and self.num_heads != heads else ""
        )
        return f"vit_{size}_patch{self.patch_size}{registers}_{self.img_size}{other}"


# width -> (timm's size name, its depth, its heads) [timm vision_transformer.py vit_tiny .. vit_huge]
_SIZES = {
    192: ("tiny", 12, 3),
    384: ("small", 12, 6),
    768: ("base", 12, 12),
    1024: ("large", 24, 16),
    1280: ("huge", 32, 16),
}


def whole_patches(size: int, patch: int) -> int:
    """``size`` rounded up to a whole number of ``patch``-pixel patches: timm's patch embedding
    refuses other sizes [timm layers/patch_embed.py PatchEmbed.forward]."""
    return -(-size // patch) * patch


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
    model.pos_interpolation = spec.pos_interpolation  # read by ViTFeatures
    return model


class ViTBackbone(Backbone):
    """timm VisionTransformer: CLS, Block<i> (CLS of block i), AvgPatch."""

    family = "vit"
    interpolation = "bicubic"  # DINO / DINOv2 eval: Resize(256, interpolation=3) [eval_knn.py]
    # The frozen-feature protocols (semisup: its logistic-regression method; the ResNet
    # fine-tuning grid is refused by semisup's backbone check) and dense transfer by its own
    # protocols (segmentation: mmseg's MAE UperNet, DINOv2's linear head; detection: ViTDet),
    # the ResNet ones refused by the families' backbone checks. The mmselfsup Feature1..5 linear
    # protocol is ResNet-only: refused.
    supports = frozenset({"knn", "voc-svm", "frozen-linear", "semisup", "detection", "segmentation"})

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
        # MAE's global-pool models evaluate fc_norm(mean of patch tokens) [mae models_vit.py]
        return "AvgPatch" if isinstance(getattr(self.model, "fc_norm", None), nn.LayerNorm) else "CLS"

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size[0])

    def linear_input(self, last_blocks: int, avgpool: bool) -> tuple[str, ...] | None:
        depth = len(self.model.blocks)
        if not 1 <= last_blocks <= depth:
            return None
        blocks = tuple(f"Block{i}" for i in range(depth - last_blocks + 1, depth + 1))
        return blocks + ("AvgPatch",) if avgpool else blocks

    def extractor(self, names: Sequence[str]) -> nn.Module:
        self.check_layers(names)
        return ViTFeatures(self.model, tuple(names), getattr(self.model, "pos_interpolation", "timm"))


class ViTFeatures(nn.Module):
    """One forward pass through the blocks the names need; class tokens through the final norm."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], pos_interpolation: str = "timm") -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.pos_interpolation = pos_interpolation
        depth = len(model.blocks)
        self.blocks = sorted({_block_of(name, depth) for name in names})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        m: Any = self.model
        patches = m.patch_embed(images)  # (N, h, w, D): timm's dynamic_img_size layout
        tokens = _dino_pos_embed(m, patches) if self.pos_interpolation == "dino" else m._pos_embed(patches)
        x = m.norm_pre(m.patch_drop(tokens))
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
                out[name] = m.fc_norm(tokens[:, m.num_prefix_tokens :].mean(dim=1))  # Identity unless MAE's
            else:
                out[name] = tokens[:, 0]
        return out


def _dino_pos_embed(m: Any, patches: torch.Tensor) -> torch.Tensor:
    """Class token + patches + position embedding interpolated as DINO does: bicubic by the scale
    factor (grid + 0.1) / trained grid, not antialiased (a class token with its own position, no
    registers: the models that use it)."""
    n, h, w, dim = patches.shape
    pos = m.pos_embed
    side = math.isqrt(pos.shape[1] - 1)
    patch_pos = pos[:, 1:]
    if (h, w) != (side, side):
        grid = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid.float(), scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic", antialias=False
        )
        patch_pos = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, dim)
    tokens = torch.cat([m.cls_token.expand(n, -1, -1), patches.reshape(n, h * w, dim)], dim=1)
    return m.pos_drop(tokens + torch.cat([pos[:, :1], patch_pos], dim=1))


def _block_of(name: str, depth: int) -> int:
    return depth if name in ("CLS", "AvgPatch") else int(name.removeprefix("Block"))
