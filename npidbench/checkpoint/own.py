"""This project's own checkpoint format (ARCHITECTURE.md), and exports to other tools.

One ``torch.save`` of plain types and tensors only, so it loads with ``weights_only=True`` and
without npidbench installed::

    {"format": "npidbench", "version": 1, "arch": "resnet18",
     "state_dict": <backbone, torchvision names, no fc>, "head": <projection head or {}>,
     "meta": {"recipe", "epochs", "dataset", "seed", "versions", ...}}

The memory bank, optimiser and RNG state of a pretraining run live in a separate resume file.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from npidbench.atomic import atomic_write
from npidbench.backbones.convnext import ConvNeXtSpec
from npidbench.backbones.resnet import wide_resnet50_width
from npidbench.backbones.vit import ViTSpec
from npidbench.checkpoint.formats import to_detectron2_name
from npidbench.errors import BadInput
from npidbench.provenance import versions

FORMAT_VERSION = 1
CONVERT_TARGETS = ("torchvision", "detectron2", "timm")


def npidbench_checkpoint(
    model: nn.Module,
    arch: str,
    meta: dict[str, Any],
    head: dict[str, torch.Tensor] | None = None,
    *,
    family: str = "resnet",
    spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict for a backbone (its fc, if any, is dropped).

    A ViT or ConvNeXt adds ``"family"`` ("vit" / "convnext") and, under the family's name, the
    spec that builds it (plain types: a ViT's ``ViTSpec`` fields, num_heads and
    pos_interpolation included, which its tensors cannot tell; a ConvNeXt's depths, dims,
    layer_scale), so that the loader rebuilds exactly that network. ResNet files keep the
    layout above: a file without "family" is a ResNet.
    """
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    checkpoint = {
        "format": "npidbench",
        "version": FORMAT_VERSION,
        "arch": arch,
        "state_dict": state,
        "head": {k: v.detach().cpu().clone() for k, v in (head or {}).items()},
        "meta": {"versions": versions(), **meta},
    }
    if family != "resnet":
        if spec is None:
            raise ValueError(f"a {family} checkpoint needs the spec that builds it")
        checkpoint.update({"family": family, family: dict(spec)})
    return checkpoint


def save_npidbench_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> Path:
    """Write a checkpoint dict atomically (a crash never leaves a half-written file)."""
    return atomic_write(path, lambda handle: torch.save(checkpoint, handle))


def export_backbone(
    model: nn.Module,
    to: str,
    out: str | Path,
    *,
    input_normalised: bool = True,
    arch: str = "",
    spec: ViTSpec | ConvNeXtSpec | None = None,
) -> Path:
    """Write the loaded backbone for use elsewhere.

    ``torchvision``: a plain state_dict without fc, loadable with
    ``resnet.load_state_dict(sd, strict=False)`` (only fc missing).
    ``detectron2``: MoCo's convention: a pickle ``{"model": {name: ndarray}, "__author__",
    "matching_heuristics": True}`` with detectron2 names (stem, res2..res5, convK.norm, shortcut).
    ``timm``: a bare state dict under timm's names that ``timm_model_for(model, arch, spec)``
    loads with ``load_state_dict(strict=True)``, checked against that model before it is written.
    ``arch`` (the ResNet's name) and ``spec`` (a ViT's or ConvNeXt's) are read by ``timm`` only.
    """
    if to == "timm":
        if not input_normalised:
            raise BadInput(_UNNORMALISED)
        target = timm_model_for(model, arch=arch, spec=spec)
        state = _backbone_state(model)
        _check_timm_layout(target, state)
        return atomic_write(out, lambda handle: torch.save(state, handle))
    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Sequential):
        raise BadInput(
            f"this ResNet has a deep stem (conv1 is a sequence of 3x3 convs: timm's ResNet-C/D{f', {arch}' if arch else ''}): "
            f"{to} has no such network and its names cannot say so; use --to timm"
        )
    if isinstance(conv1, nn.Conv2d) and conv1.kernel_size == (3, 3) and conv1.padding != (1, 1):
        raise BadInput(
            f"this backbone's CIFAR stem pads conv1 by {conv1.padding[0]} (solo-learn's): a plain state dict "
            "cannot say so and would be read back with padding 1, another network; evaluate the original file"
        )
    if not input_normalised:
        raise BadInput(_UNNORMALISED)
    state = _backbone_state(model)
    if to == "torchvision":
        return atomic_write(out, lambda handle: torch.save(state, handle))
    if to == "detectron2":
        converted = {to_detectron2_name(k): v.numpy() for k, v in state.items()}
        payload = {"model": converted, "__author__": "npidbench", "matching_heuristics": True}
        return atomic_write(out, lambda handle: pickle.dump(payload, handle, protocol=4))
    raise ValueError(f"unknown export target {to}; choose from {CONVERT_TARGETS}")


_UNNORMALISED = (
    "this backbone takes pixels in [0, 1] without ImageNet mean/std (SimCLR v1): a plain state dict "
    "cannot say so and would be read back as a normalised-input network; evaluate the original file"
)


def _backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("fc.")}


