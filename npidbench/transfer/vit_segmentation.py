"""Segmentation networks on ViTs and ConvNeXts (PROTOCOLS-ARCH.md section 3), on timm's modules.

``upernet``: the checkpoint's trunk fine-tunes under UPerHead + an auxiliary FCN head (loss 0.4):
- ViT: mmseg's MAE UperNet (configs/mae/upernet_mae-base_fp16_8x2_512x512_160k_ade20k.py, the
  config of its 48.13 mIoU; _base_/models/upernet_mae.py). mmseg's MAE backbone
  (mmseg/models/backbones/mae.py, on beit.py) was read for what it does with an MAE checkpoint:
  every block has a BEiT relative position bias (``MAEAttention``: BEiTAttention with the table
  zero-initialised, as the checkpoint has none; a (2Wh-1)(2Ww-1) + 3 table per head over the
  training crop's Wh x Ww grid, the 3 for class->patch, patch->class, class->class), layer
  scale gamma_1 / gamma_2 at init_values 1.0 (the config's; the checkpoint has none), full qkv
  bias, drop path rising linearly to 0.1, no final norm (final_norm=False: the maps are the raw
  block outputs, class token dropped), the absolute position embedding resized to the crop grid.
  Here: timm's blocks with ``RelativePositionBias`` passed as the attention's additive mask,
  timm's LayerScale added where the checkpoint has none (a checkpoint's own layer scale, DINOv2's,
  is kept), the position embedding interpolated per input as the ViT backbone does (the mode of
  the framework that trained it). The maps of blocks 4 / 6 / 8 / 12 of 12 (out_indices
  [3, 5, 7, 11]; evenly spaced for other depths: ``pyramid_blocks``) go through Feature2Pyramid.
  The bias covers the training crop's grid: the test slides windows no larger than the crop, as
  mmseg does ("relative position embedding requires the input length and width to be equal",
  configs/mae/README.md; test_cfg slide 512, stride 341).
- ConvNeXt: the ConvNeXt repo's UperNet (semantic_segmentation/backbone/convnext.py,
  configs/convnext/upernet_convnext_*_512_160k_ade20k_ss.py): the four stage outputs, each through a
  new channels-first LayerNorm (eps 1e-6; ``norm0..3``), feed UPerHead directly; drop path rises
  linearly over all blocks.
``linear``: DINOv2's linear head (``BNHead``) on a frozen ViT (eval mode, no gradient): the patch
maps of the chosen blocks through the final norm (get_intermediate_layers(norm=True)), bilinearly
resized to the first one's size and concatenated.
Inputs whose sides are not whole patches are zero-padded around the centre (DINOv2's
CenterPadding, after normalisation as mmseg pads) and the logits cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from npidbench.backbones import Backbone
from npidbench.backbones.vit import _dino_pos_embed
from npidbench.transfer.seg_heads import BNHead, Feature2Pyramid, UPerHead, resized
from npidbench.transfer.segmentation import FCNHead

AUX_LEVEL = 2  # in_index of the auxiliary FCNHead: the third level (stride 16)


def pyramid_blocks(depth: int) -> tuple[int, ...]:
    """0-based blocks whose maps feed the pyramid: mmseg MAE's out_indices (3, 5, 7, 11) for 12,
    the same fractions 4/12, 6/12, 8/12, 12/12 of other depths (BEiT-L's 7, 11, 15, 23 of 24)."""
    return tuple(max(round(depth * k / 12), 1) - 1 for k in (4, 6, 8, 12))


def linear_blocks(depth: int, choice: str) -> tuple[int, ...]:
    """0-based blocks of the linear head: ``last`` (DINOv2 "linear"), ``last4`` (DINOv2's
    multi-layer head), ``ibot`` (iBOT's out_indices [3, 5, 7, 11]: ``pyramid_blocks``)."""
    if choice == "last":
        return (depth - 1,)
    if choice == "last4":
        return tuple(range(max(depth - 4, 0), depth))
    return pyramid_blocks(depth)


class RelativePositionBias(nn.Module):
    """BEiT's relative position bias over a ``window`` grid (module docstring), zero-initialised;
    ``forward(h, w, prefix)`` gives the (heads, N, N) additive attention bias of a grid of at
    most that size after ``prefix`` class / register tokens (all of which take the class entries)."""

    def __init__(self, window: tuple[int, int], heads: int) -> None:
        super().__init__()
        self.window = window
        self.table = nn.Parameter(torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1) + 3, heads))
        self._index: dict[tuple[int, int, int, str], torch.Tensor] = {}

    def index(self, height: int, width: int, prefix: int) -> torch.Tensor:
        key = (height, width, prefix, str(self.table.device))
        if key not in self._index:
            wh, ww = self.window
            if height > wh or width > ww:
                raise ValueError(
                    f"a {height}x{width}-patch input is larger than the {wh}x{ww} grid the relative "
                    "position bias covers (the training crop): test with test_mode=slide and "
                    "slide_crop <= crop"
                )
            ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
            ys, xs = ys.flatten(), xs.flatten()
            patches = (ys[:, None] - ys[None, :] + wh - 1) * (2 * ww - 1) + (
                xs[:, None] - xs[None, :] + ww - 1
            )
            offsets = self.table.shape[0] - 3
            n = prefix + height * width
            index = torch.empty(n, n, dtype=torch.long)
            index[prefix:, prefix:] = patches
            index[:prefix, :] = offsets  # class (query) -> patch
            index[:, :prefix] = offsets + 1  # patch -> class (key)
            index[:prefix, :prefix] = offsets + 2  # class -> class
            self._index[key] = index.to(self.table.device)
        return self._index[key]

    def forward(self, height: int, width: int, prefix: int) -> torch.Tensor:
        n = prefix + height * width
        return self.table[self.index(height, width, prefix).view(-1)].view(n, n, -1).permute(2, 0, 1)


