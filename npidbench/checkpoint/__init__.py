"""Any checkpoint in, a torchvision ResNet or a timm ViT out: detect, load strictly, report what
was used.

    >>> loaded = load_backbone("moco_v2_800ep.pth.tar")      # doctest: +SKIP
    >>> loaded.format, loaded.arch, loaded.branch
    ('moco-v2', 'resnet50', 'encoder_q')

ViTs (DINO, DINOv2, MoCo v3, MAE, iBOT, timm, torchvision, mmpretrain; checkpoint/vit.py) are
files without a ResNet branch that carry a patch embedding or class token; their ViTSpec is
read from the shapes and recorded in ``Inspection.vit``.

Strict means every backbone parameter and buffer is filled from the file (MoCo main_lincls's
habit) and the backbone's own modules hold nothing the built network lacks (a squeeze-excitation
block dropped silently is another network); anything outside the backbone (heads, projectors,
momentum encoders, memory banks, queues, optimiser state) is listed as ignored and never loaded.
Never falls back to random weights (USERS.md 1).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from npidbench.backbones import Backbone, backbone_for
from npidbench.backbones.convnext import ConvNeXtSpec, build_convnext
from npidbench.backbones.resnet import DEEP_STEM_RESNETS, build_resnet, wide_resnet50_width
from npidbench.backbones.vit import ViTSpec, build_vit
from npidbench.checkpoint import convnext, vit
from npidbench.checkpoint.arch import foreign_tensors_message, infer_arch, parse_arch
from npidbench.checkpoint.formats import (
    UNNORMALISED_INPUT_FORMATS,
    Branch,
    default_branch,
    detect_format,
    find_branches,
    flatten,
    looks_like_vit,
    to_torchvision_name,
)
from npidbench.checkpoint.matching import match_tensors
from npidbench.checkpoint.reading import RawCheckpoint, file_sha256, read_checkpoint
from npidbench.checkpoint.safe_unpickle import Inert
from npidbench.errors import BadInput

# The CIFAR stem's conv1 padding per format. solo-learn builds nn.Conv2d(3, 64, kernel_size=3,
# stride=1, padding=2, bias=False) with maxpool = Identity (solo/methods/base.py, also in its
# older "encoder" releases); other CIFAR ResNets pad by 1. Shapes cannot tell them apart.
_CIFAR_STEM_PADDING = {"solo-learn": 2}
_DEFAULT_CIFAR_PADDING = 1
STANDARD_STEM_PADDING = 3  # torchvision's 7x7 stride-2 conv1
DEEP_STEM_PADDING = 1  # each 3x3 conv of timm's ResNet-C/D deep stem (conv1.0, conv1.3, conv1.6)

# Absent from files written before torch 0.4.1 (lemniscate) and from detectron2's FrozenBN; it
# only matters for BatchNorm with momentum=None, so it may be defaulted to 0 (and is reported).
_OPTIONAL_BUFFER = "num_batches_tracked"
# Formats whose own code interpolates the position embedding DINO's way (ViTSpec.pos_interpolation);
# DINOv2's register models resample as timm does.
_DINO_INTERPOLATION = ("dino", "ibot", "dinov2", "dinov2-train")


@dataclass
class Inspection:
    """Everything known about a checkpoint, whether or not its backbone loads completely."""

    path: str
    sha256: str | None
    container: str | None
    format: str | None
    arch: str | None
    cifar_stem: bool
    branch: str | None
    branches: list[str]
    stem_padding: int | None = None  # conv1 padding of the network built (3: torchvision's stem)
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # inside the backbone, not in the network
    defaulted: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    skipped_objects: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    family: str = "resnet"  # the backbones.FAMILIES entry: resnet | vit
    # ViTs: the ViTSpec's fields (depth, embed_dim, num_heads, patch_size, img_size: the
    # resolution of the position embedding, reg_tokens, ...) plus name, heads_from (num_heads is
    # not in the shapes) and converted (what was renamed or recomputed). None for ResNets.
    vit: dict[str, Any] | None = None
    convnext: dict[str, Any] | None = None  # ConvNeXts: depths, dims, layer_scale, name
    # False: the network was trained on pixels in [0, 1] without ImageNet mean/std (SimCLR v1's
    # converted TF models, formats.UNNORMALISED_INPUT_FORMATS); every forward pass feeds it so.
    input_normalised: bool = True

    @property
    def complete(self) -> bool:
        return self.error is None

    @property
    def vit_spec(self) -> ViTSpec | None:
        """The ViT the inspection describes (None for ResNets and unfinished ViT inspections)."""
        return _spec_from(ViTSpec, self.vit)

    @property
    def width_multiplier(self) -> int:
        """How many times wider than torchvision's every layer is (resnet50w<N>: N; else 1)."""
        return wide_resnet50_width(self.arch or "") or 1

    @property
    def input(self) -> str:
        """The network's input in words (``inspect``)."""
        if self.input_normalised:
            return "RGB in [0, 1], normalised by the ImageNet mean/std"
        return "RGB in [0, 1], not normalised (no mean/std: the network was trained so)"

    @property
    def convnext_spec(self) -> ConvNeXtSpec | None:
        """The ConvNeXt the inspection describes (None for other families)."""
        return _spec_from(ConvNeXtSpec, self.convnext)

    @property
    def stem(self) -> str:
        """The stem variant in words, e.g. ``CIFAR stem (3x3 stride 1, padding 2, no max-pool)``."""
        spec = self.vit_spec
        if spec is not None:
            return f"{spec.patch_size}x{spec.patch_size} patch embedding (stride {spec.patch_size})"
        deep = DEEP_STEM_RESNETS.get(self.arch or "")
        if deep is not None:
            shortcut = "; average-pool shortcuts (ResNet-D)" if deep.avg_down else ""
            return f"deep (ResNet-C/D, timm): 3x3 convs 3-32 stride 2, 32-32, 32-64, max-pool{shortcut}"
        if not self.cifar_stem:
            return "standard stem (7x7 stride 2, padding 3, max-pool)"
        return f"CIFAR stem (3x3 stride 1, padding {self.stem_padding}, no max-pool)"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class CheckpointRefused(BadInput):
    """A refusal after the file was read: carries what was found, for ``inspect --json``."""

    def __init__(self, message: str, inspection: Inspection) -> None:
        super().__init__(message)
        self.inspection = inspection