@dataclass(frozen=True)
class TimmModel:
    """The timm model a ``--to timm`` export loads into with ``load_state_dict(strict=True)``:
    ``timm.create_model(name, **kwargs)``; or let timm read the file itself with
    ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH), **kwargs)``
    (timm's load_pretrained drops the classifier it does not find, _builder.py:300-309)."""

    name: str
    kwargs: dict[str, Any]

    def __str__(self) -> str:
        """``vit_small_patch16_224 (num_classes=0, img_size=224, ...)``: values as Python literals."""
        return f"{self.name} ({', '.join(f'{key}={value!r}' for key, value in self.kwargs.items())})"

    def create(self, **overrides: Any) -> nn.Module:
        import timm

        return timm.create_model(self.name, **{**self.kwargs, **overrides})


def timm_model_for(model: nn.Module, arch: str = "", spec: ViTSpec | ConvNeXtSpec | None = None) -> TimmModel:
    """The timm model name and ``create_model`` kwargs that rebuild a loaded backbone, or BadInput
    naming why timm has none. ``spec``: a ViT's or ConvNeXt's (Inspection.vit_spec /
    convnext_spec); None for a ResNet, named by ``arch``."""
    if isinstance(spec, ViTSpec):
        return _timm_vit(spec)
    if isinstance(spec, ConvNeXtSpec):
        return _timm_convnext(spec)
    if spec is not None or not hasattr(model, "layer4"):
        raise ValueError("a ViT or ConvNeXt export needs its ViTSpec / ConvNeXtSpec")
    return _timm_resnet(model, arch)


def _timm_resnet(model: nn.Module, arch: str) -> TimmModel:
    """timm's ResNets use torchvision's names (conv1, bn1, layerN.M.convK/bnK, downsample.0/1;
    its deep-stem ResNet-C/D their own, which npidbench builds as they are): the name is the arch."""
    import timm

    width = wide_resnet50_width(arch)
    if width is not None:
        raise BadInput(
            f"{arch} (a ResNet-50 with every layer {width}x wider, stem included: SimCLR v1 / SwAV) has no timm "
            "model: timm's wide_resnet50_2 widens only the inner 3x3 convs; evaluate the original file"
        )
    conv1, maxpool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
    if isinstance(maxpool, nn.Identity) or (isinstance(conv1, nn.Conv2d) and conv1.kernel_size != (7, 7)):
        raise BadInput(
            f"this {arch or 'ResNet'} has a CIFAR stem (3x3 stride-1 conv1, no max-pool): timm's ResNets have "
            "none (a timm ResNet runs these weights through its 7x7 stride-2 stem); use --to torchvision"
        )
    if not arch or not timm.is_model(arch):
        raise BadInput(f"timm {timm.__version__} has no model named {arch or '(no arch given)'}")
    return TimmModel(arch, {"num_classes": 0})


# timm's registered ViTs whose model_args hold only these keys (timm 1.0.31
# models/vision_transformer.py:3410-3575 and, DINOv2's, 4160-4240); create_model's kwargs
# override them (dict(model_args, **kwargs)) and VisionTransformer.__init__ defaults the rest
# (vision_transformer.py:757-800: mlp_ratio 4, qkv_bias, no layer scale, no registers, class
# token with a position, no fc_norm under token pooling).
_VIT_DEFAULTS: dict[str, Any] = {
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "init_values": None,
    "reg_tokens": 0,
    "no_embed_class": False,
    "fc_norm": False,
}
_DINOV2 = {"init_values": 1e-5}
_REG4 = {"init_values": 1e-5, "reg_tokens": 4, "no_embed_class": True}
_TIMM_VITS: dict[str, dict[str, Any]] = {
    name: {"patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": heads, **extra}
    for name, (patch, dim, depth, heads, extra) in {
        "vit_tiny_patch16_224": (16, 192, 12, 3, {}),
        "vit_small_patch16_224": (16, 384, 12, 6, {}),
        "vit_small_patch32_224": (32, 384, 12, 6, {}),
        "vit_small_patch8_224": (8, 384, 12, 6, {}),
        "vit_base_patch16_224": (16, 768, 12, 12, {}),
        "vit_base_patch32_224": (32, 768, 12, 12, {}),
        "vit_base_patch8_224": (8, 768, 12, 12, {}),
        "vit_large_patch16_224": (16, 1024, 24, 16, {}),
        "vit_large_patch32_224": (32, 1024, 24, 16, {}),
        "vit_large_patch14_224": (14, 1024, 24, 16, {}),
        "vit_huge_patch14_224": (14, 1280, 32, 16, {}),
        "vit_small_patch14_dinov2": (14, 384, 12, 6, _DINOV2),
        "vit_base_patch14_dinov2": (14, 768, 12, 12, _DINOV2),
        "vit_large_patch14_dinov2": (14, 1024, 24, 16, _DINOV2),
        "vit_small_patch14_reg4_dinov2": (14, 384, 12, 6, _REG4),
        "vit_base_patch14_reg4_dinov2": (14, 768, 12, 12, _REG4),
        "vit_large_patch14_reg4_dinov2": (14, 1024, 24, 16, _REG4),
    }.items()
}