def _attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the attention's queries have (the autocast dtype where autocast is on): a float
    mask must match it in scaled_dot_product_attention."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class ViTTrunk(nn.Module):
    """(N, C, H/p, W/p) patch-token maps of ``blocks`` (0-based) of timm ViT ``vit``, which it
    changes in place: the blocks after the last one and the unused final norm / heads are dropped;
    optionally drop path rising linearly to ``drop_path``, layer scale at ``layer_scale`` where a
    block has none, a relative position bias over a ``window`` grid in every block."""

    def __init__(
        self,
        vit: nn.Module,
        blocks: Sequence[int],
        *,
        final_norm: bool,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        window: tuple[int, int] | None = None,
    ) -> None:
        from timm.layers import DropPath, LayerScale

        super().__init__()
        self.blocks = tuple(blocks)
        self.width = int(vit.embed_dim)
        self.pos_interpolation = getattr(vit, "pos_interpolation", "timm")
        depth = len(vit.blocks)
        vit.blocks = vit.blocks[: max(self.blocks) + 1]
        if not final_norm:
            vit.norm = nn.Identity()
        vit.fc_norm, vit.head = nn.Identity(), nn.Identity()
        rates = torch.linspace(0, drop_path, depth).tolist()  # mmseg BEiT / MAE: linspace(0, dpr, depth)
        for block, rate in zip(vit.blocks, rates, strict=False):
            if rate > 0:
                block.drop_path1, block.drop_path2 = DropPath(rate), DropPath(rate)
            if layer_scale is not None and isinstance(block.ls1, nn.Identity):
                block.ls1 = LayerScale(self.width, init_values=layer_scale)
                block.ls2 = LayerScale(self.width, init_values=layer_scale)
            if window is not None:
                block.rel_pos = RelativePositionBias(window, block.attn.num_heads)
        self.vit = vit

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        m: Any = self.vit
        patches = m.patch_embed(images)  # (N, h, w, D): timm's dynamic_img_size layout
        n, h, w, _ = patches.shape
        x = _dino_pos_embed(m, patches) if self.pos_interpolation == "dino" else m._pos_embed(patches)
        x = m.norm_pre(m.patch_drop(x))
        prefix = m.num_prefix_tokens
        maps: dict[int, torch.Tensor] = {}
        for index, block in enumerate(m.blocks):
            bias = (
                block.rel_pos(h, w, prefix)[None].to(_attention_dtype(x))
                if hasattr(block, "rel_pos")
                else None
            )
            x = block(x, attn_mask=bias)
            if index in self.blocks:
                tokens = m.norm(x)[:, prefix:]  # class token and registers dropped
                maps[index] = tokens.transpose(1, 2).reshape(n, self.width, h, w)
        return [maps[i] for i in self.blocks]


class ConvNeXtTrunk(nn.Module):
    """The four stage maps of timm ConvNeXt ``convnext`` (its stem and stages), each through a new
    LayerNorm (channels first, eps 1e-6); drop path rising linearly to ``drop_path``."""

    def __init__(self, convnext: nn.Module, drop_path: float = 0.0) -> None:
        from timm.layers import DropPath, LayerNorm2d

        super().__init__()
        self.stem, self.stages = convnext.stem, convnext.stages
        self.widths = [int(stage.blocks[-1].mlp.fc2.out_features) for stage in self.stages]
        self.norms = nn.ModuleList(LayerNorm2d(width, eps=1e-6) for width in self.widths)
        blocks = [block for stage in self.stages for block in stage.blocks]
        for block, rate in zip(blocks, torch.linspace(0, drop_path, len(blocks)).tolist(), strict=True):
            block.drop_path = DropPath(rate) if rate > 0 else nn.Identity()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x, maps = self.stem(images), []
        for stage, norm in zip(self.stages, self.norms, strict=True):
            x = stage(x)
            maps.append(norm(x))
        return maps


