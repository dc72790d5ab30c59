"""ConvNeXt checkpoints: facebookresearch/ConvNeXt's layout or timm's, bare or inside a
container, loaded strictly into timm's ConvNeXt (npidbench/backbones/convnext.py).

The FB -> timm renaming is timm's own ``checkpoint_filter_fn`` (PROTOCOLS-ARCH.md section 1:
downsample_layers.0 -> stem, stages.i.j -> stages.i.blocks.j, downsample_layers.i ->
stages.i.downsample, dwconv -> conv_dw, pwconvN -> mlp.fcN, norm -> head.norm, head -> head.fc);
what this module adds is finding the network in the file, reading its size from the tensors and
refusing anything incomplete or foreign.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from npidbench.backbones.convnext import ConvNeXtSpec, build_convnext
from npidbench.checkpoint.matching import match_tensors

_FB_MARK = re.compile(r"(^|\.)downsample_layers\.0\.0\.weight$")
_TIMM_MARK = re.compile(r"(^|\.)stages\.0\.blocks\.0\.conv_dw\.weight$")
# Outside the backbone: the classifier (FB head.*, timm head.fc.*) is ignored, never loaded.
_CLASSIFIER = ("head.fc.",)


def holds_convnext(keys: list[str]) -> bool:
    """Whether a ConvNeXt lies somewhere in the file (FB or timm names)."""
    return any(_TIMM_MARK.search(k) or _FB_MARK.search(k) for k in keys)


@dataclass
class ConvNeXtFound:
    """A ConvNeXt located in a file: its prefix, tensors in timm's names, and what was left."""

    prefix: str
    layout: str  # "facebookresearch" or "timm"
    state: dict[str, torch.Tensor]
    ignored: list[str] = field(default_factory=list)


def find_convnext(flat: dict[str, torch.Tensor], branch: str | None = None) -> ConvNeXtFound | None:
    """The ConvNeXt in ``flat`` (dotted keys of the whole file), or None when there is none.
    Several (a DINO student and teacher) need ``branch`` (a prefix such as ``teacher``), else the
    teacher is taken, as DINO's evaluation does [dino utils.py:71-82].

    Raises:
        ValueError: several networks and none is a teacher or the asked branch.
    """
    candidates = candidate_prefixes(flat)
    if not candidates:
        return None
    prefix = _choose(list(candidates), branch)
    layout = candidates[prefix]
    inside = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    outside = [k for k in flat if not k.startswith(prefix)]
    # The classifier, named as the file names it (FB: head.weight / head.bias), is never loaded.
    classifier = [k for k in inside if k.startswith("head.") and not k.startswith("head.norm.")]
    if layout == "facebookresearch":
        inside = _fb_to_timm(inside)
    state = {k: v for k, v in inside.items() if not k.startswith(_CLASSIFIER)}
    return ConvNeXtFound(prefix, layout, state, outside + [prefix + k for k in classifier])


def candidate_prefixes(flat: dict[str, torch.Tensor]) -> dict[str, str]:
    """Every prefix under which a ConvNeXt lies -> its layout ("timm" / "facebookresearch")."""
    candidates: dict[str, str] = {}
    for mark, layout in ((_TIMM_MARK, "timm"), (_FB_MARK, "facebookresearch")):
        for key in flat:
            hit = mark.search(key)
            if hit:
                candidates.setdefault(key[: hit.start() + (1 if hit.group(1) else 0)], layout)
    return candidates


def _choose(prefixes: list[str], branch: str | None) -> str:
    if branch is not None:
        chosen = [p for p in prefixes if p.split(".")[0] == branch or p.rstrip(".") == branch]
        if len(chosen) != 1:
            raise ValueError(
                f"--branch {branch} is not one of the networks: {', '.join(p.rstrip('.') or '(top)' for p in prefixes)}"
            )
        return chosen[0]
    if len(prefixes) == 1:
        return prefixes[0]
    ema = [p for p in prefixes if p.startswith("state_dict_ema.")]  # timm's training file
    if len(ema) == 1:
        return ema[0]
    teachers = [p for p in prefixes if p.startswith("teacher")]
    if len(teachers) == 1:
        return teachers[0]
    raise ValueError(
        f"the file holds several ConvNeXts ({', '.join(p.rstrip('.') or '(top)' for p in prefixes)}); "
        "choose one with --branch NAME"
    )


def _fb_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch/ConvNeXt names -> timm's, with timm's own filter (it needs a model for
    the shapes it reshapes: one of the file's size is built first)."""
    from timm.models.convnext import checkpoint_filter_fn

    spec = infer_spec(_fb_sizes(state))
    return checkpoint_filter_fn(state, build_convnext(spec))


def _fb_sizes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The FB tensors under timm's names for counting only (no reshaping needed to count)."""
    renamed = {}
    for key, value in state.items():
        key = key.replace("downsample_layers.0.", "stem.")
        key = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", key)
        renamed[key.replace("pwconv", "mlp.fc").replace("dwconv", "conv_dw")] = value
    return renamed


def infer_spec(state: dict[str, torch.Tensor]) -> ConvNeXtSpec:
    """Depths from the block indices, widths from each stage's last block, layer scale from the
    blocks' gamma."""
    depths, dims = [], []
    for stage in range(4):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"stages\.{stage}\.blocks\.(\d+)\.", k))}
        if not blocks:
            raise ValueError(f"stage {stage} has no blocks")
        depths.append(max(blocks) + 1)
        dims.append(int(state[f"stages.{stage}.blocks.{max(blocks)}.mlp.fc2.weight"].shape[0]))
    return ConvNeXtSpec(tuple(depths), tuple(dims), layer_scale="stages.0.blocks.0.gamma" in state)  # type: ignore[arg-type]


@dataclass
class ConvNeXtLoad:
    spec: ConvNeXtSpec
    tensors: dict[str, torch.Tensor] | None  # None: incomplete (see missing / unexpected)
    loaded: list[str]
    missing: list[str]
    mismatched: list[str]
    unexpected: list[str]


def match_convnext(found: ConvNeXtFound) -> ConvNeXtLoad:
    """Every tensor of the built network from the file (strict), or what is wrong."""
    spec = infer_spec(found.state)
    with torch.device("meta"):  # shapes only
        expected = build_convnext(spec).state_dict()
    match = match_tensors(expected, found.state)
    return ConvNeXtLoad(
        spec,
        match.loaded if match.complete else None,
        list(match.loaded),
        match.missing,
        match.mismatched,
        match.unexpected,
    )
