"""ViTDet: Mask R-CNN on a plain ViT (Li et al. 2022; PROTOCOLS-ARCH.md section 3, detectron2
projects/ViTDet configs/COCO/mask_rcnn_vitdet_b_100ep.py and configs/common/models/
mask_rcnn_vitdet.py), built from the checkpoint's timm ViT and torchvision's Mask R-CNN parts.

- Backbone: the ViT's patch embedding and blocks at stride ``patch``; its 224 position embedding
  without the class entry, interpolated bicubically to the grid (no class token, no registers,
  no final norm: detectron2's ViT ``get_abs_pos`` and ``last_feat``). Every block but the global
  ones attends within non-overlapping windows (zero-padded to whole windows); every block adds
  decomposed relative positions, zero-initialised. The blocks are timm's SAM blocks
  (``timm.models.vision_transformer_sam.Block``: window partition + decomposed relative
  position, ViTDet's design), loaded with the checkpoint block's own tensors (the same names);
  only the relative position tables are new. Stochastic depth rises linearly to ``drop_path``.
- Simple feature pyramid from the last map: x4 = deconv, LN, GELU, deconv; x2 = deconv; x1 =
  identity; x0.5 = max-pool; each then a 1x1 conv + LN and a 3x3 conv + LN to 256 channels
  (no bias before a norm), and P6 = max-pool of the last level (detectron2 SimpleFeaturePyramid,
  LastLevelMaxPool). For a patch-16 ViT that is strides 4, 8, 16, 32, 64.
- Heads: RPN with two 3x3 convs, the 4conv-1fc box head and the mask head with LayerNorm,
  RoIAlign ``aligned=True`` (ROIAlignV2), detectron2's FPN defaults for the proposal counts.
- Input: large-scale jitter in training (flip in the dataset; resize by a scale drawn in
  [0.1, 2.0] of the square target, random crop to it, boxes recomputed from the cropped masks,
  emptied instances dropped: coco_loader_lsj), the long side resized to the target at test, and
  every image zero-padded (after normalisation) to the square target (``square_pad``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, _resize_image_and_masks
from torchvision.ops import masks_to_boxes
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from npidbench.data.images import IMAGENET_MEAN, IMAGENET_STD
from npidbench.transfer.detection import AlignedRoIAlign

PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)
PYRAMID_CHANNELS = 256


def global_blocks(depth: int) -> tuple[int, ...]:
    """ViTDet's global-attention blocks (0-based): the last of every quarter of the network,
    2 / 5 / 8 / 11 for 12 blocks (B), 5 / 11 / 17 / 23 for 24 (L), 7 / 15 / 23 / 31 for 32 (H)."""
    return tuple(sorted({max(depth * q // 4 - 1, 0) for q in (1, 2, 3, 4)}))


def _layer_norm_2d(channels: int) -> nn.Module:
    from timm.layers import LayerNorm2d

    return LayerNorm2d(channels, eps=1e-6)  # detectron2's channel LayerNorm ("LN"), eps 1e-6


class ViTDetTrunk(nn.Module):
    """The single-scale ViT of ViTDet (module docstring): images (N, 3, H, W) -> the last
    block's map (N, D, H / p, W / p)."""

    def __init__(
        self,
        vit: nn.Module,
        grid: tuple[int, int],
        window: int,
        global_indexes: tuple[int, ...],
        drop_path: float,
    ) -> None:
        from timm.models.vision_transformer_sam import Block

        super().__init__()
        depth = len(vit.blocks)
        if any(not 0 <= i < depth for i in global_indexes):
            raise ValueError(f"global blocks {list(global_indexes)} must lie in 0..{depth - 1}")
        self.patch_embed = vit.patch_embed
        self.patch_size = int(vit.patch_embed.patch_size[0])
        width = int(vit.embed_dim)
        prefix = 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)
        # the pretraining grid's positions; the class (and register) entries are never used
        self.pos_embed = nn.Parameter(vit.pos_embed.detach()[:, prefix:].clone())
        self.pretrain_grid = math.isqrt(self.pos_embed.shape[1])
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList()
        for index, (source, rate) in enumerate(zip(vit.blocks, rates, strict=True)):
            is_global = index in global_indexes
            block = Block(
                dim=width,
                num_heads=source.attn.num_heads,
                mlp_ratio=source.mlp.fc1.out_features / width,
                qkv_bias=source.attn.qkv.bias is not None,
                init_values=1.0 if hasattr(source.ls1, "gamma") else None,  # loaded below
                drop_path=rate,
                norm_layer=partial(nn.LayerNorm, eps=source.norm1.eps),
                use_rel_pos=True,
                window_size=0 if is_global else window,
                input_size=grid if is_global else (window, window),
            )
            missing, unexpected = block.load_state_dict(source.state_dict(), strict=False)
            if unexpected or set(missing) != {"attn.rel_pos_h", "attn.rel_pos_w"}:
                raise ValueError(
                    f"block {index} of the ViT does not map onto a ViTDet block: missing {missing}, "
                    f"unexpected {unexpected}"
                )
            self.blocks.append(block)
        self.out_channels = width

    def positions(self, height: int, width: int) -> torch.Tensor:
        """(1, height, width, D): the pretraining grid's embedding resized bicubically (detectron2
        get_abs_pos: F.interpolate, align_corners False)."""
        side = self.pretrain_grid
        grid = self.pos_embed.reshape(1, side, side, -1)
        if (height, width) == (side, side):
            return grid
        resized = F.interpolate(
            grid.permute(0, 3, 1, 2), size=(height, width), mode="bicubic", align_corners=False
        )
        return resized.permute(0, 2, 3, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # (N, h, w, D): timm's dynamic-size layout
        x = x + self.positions(x.shape[1], x.shape[2])
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 3, 1, 2)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from one stride-``patch`` map: levels "0".."3" at patch / 4 .. patch * 2,
    "pool" at patch * 4 (module docstring); ``out_channels`` for torchvision's heads."""

    def __init__(self, trunk: ViTDetTrunk, channels: int = PYRAMID_CHANNELS) -> None:
        super().__init__()
        self.trunk = trunk
        dim = trunk.out_channels
        self.stages = nn.ModuleList()
        for scale in PYRAMID_SCALES:
            if scale == 4.0:
                layers: list[nn.Module] = [
                    nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                    _layer_norm_2d(dim // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
                ]
                inner = dim // 4
            elif scale == 2.0:
                layers, inner = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
            elif scale == 1.0:
                layers, inner = [], dim
            else:
                layers, inner = [nn.MaxPool2d(2, stride=2)], dim
            layers += [
                nn.Conv2d(inner, channels, 1, bias=False),
                _layer_norm_2d(channels),
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                _layer_norm_2d(channels),
            ]
            self.stages.append(nn.Sequential(*layers))
        self.top = LastLevelMaxPool()
        self.out_channels = channels
        self.strides = tuple(int(trunk.patch_size / s) for s in PYRAMID_SCALES) + (trunk.patch_size * 4,)

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        last = self.trunk(images)
        levels = [stage(last) for stage in self.stages]
        names = [str(i) for i in range(len(levels))]
        levels, names = self.top(levels, levels, names)
        return OrderedDict(zip(names, levels, strict=True))


class LSJTransform(GeneralizedRCNNTransform):
    """Normalise, then large-scale jitter in training or the long side to ``size`` at test, and
    pad every image to ``size`` x ``size`` (module docstring). The jitter's scale and crop are
    drawn from torch's generator, which the trainer seeds per iteration."""

    def __init__(self, size: int, scale_range: tuple[float, float], mean: list[float], std: list[float]) -> None:
        super().__init__(size, size, mean, std, size_divisible=1)
        self.size, self.scale_range = size, scale_range

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        height, width = image.shape[-2:]
        if not self.training:
            # ResizeShortestEdge(size, max_size=size): the long side becomes ``size``
            resized, target = _resize_image_and_masks(image, self.size, self.size, target)
            if target is not None and "boxes" in target:
                target["boxes"] = _scaled_boxes(target["boxes"], (height, width), resized.shape[-2:])
            return resized, target
        low, high = self.scale_range
        scale = low + (high - low) * float(torch.rand(()))
        factor = min(self.size * scale / height, self.size * scale / width)  # ResizeScale
        size = (max(1, round(height * factor)), max(1, round(width * factor)))
        resized, target = _resize_image_and_masks(image, self.size, self.size, target, fixed_size=(size[1], size[0]))
        if target is not None:
            target["boxes"] = _scaled_boxes(target["boxes"], (height, width), resized.shape[-2:])
        return self._random_crop(resized, target)

    def _random_crop(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """FixedSizeCrop(pad=False): a ``size`` crop at a uniform offset where the image is
        larger; boxes recomputed from the cropped masks (recompute_boxes), else clipped; the
        instances left empty dropped (filter_empty_instances)."""
        height, width = image.shape[-2:]
        top = int(torch.randint(0, max(height - self.size, 0) + 1, ()))
        left = int(torch.randint(0, max(width - self.size, 0) + 1, ()))
        image = image[:, top : top + self.size, left : left + self.size]
        if target is None:
            return image, target
        crop_h, crop_w = image.shape[-2:]
        boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, crop_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, crop_h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if "masks" in target:
            masks = target["masks"][:, top : top + self.size, left : left + self.size]
            keep &= masks.flatten(1).bool().any(dim=1)
            target["masks"] = masks[keep]
            boxes = masks_to_boxes(masks[keep]) + torch.tensor([0.0, 0.0, 1.0, 1.0])  # pixel extents
        else:
            boxes = boxes[keep]
        target["boxes"] = boxes.reshape(-1, 4)
        target["labels"] = target["labels"][keep]
        return image, target

    def batch_images(self, images: list[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
        """Zero-padded to the square ``size`` (detectron2's square_pad), bottom and right."""
        batch = images[0].new_zeros((len(images), images[0].shape[0], self.size, self.size))
        for padded, image in zip(batch, images, strict=True):
            padded[:, : image.shape[1], : image.shape[2]].copy_(image)
        return batch


def _scaled_boxes(boxes: torch.Tensor, before: tuple[int, int], after: Any) -> torch.Tensor:
    ratio_h, ratio_w = after[0] / before[0], after[1] / before[1]
    return boxes * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=boxes.dtype, device=boxes.device)


def build_vitdet(
    vit: nn.Module,
    classes: int,
    *,
    image_size: int,
    window: int,
    global_indexes: tuple[int, ...] | None = None,
    drop_path: float = 0.1,
    scale_range: tuple[float, float] = (0.1, 2.0),
) -> MaskRCNN:
    """ViTDet's Mask R-CNN (module docstring) on ``vit`` (a timm VisionTransformer, used in
    place: pass a copy) for ``classes`` classes without the background, at the square
    ``image_size``; ``global_indexes`` None: ``global_blocks(depth)``."""
    patch = int(vit.patch_embed.patch_size[0])
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a whole number of {patch}-pixel patches")
    grid = (image_size // patch, image_size // patch)
    indexes = global_blocks(len(vit.blocks)) if global_indexes is None else tuple(global_indexes)
    backbone = SimpleFeaturePyramid(ViTDetTrunk(vit, grid, window, indexes, drop_path))
    anchors = AnchorGenerator(sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    levels = ["0", "1", "2", "3"]
    model = MaskRCNN(
        backbone,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(PYRAMID_CHANNELS, 3, conv_depth=2),  # "2conv in RPN"
        # detectron2's FPN RPN: 2000 / 1000 pre-NMS per level, 1000 kept in training and test
        rpn_pre_nms_top_n_train=2000,
        rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_train=1000,
        rpn_post_nms_top_n_test=1000,
        box_roi_pool=AlignedRoIAlign(levels, output_size=7, sampling_ratio=0),
        mask_roi_pool=AlignedRoIAlign(levels, output_size=14, sampling_ratio=0),
        box_head=FastRCNNConvFCHead(
            (PYRAMID_CHANNELS, 7, 7), [256, 256, 256, 256], [1024], norm_layer=_layer_norm_2d
        ),
        box_predictor=FastRCNNPredictor(1024, classes + 1),
        mask_head=MaskRCNNHeads(PYRAMID_CHANNELS, [256, 256, 256, 256], 1, norm_layer=_layer_norm_2d),
        mask_predictor=MaskRCNNPredictor(256, 256, classes + 1),
        box_detections_per_img=100,
        box_score_thresh=0.05,
    )
    # ImageNet mean / std on RGB (constants.imagenet_rgb256_mean / std)
    model.transform = LSJTransform(image_size, scale_range, list(IMAGENET_MEAN), list(IMAGENET_STD))
    return model