def failed_inspection(path: str | Path, error: str) -> Inspection:
    """The inspection of a file that could not be read at all (missing, empty, corrupt...)."""
    path = Path(path)
    try:
        sha256 = file_sha256(path) if path.is_file() else None
    except OSError:
        sha256 = None
    return Inspection(
        path=str(path),
        sha256=sha256,
        container=None,
        format=None,
        arch=None,
        cifar_stem=False,
        branch=None,
        branches=[],
        error=error,
    )


@dataclass
class LoadedBackbone:
    """A strictly loaded torchvision ResNet (fc removed) or timm ViT (no head) plus where it came from."""

    model: nn.Module
    inspection: Inspection

    @property
    def arch(self) -> str:
        return self.inspection.arch or ""

    @property
    def sha256(self) -> str:
        return self.inspection.sha256

    @property
    def input_normalised(self) -> bool:
        """Whether the network's input is ImageNet-normalised (else pixels in [0, 1])."""
        return self.inspection.input_normalised

    @property
    def backbone(self) -> Backbone:
        """The benchmarks' interface to ``model``: its layers, one-pass extraction, support."""
        return backbone_for(self.model, self.arch, self.inspection.family)

    def provenance(self) -> dict[str, Any]:
        """What a result record stores about the checkpoint."""
        info = self.inspection
        record = {
            "path": info.path,
            "sha256": info.sha256,
            "format": info.format,
            "arch": info.arch,
            "cifar_stem": info.cifar_stem,
            "stem_padding": info.stem_padding,
            "branch": info.branch,
            "defaulted": info.defaulted,
            "skipped_objects": info.skipped_objects,
            "meta": info.meta,
        }
        if info.family != "resnet":  # ResNet records stay as they were
            record["family"] = info.family
            record[info.family] = info.vit if info.family == "vit" else info.convnext
        if not info.input_normalised:  # only then: every other record stays as it was
            record["input_normalised"] = False
        return record


