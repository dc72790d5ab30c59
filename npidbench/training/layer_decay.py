"""Layer-wise lr decay for ViTs: the parameter groups of MAE's fine-tuning, ViTDet and mmseg's
BEiT / MAE UperNet, which agree on the layer of a parameter and on its lr scale.

- A ViT of ``depth`` blocks has ``depth + 2`` layers: 0 the embeddings (patch embedding, class
  token, position embedding, registers), i + 1 block i (0-based), ``depth + 1`` everything else
  (final norm, heads, necks, the simple feature pyramid).
- Layer l trains at lr x ``rate ** (depth + 1 - l)``: the head at 1, the last block at ``rate``,
  the embeddings at ``rate ** (depth + 1)``.
Sources: mae util/lr_decay.py (get_layer_id_for_vit, param_groups_lrd); detectron2
projects/ViTDet (detectron2/modeling/backbone/vit.py get_vit_lr_decay_rate: patch/pos embed 0,
``.blocks.i.`` i + 1, else depth + 1; scale rate ** (depth + 1 - layer)); mmseg
LayerDecayOptimizerConstructor for BEiT / MAE (num_layers = depth + 2, ``layers.i`` i + 1, others
num_layers - 1, scale rate ** (num_layers - layer - 1): the same numbers).

Written here rather than with timm's ``param_groups_layer_decay``: timm counts the layers from
the modules that still hold parameters of the model it is given, so a detector or segmenter
around the ViT (or a dropped final norm) would shift every block's scale.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

EMBEDDINGS = ("patch_embed", "cls_token", "pos_embed", "reg_token", "dist_token", "mask_token")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def vit_layer(name: str, depth: int, prefix: str = "") -> int:
    """The layer (module docstring) of parameter ``name`` of a model whose ViT sits at ``prefix``
    (e.g. ``"backbone.vit."``; "" for the bare ViT): names outside the ViT are after its blocks."""
    if not name.startswith(prefix):
        return depth + 1
    local = name[len(prefix) :]
    if local.split(".")[0] in EMBEDDINGS:
        return 0
    found = _BLOCK.match(local)
    return int(found[1]) + 1 if found else depth + 1


def layer_decay_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    layer_of: Callable[[str], int],
    depth: int,
    rate: float,
    weight_decay: float,
    decays: Callable[[str, nn.Parameter], bool],
) -> list[dict[str, Any]]:
    """Optimizer groups by (layer, decayed or not), each with ``lr_scale`` = rate^(depth + 1 -
    layer) (the trainer multiplies the group's lr by it) and its ``layer``; parameters that do
    not train are left out. ``decays(name, parameter)``: whether it takes ``weight_decay``
    (else 0: each protocol names its exceptions)."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        layer, decayed = layer_of(name), decays(name, parameter)
        group = groups.setdefault(
            (layer, decayed),
            {
                "params": [],
                "weight_decay": weight_decay if decayed else 0.0,
                "lr_scale": rate ** (depth + 1 - layer),
                "layer": layer,
            },
        )
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


_CONVNEXT_STAGE = re.compile(r"stages\.(\d+)\.(downsample|blocks)\.")


def convnext_stage(name: str, num_layers: int, prefix: str = "") -> int:
    """The layer of parameter ``name`` (timm names, the ConvNeXt at ``prefix``) in the ConvNeXt
    repo's ``stage_wise`` lr decay (semantic_segmentation/mmcv_custom/
    layer_decay_optimizer_constructor.py, get_num_layer_stage_wise and add_params, at 048efce):
    the stem and every downsampling layer (FB ``downsample_layers.i``: timm's ``stem`` and
    ``stages.i.downsample``) 0, the blocks of stage i (FB ``stages.i``) i + 1, everything else
    (the stage-output norms, the heads) ``num_layers + 1``. ``num_layers`` is the config's
    (6 for ConvNeXt-T, 12 for S / B / L / XL): with ``layer_decay_groups(..., depth=num_layers)``
    the scales are the repo's rate^(num_layers + 1 - layer): stem and downsampling layers
    rate^(num_layers + 1), stage i rate^(num_layers - i), heads 1."""
    if not name.startswith(prefix):
        return num_layers + 1
    local = name[len(prefix) :]
    if local.startswith("stem."):
        return 0
    found = _CONVNEXT_STAGE.match(local)
    if found is None:
        return num_layers + 1
    return 0 if found[2] == "downsample" else int(found[1]) + 1
