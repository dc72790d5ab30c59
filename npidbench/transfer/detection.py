"""Detectors built from the checkpoint's ResNet (or, in the FPN detector, ConvNeXt) with
torchvision.models.detection parts (PROTOCOLS.md "Detection"; MoCo's detectron2 configs,
mmdetection's Mask R-CNN FPN). ViTs: ``transfer.vitdet``.

- ``c4``: Faster R-CNN R50-C4: stem + res2..res4 feed the RPN (15 anchors per position) and a
  14x14 RoIAlign; res5 (with its stride) is the box head, followed by the extra BatchNorm of
  MoCo's Res5ROIHeadsExtraNorm, then global average pooling. Works on layer4 of any ResNet
  (512 channels for ResNet-18/34).
- ``fpn``: Mask R-CNN R50-FPN with BatchNorm in the FPN, the 4conv-1fc box head and the mask head
  (mmdetection's "SyncBN in backbone, neck and heads"); a ConvNeXt's four stages feed the same
  FPN through a LayerNorm each (``ConvNeXtStages``).
torchvision's builders freeze BN (FrozenBatchNorm2d) and the first stages; here every stage
and every BN trains (FREEZE_AT 0), and under torchrun on GPUs BN becomes SyncBatchNorm.

RoI features are pooled with RoIAlign ``aligned=True`` (the half-pixel shift) in both
detectors, box and mask heads: detectron2's ROI_BOX_HEAD / ROI_MASK_HEAD.POOLER_TYPE default
"ROIAlignV2" (detectron2/config/defaults.py:308, :361; poolers.py:170 builds it with
aligned=True), which MoCo's configs keep, and mmcv's RoIAlign default ``aligned=True``
(mmcv/ops/roi_align.py, RoIAlign.__init__) under mmdetection's Mask R-CNN. torchvision's
MultiScaleRoIAlign calls roi_align with aligned=False.
"""

from __future__ import annotations

import math
import typing
from collections import OrderedDict
from typing import Literal

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.poolers import initLevelMapper

from npidbench.backbones.resnet import layer_channels
from npidbench.data.images import IMAGENET_MEAN, IMAGENET_STD

Head = Literal["c4", "fpn", "vitdet"]  # the detection Config's ``head`` (checked by the config coercer)
HEADS: tuple[Head, ...] = typing.get_args(Head)

# detectron2's norm_module_types (detectron2/solver/build.py, get_default_optimizer_params):
# the layers whose weight and bias get SOLVER.WEIGHT_DECAY_NORM. _NormBase covers BatchNorm1d/2d/3d,
# SyncBatchNorm and InstanceNorm1d/2d/3d.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


class AlignedRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (the same feature maps, scales and FPN level mapping:
    level = floor(4 + log2(sqrt(area) / 224)), clamped) with ``roi_align(aligned=True)``,
    detectron2's ROIAlignV2. One feature map (C4) is pooled directly."""

    def forward(
        self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes: list[tuple[int, int]]
    ) -> torch.Tensor:
        features = [v for k, v in x.items() if k in self.featmap_names]
        # stride of each map, as torchvision infers it: 2 ** round(log2(map height / image height))
        height = max(shape[0] for shape in image_shapes)
        scales = [2.0 ** round(math.log2(f.shape[-2] / height)) for f in features]
        index = torch.cat(
            [torch.full((len(b), 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)]
        )
        rois = torch.cat([index, torch.cat(boxes)], dim=1)
        if len(features) == 1:
            return roi_align(
                features[0], rois, self.output_size, scales[0], self.sampling_ratio, aligned=True
            )
        low, high = -math.log2(scales[0]), -math.log2(scales[-1])
        levels = initLevelMapper(
            int(low), int(high), canonical_scale=self.canonical_scale, canonical_level=self.canonical_level
        )(boxes)
        out = features[0].new_zeros((len(rois), features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, scales, strict=True)):
            keep = torch.where(levels == level)[0]
            pooled = roi_align(
                feature, rois[keep], self.output_size, scale, self.sampling_ratio, aligned=True
            )
            out[keep] = pooled.to(out.dtype)
        return out


def parameter_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float) -> list[dict]:
    """SGD parameter groups: the weight and bias of every normalisation layer (``NORM_LAYERS``)
    with ``norm_weight_decay``, every other trainable parameter (other biases included) with
    ``weight_decay``; empty groups left out. detectron2: SOLVER.WEIGHT_DECAY_NORM = 0.0 by
    default (detectron2/config/defaults.py:541), WEIGHT_DECAY_BIAS None = WEIGHT_DECAY (:577).
    mmdetection's optimizer without paramwise_cfg decays every parameter alike."""
    norm, other, seen = [], [], set()
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            (norm if isinstance(module, NORM_LAYERS) else other).append(parameter)
    groups = [
        {"params": other, "weight_decay": weight_decay},
        {"params": norm, "weight_decay": norm_weight_decay},
    ]
    return [g for g in groups if g["params"]]