def inspect_checkpoint(
    path: str | Path,
    arch: str | None = None,
    branch: str | None = None,
    trust_pickle: bool = False,
) -> tuple[Inspection, dict[str, torch.Tensor] | None]:
    """Analyse a checkpoint. Returns the inspection and, when complete, the backbone tensors.

    Problems with the backbone (missing keys, wrong arch) end up in ``Inspection.error`` so that
    ``inspect`` can still show what was found; unreadable files raise BadInput, an unknown or
    ambiguous branch raises CheckpointRefused (a BadInput carrying the inspection so far).
    """
    raw = read_checkpoint(path, trust_pickle=trust_pickle)
    flat = flatten(raw.obj)
    keys = list(flat)
    branches = find_branches(keys)
    fmt = detect_format(raw.obj, keys, branches)
    info = Inspection(
        path=str(path),
        sha256=raw.sha256,
        container=raw.container,
        format=fmt,
        arch=None,
        cifar_stem=False,
        branch=None,
        branches=[b.name for b in branches],
        skipped_objects=raw.skipped,
        meta=_own_meta(raw),
        input_normalised=fmt not in UNNORMALISED_INPUT_FORMATS,
    )
    own = _own_backbone(raw.obj, branches, keys)  # what an npidbench file says it holds
    if own is not None and own.error:
        info.error, info.ignored = own.error, keys
        return info, None
    recorded = own.spec if own is not None else None
    if not branches and convnext.holds_convnext(keys):
        return _inspect_convnext(flat, info, arch, branch, recorded)
    if not branches and looks_like_vit(keys):
        return _inspect_vit(raw.obj, flat, info, arch, branch, recorded)
    if not branches:
        info.error = _no_backbone_message(keys, fmt)
        info.ignored = keys
        return info, None
    try:
        chosen = _choose_branch(branches, branch, fmt)
    except BadInput as exc:
        info.error = str(exc)
        info.ignored = keys
        raise CheckpointRefused(str(exc), info) from None
    info.branch = chosen.name
    caffe_input = _caffe_style_detectron2(flat, chosen)
    if caffe_input:
        info.error = caffe_input
        info.ignored = keys
        return info, None
    state, used = _branch_state(flat, chosen)
    info.ignored = [k for k in keys if k not in used]
    wanted = None
    try:
        spec = infer_arch(state)
        if arch is not None:
            wanted = parse_arch(arch)
            if wanted != spec:
                raise BadInput(
                    f"the checkpoint holds a {spec.label}, but --arch {arch} was asked for; "
                    f"pass --arch {spec.name}{'-cifar' if spec.cifar_stem else ''} or the right file"
                )
        recorded = info.meta.get("arch")
        if recorded and recorded != spec.name:
            raise BadInput(f"the file says arch {recorded} but its tensors are a {spec.label}")
        declared = _timm_model(raw.obj)
        if declared and declared.split(".")[0] != spec.name:
            # e.g. timm's resnetaa50d / resnetblur50d: anti-aliased downsampling without tensors of
            # its own, so their files have resnet50d's exact names and shapes: another network
            raise BadInput(
                f"the file's timm training arguments name model {declared}, but its tensors fit a "
                f"{spec.label}: {declared} computes differently with the same tensors (not supported)"
            )
    except BadInput as exc:
        info.error = str(exc)
        return info, None
    info.arch, info.cifar_stem = spec.name, spec.cifar_stem
    if spec.deep_stem:
        info.stem_padding = DEEP_STEM_PADDING
    elif not spec.cifar_stem:
        info.stem_padding = STANDARD_STEM_PADDING
    elif wanted is not None and wanted.stem_padding is not None:
        info.stem_padding = wanted.stem_padding  # the user's word over the format's guess
    else:
        info.stem_padding = _CIFAR_STEM_PADDING.get(fmt, _DEFAULT_CIFAR_PADDING)
    with torch.device("meta"):  # shapes only: no random initialisation (a ResNet-50 w5 has 586M weights)
        expected = _build(info).state_dict()
    match = match_tensors(expected, state, optional=_OPTIONAL_BUFFER)
    loaded = match.loaded
    info.missing, info.mismatched, info.defaulted = match.missing, match.mismatched, match.defaulted
    # Tensors inside conv1/bn1/layer1..4 that the network lacks are part of another network
    # (SE blocks, attention, extra norms): never dropped silently, unlike heads outside.
    info.unexpected = match.unexpected
    info.loaded = [name for name in expected if name in loaded and name not in info.defaulted]
    if info.missing or info.mismatched:
        info.error = _incomplete_message(info, chosen)
        return info, None
    if info.unexpected:
        info.error = foreign_tensors_message(info.unexpected, spec.name)
        return info, None
    return info, loaded


