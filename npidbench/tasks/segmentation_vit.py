"""The ViT / ConvNeXt protocols of the segmentation family (``head`` upernet / linear; the
family's module docstring): the network of transfer/vit_segmentation.py with its new layers drawn
from the trial's seed, and AdamW over the protocol's parameter groups: mmseg's layer-wise lr decay
for a ViT (LearningRateDecayOptimizerConstructor; ``training.layer_decay.vit_layer``), the ConvNeXt
repo's stage-wise one (semantic_segmentation/mmcv_custom/layer_decay_optimizer_constructor.py;
``convnext_stage``), iBOT's plain AdamW for the linear head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from npidbench.backbones import Backbone
from npidbench.distributed import prepare_for_training
from npidbench.tasks import dense
from npidbench.training.layer_decay import convnext_stage, layer_decay_groups, vit_layer
from npidbench.transfer.vit_segmentation import linear, upernet

if TYPE_CHECKING:
    from npidbench.tasks.segmentation import Config


def build_model(
    trial: dense.Trial, config: Config, classes: int
) -> tuple[nn.Module, nn.Module, torch.optim.AdamW]:
    """(model, what trains it, its optimizer) for head=upernet (ViT, ConvNeXt) and head=linear
    (ViT): the network of transfer/vit_segmentation.py, its new layers drawn from the trial's
    seed, prepared for its world (SyncBN, DDP), and AdamW (betas 0.9 / 0.999, the configs') over
    ``param_groups``."""
    backbone = trial.ctx.model.backbone
    torch.manual_seed(trial.seed)  # the heads' (and the relative position tables') initial weights
    if config.head == "upernet":
        model: nn.Module = upernet(
            backbone,
            classes,
            crop=config.crop,
            channels=config.channels,
            aux_channels=config.aux_channels,
            drop_path=drop_path_for(config, backbone),
            align_corners=config.align_corners,
        )
    else:
        model = linear(backbone, classes, config.linear_blocks, config.align_corners)
    model, wrapped = prepare_for_training(
        model, trial.world, config.sync_bn, channels_last=backbone.family == "convnext"
    )
    groups = param_groups(model, config, backbone)
    optimizer = torch.optim.AdamW(
        groups, lr=config.scaled_lr, betas=(0.9, 0.999), weight_decay=config.weight_decay
    )
    return model, wrapped, optimizer


def drop_path_for(config: Config, backbone: Backbone) -> float:
    if backbone.family != "convnext":
        return config.drop_path
    if config.convnext_drop_path is not None:
        return config.convnext_drop_path
    # the ConvNeXt repo's configs: drop_path_rate 0.3 for ConvNeXt-S (depths 3-3-27-3, width 96),
    # 0.4 for T (3-3-9-3), B, L and XL
    stages = backbone.model.stages
    small = len(stages[2].blocks) > 9 and int(stages[0].blocks[-1].mlp.fc2.out_features) == 96
    return 0.3 if small else 0.4


def stage_decay_layers_for(config: Config, backbone: Backbone) -> int:
    if config.stage_decay_layers is not None:
        return config.stage_decay_layers
    # the ConvNeXt configs' paramwise_cfg num_layers: 6 for ConvNeXt-T, 12 for S, B, L and XL
    return 6 if len(backbone.model.stages[2].blocks) <= 9 else 12


def _decays(name: str, parameter: nn.Parameter) -> bool:
    """Weight decay as mmseg's LearningRateDecayOptimizerConstructor (and the ConvNeXt repo's)
    gives it: none on 1-d tensors (norms, layer scale, BN) and on ``.bias``. Its third exception,
    ``name in ('pos_embed', 'cls_token')``, compares the segmentor's full names
    ("backbone.pos_embed") and never holds, so the position embedding, the class token and the
    relative position tables were decayed in the published runs: kept so here."""
    return parameter.ndim > 1 and not name.endswith(".bias")


def param_groups(model: nn.Module, config: Config, backbone: Backbone) -> list[dict[str, Any]]:
    """The optimizer groups. upernet on a ViT: mmseg's layer-wise decay (``vit_layer``: the
    embeddings rate^(depth + 1), block i rate^(depth - i), neck and heads 1); on a ConvNeXt the
    repo's stage-wise decay (``convnext_stage``); weight decay by ``_decays``. linear: the head's
    parameters in one group, every one decayed (iBOT's plain AdamW: no paramwise_cfg)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if config.head == "linear":
        return [{"params": [p for _, p in trainable]}]
    if backbone.family == "vit":
        depth = len(model.backbone.vit.blocks)
        return layer_decay_groups(
            trainable,
            lambda name: vit_layer(name, depth, "backbone.vit."),
            depth,
            config.layer_decay,
            config.weight_decay,
            _decays,
        )
    layers = stage_decay_layers_for(config, backbone)
    return layer_decay_groups(
        trainable,
        lambda name: convnext_stage(name, layers, "backbone."),
        layers,
        config.stage_decay,
        config.weight_decay,
        _decays,
    )


def model_details(model: nn.Module, config: Config, backbone: Backbone) -> dict[str, Any]:
    """What the record says of a upernet / linear network beyond its config: the ViT blocks read
    (0-based), and where it fine-tunes the UPerHead width, lr decay and drop path it ran with."""
    details: dict[str, Any] = {}
    if backbone.family == "vit":
        details["blocks"] = list(model.backbone.blocks)
    if config.head == "upernet":
        details["channels"] = int(model.head.classifier.in_channels)
        details["drop_path"] = drop_path_for(config, backbone)
        if backbone.family == "vit":
            details["lr_decay"] = {"layer_wise": config.layer_decay}
        else:
            details["lr_decay"] = {
                "stage_wise": config.stage_decay,
                "num_layers": stage_decay_layers_for(config, backbone),
            }
    return details