class C4Trunk(nn.Module):
    """stem + res2..res4: the C4 detector's shared feature map (stride 16)."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        self.out_channels = layer_channels(resnet)["Feature4"]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return OrderedDict([("0", self.layer3(self.layer2(self.layer1(x))))])


class Res5BoxHead(nn.Module):
    """res5 on the 14x14 RoI features (stride 2 -> 7x7), extra BN (MoCo), global average pool."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.res5 = resnet.layer4
        self.out_channels = layer_channels(resnet)["Feature5"]
        self.norm = nn.BatchNorm2d(self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.res5(x)).mean(dim=(2, 3))


class ConvNeXtStages(nn.Module):
    """A timm ConvNeXt's four stage maps (strides 4..32), each through a new channel LayerNorm:
    the ConvNeXt detection backbone's ``norm{i}`` on every output it hands to the FPN
    (ConvNeXt repo object_detection/mmdet/models/backbones/convnext.py, out_indices 0-3)."""

    def __init__(self, convnext: nn.Module) -> None:
        from timm.layers import LayerNorm2d

        super().__init__()
        self.stem, self.stages = convnext.stem, convnext.stages
        self.channels = [int(info["num_chs"]) for info in convnext.feature_info]
        self.norms = nn.ModuleList(LayerNorm2d(c, eps=1e-6) for c in self.channels)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.stem(x)
        out = OrderedDict()
        for index, (stage, norm) in enumerate(zip(self.stages, self.norms, strict=True)):
            x = stage(x)
            out[str(index)] = norm(x)
        return out


class PyramidBackbone(nn.Module):
    """``body`` (a dict of stride-4..32 maps) + torchvision's FPN with BatchNorm and P6 max-pool:
    what BackboneWithFPN computes, for a body that is not a ResNet."""

    def __init__(self, body: nn.Module, in_channels: list[int]) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, 256, LastLevelMaxPool(), norm_layer=nn.BatchNorm2d)
        self.out_channels = 256

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def fpn_backbone(network: nn.Module) -> nn.Module:
    """The FPN detector's backbone on a ResNet (res2..res5) or a timm ConvNeXt (its four stages,
    as the ConvNeXt paper's Mask R-CNN): 256 channels, BatchNorm in the FPN (the protocol's
    "SyncBN in backbone, neck and heads")."""
    if hasattr(network, "stages") and hasattr(network, "stem"):
        body = ConvNeXtStages(network)
        return PyramidBackbone(body, body.channels)
    channels = layer_channels(network)
    return BackboneWithFPN(
        network,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[channels[f"Feature{i}"] for i in (2, 3, 4, 5)],
        out_channels=256,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=nn.BatchNorm2d,
    )