def center_pad(images: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``images`` zero-padded to sides that are multiples of ``multiple``, the extra split around
    the centre (DINOv2's CenterPadding); with the (top, left) offset of the original."""
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if not pad_h and not pad_w:
        return images, (0, 0)
    top, left = pad_h // 2, pad_w // 2
    return F.pad(images, (left, pad_w - left, top, pad_h - top)), (top, left)


class _Segmenter(nn.Module):
    """What the segmenters share: inputs padded to whole ``multiple`` s (``center_pad``), logits
    upsampled to the padded size and cropped back to the input's (``_at_input``)."""

    align_corners: bool
    multiple: int

    def _at_input(
        self, logits: torch.Tensor, padded: torch.Tensor, images: torch.Tensor, at: tuple[int, int]
    ) -> torch.Tensor:
        out = resized(logits, padded.shape[-2:], self.align_corners)
        height, width = images.shape[-2:]
        return out[..., at[0] : at[0] + height, at[1] : at[1] + width]


class UperNetSegmenter(_Segmenter):
    """Trunk (+ Feature2Pyramid for a ViT) -> UPerHead, and the auxiliary FCNHead (1 conv, no
    concat) on the third level in training: (main, aux | None) logits at the input size."""

    def __init__(
        self,
        backbone: ViTTrunk | ConvNeXtTrunk,
        classes: int,
        channels: int,
        aux_channels: int,
        align_corners: bool = False,
        multiple: int = 1,
    ) -> None:
        super().__init__()
        self.align_corners, self.multiple = align_corners, multiple
        self.backbone = backbone
        if isinstance(backbone, ViTTrunk):
            self.neck: nn.Module | None = Feature2Pyramid(backbone.width)
            widths = [backbone.width] * 4
        else:
            self.neck, widths = None, backbone.widths
        self.head = UPerHead(widths, channels, classes, align_corners)
        self.aux_head = FCNHead(widths[AUX_LEVEL], aux_channels, classes, convs=1, concat_input=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        padded, at = center_pad(images, self.multiple)
        levels = self.backbone(padded)
        if self.neck is not None:
            levels = self.neck(levels)
        main = self._at_input(self.head(levels), padded, images, at)
        if not self.training:
            return main, None
        return main, self._at_input(self.aux_head(levels[AUX_LEVEL]), padded, images, at)


class LinearSegmenter(_Segmenter):
    """A frozen ViTTrunk (always in eval mode, no gradient) -> its maps resized to the first's
    size, concatenated (width x blocks channels) -> BNHead: (logits at the input size, None)."""

    def __init__(
        self, backbone: ViTTrunk, classes: int, align_corners: bool = False, multiple: int = 1
    ) -> None:
        super().__init__()
        self.align_corners, self.multiple = align_corners, multiple
        self.backbone = backbone.requires_grad_(False).eval()
        self.head = BNHead(backbone.width * len(backbone.blocks), classes)

    def train(self, mode: bool = True) -> LinearSegmenter:
        super().train(mode)
        self.backbone.eval()  # frozen: dropout, drop path and any norm stay in eval mode
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        padded, at = center_pad(images, self.multiple)
        with torch.no_grad():
            maps = self.backbone(padded)
        size = maps[0].shape[-2:]
        x = torch.cat([maps[0]] + [resized(m, size, self.align_corners) for m in maps[1:]], dim=1)
        return self._at_input(self.head(x), padded, images, at), None


def upernet(
    backbone: Backbone,
    classes: int,
    *,
    crop: int,
    channels: int,
    aux_channels: int,
    drop_path: float,
    align_corners: bool = False,
) -> UperNetSegmenter:
    """The UperNet of the module docstring on a copy of ``backbone``'s network (ViT or ConvNeXt);
    a ViT's relative position bias covers the ``crop`` grid (whole patches after padding)."""
    import copy

    network = copy.deepcopy(backbone.model)
    if backbone.family == "vit":
        patch = backbone.patch_size
        side = math.ceil(crop / patch)
        trunk: ViTTrunk | ConvNeXtTrunk = ViTTrunk(
            network,
            pyramid_blocks(len(network.blocks)),
            final_norm=False,
            drop_path=drop_path,
            layer_scale=1.0,  # mmseg MAE config: init_values=1.0
            window=(side, side),
        )
        return UperNetSegmenter(trunk, classes, channels or trunk.width, aux_channels, align_corners, patch)
    trunk = ConvNeXtTrunk(network, drop_path)
    return UperNetSegmenter(trunk, classes, channels or 512, aux_channels, align_corners)


def linear(backbone: Backbone, classes: int, blocks: str, align_corners: bool = False) -> LinearSegmenter:
    """DINOv2's linear head on a frozen copy of ``backbone``'s ViT (``linear_blocks``)."""
    import copy

    network = copy.deepcopy(backbone.model)
    trunk = ViTTrunk(network, linear_blocks(len(network.blocks), blocks), final_norm=True)
    return LinearSegmenter(trunk, classes, align_corners, backbone.patch_size)