def load_backbone(
    path: str | Path,
    arch: str | None = None,
    branch: str | None = None,
    trust_pickle: bool = False,
) -> LoadedBackbone:
    """Load the backbone of any supported checkpoint strictly, or raise BadInput saying why."""
    info, tensors = inspect_checkpoint(path, arch=arch, branch=branch, trust_pickle=trust_pickle)
    if tensors is None:
        raise BadInput(f"{path}: {info.error}")
    model = _build(info)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return LoadedBackbone(model, info)


def _build(info: Inspection) -> nn.Module:
    """The network an inspection describes, stem variant included."""
    spec = info.vit_spec
    if spec is not None:
        return build_vit(spec)
    if info.convnext_spec is not None:
        return build_convnext(info.convnext_spec)
    padding = info.stem_padding if info.cifar_stem and info.stem_padding else _DEFAULT_CIFAR_PADDING
    return build_resnet(info.arch or "", info.cifar_stem, stem_padding=padding)


def _inspect_vit(
    top: Any,
    flat: dict[str, torch.Tensor],
    info: Inspection,
    arch: str | None,
    branch: str | None,
    recorded: dict[str, Any] | None = None,
) -> tuple[Inspection, dict[str, torch.Tensor] | None]:
    """inspect_checkpoint for a file whose backbone is a ViT (checkpoint/vit.py); ``recorded``:
    the ViTSpec fields an npidbench file records (used as they are, checked against the shapes)."""
    keys = list(flat)
    info.family = "vit"
    info.ignored = keys
    branches = vit.find_vit_branches(keys)
    info.branches = [b.name for b in branches]
    info.format = fmt = "npidbench" if recorded is not None else vit.detect_vit_format(top, flat, branches)
    unsupported = vit.unsupported_layout(keys)
    if unsupported:
        info.error = unsupported
        return info, None
    if not branches:
        info.error = _no_backbone_message(keys, fmt)
        return info, None
    try:
        chosen = _choose_branch(branches, branch, fmt)
    except BadInput as exc:
        info.error = str(exc)
        raise CheckpointRefused(str(exc), info) from None
    info.branch = chosen.name
    state, used, converted = vit.branch_state(flat, chosen, branches)
    info.ignored = [k for k in keys if k not in used]
    essentials = vit.missing_essentials(state)
    no_class_token = vit.without_class_token(state)
    if no_class_token:
        info.error = no_class_token
        return info, None
    if essentials:
        info.missing = essentials
        where = f"under '{chosen.prefix}'" if chosen.prefix else "at the top level"
        info.error = (
            f"the {fmt} Vision Transformer checkpoint (branch {chosen.name}) does not hold a complete ViT: "
            f"{len(essentials)} backbone keys missing (first: {', '.join(essentials)}; its shape is read "
            f"from them); hint: keys {where} follow {chosen.naming} names; check that the file is complete, "
            "or choose another --branch"
        )
        return info, None
    sincos = vit.fixed_sincos(state["pos_embed"])
    if sincos and fmt in ("timm", "ddp", "mae"):
        info.format = fmt = sincos  # MoCo v3's convert_to_deit.py / main_lincls files, MAE's {"model"}
    try:
        spec, heads_from = vit.infer_vit_spec(state, moco_v3=fmt == "moco-v3" or sincos == "moco-v3")
        if fmt in _DINO_INTERPOLATION and not spec.reg_tokens and not spec.no_embed_class:
            spec = replace(spec, pos_interpolation="dino")
        if recorded is not None:
            spec, heads_from = _recorded_vit_spec(recorded, spec), "recorded in the npidbench checkpoint"
        if arch is not None and arch != spec.name:
            raise BadInput(
                f"the checkpoint holds a {spec.name} ({vit.spec_description(spec)}), but --arch {arch} "
                f"was asked for; pass --arch {spec.name} or the right file"
            )
    except BadInput as exc:
        info.error = str(exc)
        return info, None
    info.arch = spec.name
    info.vit = {**asdict(spec), "name": spec.name, "heads_from": heads_from, "converted": converted}
    if heads_from is None:
        info.vit["num_heads"] = None  # not in the shapes and not a standard width: refused below
    with torch.device("meta"):  # shapes only: no random initialisation of a large ViT
        expected = build_vit(spec).state_dict()
    match = match_tensors(expected, state)
    loaded = match.loaded
    info.missing, info.mismatched, info.unexpected = match.missing, match.mismatched, match.unexpected
    info.loaded = [name for name in expected if name in loaded]
    if info.missing or info.mismatched:
        info.error = vit.incomplete_message(fmt, chosen, spec.name, info.missing, info.mismatched)
        return info, None
    if info.unexpected:
        info.error = vit.foreign_tensors_message(info.unexpected, spec.name)
        return info, None
    if heads_from is None:
        info.error = vit.unknown_heads_message(spec)
        return info, None
    return info, loaded