def build_detector(
    resnet: nn.Module,
    head: str,
    classes: int,
    min_size: tuple[int, ...],
    max_size: int,
    test_min_size: int,
    roi_resolution: int = 14,
    *,
    imagenet_norm: bool = True,
) -> nn.Module:
    """A trainable detector whose backbone weights are ``resnet``'s (``classes`` without the
    background). ``min_size``: the short sides drawn in training; ``test_min_size`` at test.
    ``imagenet_norm=False``: the network sees the [0, 1] pixels as they are (SimCLR v1)."""
    common = dict(
        min_size=min_size,
        max_size=max_size,
        # MoCo's configs: RGB input, torchvision mean/std; (x - 0) / 1 keeps [0, 1] pixels exactly.
        image_mean=list(IMAGENET_MEAN) if imagenet_norm else [0.0, 0.0, 0.0],
        image_std=list(IMAGENET_STD) if imagenet_norm else [1.0, 1.0, 1.0],
        box_detections_per_img=100,
        box_score_thresh=0.05,
    )
    if head == "c4":
        anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
        trunk = C4Trunk(resnet)
        box_head = Res5BoxHead(resnet)
        model = FasterRCNN(
            trunk,
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(trunk.out_channels, anchors.num_anchors_per_location()[0]),
            # detectron2's POOLER_SAMPLING_RATIO 0 (adaptive), ROIAlignV2
            box_roi_pool=AlignedRoIAlign(["0"], output_size=roi_resolution, sampling_ratio=0),
            box_head=box_head,
            box_predictor=FastRCNNPredictor(box_head.out_channels, classes + 1),
            # detectron2's C4 defaults: proposals before / after NMS
            rpn_pre_nms_top_n_train=12000,
            rpn_pre_nms_top_n_test=6000,
            rpn_post_nms_top_n_train=2000,
            rpn_post_nms_top_n_test=1000,
            **common,
        )
    elif head == "fpn":
        backbone = fpn_backbone(resnet)
        anchors = AnchorGenerator(
            sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5
        )
        model = MaskRCNN(
            backbone,
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(256, 3, conv_depth=1),
            # mmdetection's Mask R-CNN FPN: RoIAlign 7x7 (box) and 14x14 (mask) over P2-P5,
            # sampling_ratio=0 (configs/_base_/models/mask_rcnn_r50_fpn.py roi_layer), aligned=True
            box_roi_pool=AlignedRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=0),
            mask_roi_pool=AlignedRoIAlign(["0", "1", "2", "3"], output_size=14, sampling_ratio=0),
            box_head=FastRCNNConvFCHead((256, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d),
            box_predictor=FastRCNNPredictor(1024, classes + 1),
            mask_head=MaskRCNNHeads(256, [256, 256, 256, 256], 1, norm_layer=nn.BatchNorm2d),
            mask_predictor=MaskRCNNPredictor(256, 256, classes + 1),
            **common,
        )
    else:
        raise ValueError(f"unknown detector head {head}; choose one of {', '.join(HEADS)}")
    model.transform = _SizedTransform(
        min_size, test_min_size, max_size, common["image_mean"], common["image_std"]
    )
    return model


class _SizedTransform(GeneralizedRCNNTransform):
    """torchvision's transform tests at ``min_size[-1]``: here the short side is drawn from the
    training sizes in train mode and is the protocol's test size in eval mode."""

    def __init__(
        self, train_sizes: tuple[int, ...], test_size: int, max_size: int, mean: list[float], std: list[float]
    ) -> None:
        super().__init__(tuple(train_sizes), max_size, mean, std)
        self.train_sizes, self.test_size = tuple(train_sizes), test_size

    def train(self, mode: bool = True) -> _SizedTransform:
        self.min_size = self.train_sizes if mode else (self.test_size,)
        return super().train(mode)


@torch.no_grad()
def precise_bn(model: nn.Module, batches, iterations: int, forward) -> None:
    """Recompute every BatchNorm's running statistics as the plain average over ``iterations``
    training batches (detectron2's PreciseBN), the weights unchanged."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or iterations < 1:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    done = 0
    for batch in batches:
        forward(batch)
        done += 1
        if done >= iterations:
            break
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