def _timm_vit(spec: ViTSpec) -> TimmModel:
    """The registered ViT closest to ``spec`` (fewest kwargs to override) and the kwargs that make
    it the network build_vit builds. img_size is always given: timm would otherwise take it from
    the pretrained config (_builder.py _update_default_model_kwargs), 518 for DINOv2's names.
    dynamic_img_size as build_vit builds it: other resolutions resample pos_embed timm's way (DINO's
    own interpolation, ViTSpec.pos_interpolation "dino", is no timm option; at img_size both agree).
    An fc_norm model (MAE fine-tuned) pools the patch tokens (global_pool 'avg'), the feature it was
    evaluated with; the tensors are the same either way."""
    wanted = {
        "patch_size": spec.patch_size,
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "mlp_ratio": float(spec.mlp_ratio),
        "qkv_bias": spec.qkv_bias,
        "init_values": spec.init_values,
        "reg_tokens": spec.reg_tokens,
        "no_embed_class": spec.no_embed_class,
        "fc_norm": spec.fc_norm,
    }
    name, differ = _closest(_TIMM_VITS, _VIT_DEFAULTS, wanted, presence_only=("init_values",))
    kwargs: dict[str, Any] = {"num_classes": 0, "img_size": spec.img_size}
    kwargs.update({key: wanted[key] for key in differ})
    if spec.fc_norm:
        kwargs["global_pool"] = "avg"
    kwargs["dynamic_img_size"] = True
    return TimmModel(name, kwargs)


# timm's ConvNeXt sizes (timm 1.0.31 models/convnext.py:1292-1329; the smaller atto..nano use
# conv_mlp and are left out); ConvNeXt.__init__ defaults the rest (layer scale 1e-6, no GRN). A
# ConvNeXt without layer scale is one of the V2 names with use_grn=False (convnext.py:1377-1407:
# ls_init_value=None in their model_args): create_model drops None kwargs (_factory.py:224), so a
# V1 name cannot be told to go without it.
_LAYER_SCALE = 1e-6
_V2 = {"use_grn": True, "ls_init_value": None}
_CONVNEXT_SIZES = {
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}
_TIMM_CONVNEXTS: dict[str, dict[str, Any]] = {
    **{f"convnext_{size}": {"depths": d, "dims": w} for size, (d, w) in _CONVNEXT_SIZES.items()},
    **{
        f"convnextv2_{size}": {"depths": d, "dims": w, **_V2}
        for size, (d, w) in _CONVNEXT_SIZES.items()
        if size != "xlarge"  # timm has a V2 huge instead
    },
}


def _timm_convnext(spec: ConvNeXtSpec) -> TimmModel:
    wanted = {
        "depths": tuple(spec.depths),
        "dims": tuple(spec.dims),
        "ls_init_value": _LAYER_SCALE if spec.layer_scale else None,
        "use_grn": False,
    }
    defaults = {"ls_init_value": _LAYER_SCALE, "use_grn": False}
    name, differ = _closest(_TIMM_CONVNEXTS, defaults, wanted, presence_only=("ls_init_value",))
    return TimmModel(name, {"num_classes": 0, **{key: wanted[key] for key in differ}})


def _closest(
    candidates: dict[str, dict[str, Any]],
    defaults: dict[str, Any],
    wanted: dict[str, Any],
    presence_only: tuple[str, ...] = (),
) -> tuple[str, list[str]]:
    """The candidate needing the fewest overrides (the first on a tie) among those this timm
    registers, and the keys to override. ``presence_only`` keys differ only when one is None (a
    layer scale's init value is overwritten by the loaded gamma). A candidate that would need a
    None override is skipped: create_model drops None kwargs (timm _factory.py:224)."""
    import timm

    def differ(args: dict[str, Any]) -> list[str]:
        full = {**defaults, **args}
        out = []
        for key, value in wanted.items():
            have = full.get(key)
            same = (have is None) == (value is None) if key in presence_only else _same(have, value)
            if not same:
                out.append(key)
        return out

    known = [
        (len(differ(args)), index, name)
        for index, (name, args) in enumerate(candidates.items())
        if timm.is_model(name) and all(wanted[key] is not None for key in differ(args))
    ]
    if not known:
        raise BadInput(f"timm {timm.__version__} registers no model that builds this network")
    _, _, name = min(known)
    return name, differ(candidates[name])


def _same(have: Any, value: Any) -> bool:
    if isinstance(have, (list, tuple)) and isinstance(value, (list, tuple)):
        return tuple(have) == tuple(value)
    return have == value


def _check_timm_layout(target: TimmModel, state: dict[str, torch.Tensor]) -> None:
    """Refuse to write what ``target`` would not load strictly (names and shapes, built on the
    meta device: no memory, no initialisation)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in target.create().state_dict().items()}
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k]]
    if missing or extra or shapes:
        parts = [
            f"{len(found)} {what} (first: {found[0]})"
            for found, what in (
                (missing, "missing"),
                (extra, "not in timm's model"),
                (shapes, "of another shape"),
            )
            if found
        ]
        raise BadInput(f"the backbone's tensors do not fit timm's {target}: {'; '.join(parts)}")