def _inspect_convnext(
    flat: dict[str, torch.Tensor],
    info: Inspection,
    arch: str | None,
    branch: str | None,
    recorded: dict[str, Any] | None = None,
) -> tuple[Inspection, dict[str, torch.Tensor] | None]:
    """inspect_checkpoint for a file whose backbone is a ConvNeXt (checkpoint/convnext.py);
    ``recorded``: the spec an npidbench file records (checked against the shapes)."""
    info.family = "convnext"
    info.ignored = list(flat)
    try:
        found = convnext.find_convnext(flat, branch)
    except ValueError as exc:
        info.error = str(exc)
        raise CheckpointRefused(str(exc), info) from None
    assert found is not None
    info.format = "npidbench" if recorded is not None else f"convnext-{found.layout}"
    info.branch = found.prefix.rstrip(".") or "main"
    info.branches = [p.rstrip(".") or "main" for p in convnext.candidate_prefixes(flat)]
    info.ignored = found.ignored
    try:
        match = convnext.match_convnext(found)
    except (ValueError, KeyError) as exc:
        info.error = f"the {info.format} checkpoint does not hold a complete ConvNeXt ({exc})"
        return info, None
    info.arch = match.spec.name
    info.convnext = {**asdict(match.spec), "name": match.spec.name}
    if recorded is not None:
        problem = _recorded_convnext_problem(recorded, match.spec)
        if problem:
            info.error = problem
            return info, None
    if arch is not None and arch != match.spec.name:
        info.error = f"the checkpoint holds a {match.spec.name}, but --arch {arch} was asked for; pass --arch {match.spec.name}"
        return info, None
    info.loaded, info.missing, info.mismatched, info.unexpected = (
        match.loaded,
        match.missing,
        match.mismatched,
        match.unexpected,
    )
    if match.missing or match.mismatched:
        first = (match.missing or match.mismatched)[:3]
        info.error = (
            f"the {info.format} checkpoint does not hold a complete {match.spec.name}: "
            f"{len(match.missing)} tensors missing, {len(match.mismatched)} of another shape (first: {', '.join(first)})"
        )
        return info, None
    if match.unexpected:
        info.error = (
            f"the {info.format} checkpoint's ConvNeXt holds tensors a {match.spec.name} lacks "
            f"({', '.join(match.unexpected[:3])}): another network; refused rather than dropped"
        )
        return info, None
    return info, match.tensors


def _caffe_style_detectron2(flat: dict[str, torch.Tensor], branch: Branch) -> str | None:
    """Native detectron2 models (model zoo, MSRA weights) feed BGR 0-255 input to a ResNet with
    the stride in the 1x1 conv: same shapes as torchvision's, different network. Only the
    torchvision-style conversions (MoCo's, npidbench's; RGB pixel means) are torchvision ResNets."""
    if branch.naming != "detectron2":
        return None
    means = [v for k, v in flat.items() if k.endswith("pixel_mean") and v.numel() == 3]
    if means and float(means[0].flatten()[0]) < float(means[0].flatten()[2]):
        return (
            "this is a native detectron2 model (BGR caffe-style pixel_mean, MSRA ResNet with the stride in "
            "the 1x1 conv): its backbone is not a torchvision ResNet; evaluate the torchvision-style weights "
            "it was trained from instead"
        )
    return None


def _choose_branch(branches: list[Branch], wanted: str | None, fmt: str) -> Branch:
    names = [b.name for b in branches]
    if wanted is not None:
        for candidate in branches:
            if wanted in (candidate.name, candidate.prefix.rstrip(".")):
                return candidate
        raise BadInput(f"--branch {wanted} is not in this {fmt} checkpoint; it holds {names}")
    chosen = default_branch(branches)
    if chosen is None:
        raise BadInput(
            f"this {fmt} checkpoint holds several backbones ({', '.join(names)}) and none is the "
            "standard one to evaluate; choose with --branch NAME"
        )
    return chosen


def _branch_state(flat: dict[str, torch.Tensor], branch: Branch) -> tuple[dict[str, torch.Tensor], set[str]]:
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, tensor in flat.items():
        if not key.startswith(branch.prefix):
            continue
        name = to_torchvision_name(key[len(branch.prefix) :], branch.naming)
        if name is None:
            continue
        if name.startswith("fc.") or not _inside_backbone(name, branch.naming):
            continue  # the classifier or a head nested under the same prefix: ignored
        state[name] = tensor
        used.add(key)
    return state, used


# maxpool has no tensors in a torchvision ResNet or timm's ResNet-C/D; kept so that a replaced stem
# pool (timm replace_stem_pool: maxpool.0 conv, maxpool.1 BN) is refused, not dropped as a head.
_BACKBONE_ROOTS = {"conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4"}
# mmpretrain's deep stem (ResNetV1c/V1d: a Sequential of ConvModules) replaces conv1/bn1; it is
# kept so that the layout is named instead of being reported as a ResNet missing its stem.
_DEEP_STEM = re.compile(r"^stem\.\d+\.")


def _inside_backbone(name: str, naming: str) -> bool:
    if name.split(".")[0] in _BACKBONE_ROOTS:
        return True
    return naming == "torchvision" and bool(_DEEP_STEM.match(name))


@dataclass(frozen=True)
class _OwnBackbone:
    """What an npidbench file records about its backbone: family, spec (ViT / ConvNeXt), or why
    the record and the tensors disagree."""

    family: str
    spec: dict[str, Any] | None
    error: str | None = None


_OWN_FAMILIES = ("resnet", "vit", "convnext")


def _own_backbone(obj: Any, branches: list[Branch], keys: list[str]) -> _OwnBackbone | None:
    """None for other formats. An npidbench file without "family" is a ResNet (every file before
    the pretrainer built ViTs and ConvNeXts); a ViT or ConvNeXt one records its spec (own.py)."""
    if not (isinstance(obj, dict) and obj.get("format") == "npidbench"):
        return None
    family = obj.get("family", "resnet")
    said = f"family {family}" if "family" in obj else "no family (a ResNet)"
    if family not in _OWN_FAMILIES:
        error = f"the npidbench file records family {family!r}, not one of {', '.join(_OWN_FAMILIES)}"
        return _OwnBackbone(str(family), None, error)
    spec = obj.get(family) if family != "resnet" else None
    if family != "resnet" and not isinstance(spec, dict):
        return _OwnBackbone(family, None, f"the npidbench file records family {family} without its spec")
    held = None
    if not branches and convnext.holds_convnext(keys):
        held = "ConvNeXt"
    elif not branches and looks_like_vit(keys):
        held = "Vision Transformer"
    elif branches:
        held = "ResNet"
    expected = {"resnet": "ResNet", "vit": "Vision Transformer", "convnext": "ConvNeXt"}[family]
    if held is not None and held != expected:
        return _OwnBackbone(family, spec, f"the npidbench file records {said} but its tensors are a {held}")
    return _OwnBackbone(family, spec)


# What a ViT's tensors tell (infer_vit_spec); num_heads and pos_interpolation they cannot.
_VIT_SHAPE_FIELDS = (
    "depth",
    "embed_dim",
    "patch_size",
    "img_size",
    "mlp_ratio",
    "qkv_bias",
    "reg_tokens",
    "no_embed_class",
    "fc_norm",
)


def _recorded_vit_spec(recorded: dict[str, Any], inferred: ViTSpec) -> ViTSpec:
    """The ViTSpec an npidbench file records, when its tensors agree with it.

    Raises:
        BadInput: the record is incomplete or says another network than the tensors.
    """
    names = {f.name for f in fields(ViTSpec)}
    try:
        spec = ViTSpec(**{k: v for k, v in recorded.items() if k in names})
    except TypeError as exc:
        raise BadInput(f"the npidbench file's ViT spec is incomplete ({exc})") from None
    differ = [
        f"{name} {getattr(spec, name)!r} (tensors: {getattr(inferred, name)!r})"
        for name in _VIT_SHAPE_FIELDS
        if getattr(spec, name) != getattr(inferred, name)
    ]
    if (spec.init_values is None) != (inferred.init_values is None):
        differ.append(
            f"layer scale {spec.init_values!r} (tensors: {'yes' if inferred.init_values else 'none'})"
        )
    if differ:
        raise BadInput(f"the npidbench file records a ViT whose tensors differ: {', '.join(differ)}")
    return spec


def _recorded_convnext_problem(recorded: dict[str, Any], inferred: ConvNeXtSpec) -> str | None:
    try:
        spec = ConvNeXtSpec(
            tuple(recorded["depths"]), tuple(recorded["dims"]), bool(recorded.get("layer_scale", True))
        )
    except (KeyError, TypeError) as exc:
        return f"the npidbench file's ConvNeXt spec is incomplete ({exc})"
    if spec != inferred:
        return f"the npidbench file records a {_convnext_words(spec)} but its tensors are a {_convnext_words(inferred)}"
    return None


def _convnext_words(spec: ConvNeXtSpec) -> str:
    scale = "" if spec.layer_scale else ", no layer scale"
    return f"{spec.name} (depths {list(spec.depths)}, dims {list(spec.dims)}{scale})"


def _spec_from(cls: type, facts: dict[str, Any] | None) -> Any:
    """The spec dataclass ``cls`` from an inspection's facts of it (None when there are none)."""
    return cls(**{f.name: facts[f.name] for f in fields(cls)}) if facts else None


def _timm_model(obj: Any) -> str | None:
    """The ``--model`` of timm's train.py as its CheckpointSaver stores it (``args``: an
    argparse.Namespace, read as an inert placeholder), or None."""
    if not isinstance(obj, dict) or "args" not in obj:
        return None
    args = obj["args"]
    state = args.__dict__.get("_inert_state") if isinstance(args, Inert) else getattr(args, "__dict__", None)
    model = state.get("model") if isinstance(state, dict) else None
    return model if isinstance(model, str) else None


def _own_meta(raw: RawCheckpoint) -> dict[str, Any]:
    obj = raw.obj
    if isinstance(obj, dict) and obj.get("format") == "npidbench":
        meta = obj.get("meta")
        meta = (
            {str(k): v for k, v in meta.items() if not isinstance(v, torch.Tensor)}
            if isinstance(meta, dict)
            else {}
        )
        if isinstance(obj.get("arch"), str):
            meta.setdefault("arch", obj["arch"])
        return meta
    return {}


def _no_backbone_message(keys: list[str], fmt: str) -> str:
    if looks_like_vit(keys):
        return (
            "this looks like a Vision Transformer checkpoint (patch_embed / cls_token keys), but no ViT "
            "was found under any prefix (looked for cls_token, pos_embed and patch_embed.proj.weight in "
            f"timm, torchvision and mmpretrain names; first keys: {', '.join(keys[:3])})"
        )
    sample = ", ".join(keys[:3]) or "no tensors at all"
    return (
        f"no ResNet backbone found (looked for conv1/layer1.0.conv1 under any prefix, detectron2 "
        f"res2/stem names and nn.Sequential children; first keys: {sample})"
    )


def _incomplete_message(info: Inspection, branch: Branch) -> str:
    parts = []
    if info.missing:
        shown = ", ".join(info.missing[:3])
        parts.append(f"{len(info.missing)} backbone keys missing (first: {shown})")
    if info.mismatched:
        parts.append(f"{len(info.mismatched)} shape mismatches (first: {info.mismatched[0]})")
    where = f"under '{branch.prefix}'" if branch.prefix else "at the top level"
    return (
        f"the {info.format} checkpoint (branch {branch.name}) does not fill the {info.arch} "
        f"backbone: {'; '.join(parts)}; hint: keys {where} must follow "
        f"{'timm' if info.arch in DEEP_STEM_RESNETS else 'torchvision'}'s ResNet "
        "names; check that the file is complete, or choose another --branch"
    )
