"""Plain Vision Transformers in the layouts SSL frameworks write, for timm's VisionTransformer.

Every layout of PROTOCOLS-ARCH.md section 1 is flattened to dotted paths (formats.flatten) and
every prefix under which a ViT lives becomes a branch, as for ResNets; the format's rule picks the
branch its own evaluation uses:

==================  =========================================  ========================================
layout              backbone (default branch)                  ignored
==================  =========================================  ========================================
DINO bare / timm    top level                                  ``head.*`` (a classifier)
DINO training       ``teacher.backbone.*`` (student:           ``head.*`` (DINO head), the student,
                    ``student.module.backbone.*``)             optimiser, loss centre
iBOT training       as DINO; ``gamma_1/2`` -> ``lsN.gamma``    the student's ``masked_embed``, heads
MoCo v3             ``state_dict.module.base_encoder.*``       ``base_encoder.head.*`` (projector),
                                                               momentum_encoder, predictor
MAE                 ``model.*``                                ``mask_token``, ``decoder_*``
DINOv2 bare         top level; registers converted as timm     ``mask_token``
                    does; ``blocks.C.N`` chunks flattened
DINOv2 training     ``teacher.backbone.*``                     ``dino_head``, ``ibot_head``
timm training       ``state_dict_ema`` (else ``state_dict``)   the other copy, optimiser
torchvision         renamed to timm's names                    ``heads.*``
mmpretrain          ``state_dict.backbone.*``, renamed         neck, head
==================  =========================================  ========================================

The ViTSpec comes from the shapes; the number of heads is not in them and is the standard one
for the width, except MoCo v3's ViT-S (12 heads), recognised by its fixed sin-cos position
embedding (it is in the state dict) or its base_encoder branch. Transformers that are not plain
ViTs (Swin, XCiT, BEiT relative position bias, SwiGLU blocks, distilled DeiT, hybrid or conv
stems) are named and refused.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from npidbench.backbones.vit import ViTSpec
from npidbench.checkpoint.formats import Branch, Flat, branch_name
from npidbench.errors import BadInput

TIMM, TORCHVISION, MMPRETRAIN = "timm", "torchvision-vit", "mmpretrain-vit"

# Keys relative to a backbone prefix that say which naming lives there, most specific first
# (mmpretrain also has cls_token / pos_embed).
_ANCHORS = (
    (MMPRETRAIN, ("patch_embed.projection.weight", "layers.0.ln1.weight")),
    (TORCHVISION, ("conv_proj.weight", "class_token", "encoder.pos_embedding")),
    (TIMM, ("patch_embed.proj.weight", "cls_token", "pos_embed")),
)

# Transformers that reuse ViT names but are other networks, in the order they are told apart
# (a hybrid's CNN stem has stages.N.blocks.M, Swin relative position tables, XCiT a conv
# patch embedding).
_UNSUPPORTED = (
    (re.compile(r"(^|\.)patch_embed\.backbone\."), "a hybrid ResNet-ViT (patch_embed.backbone: a CNN stem)"),
    (
        # attn / norm1: not ConvNeXt's stages.N.blocks.M (conv_dw, norm, mlp)
        re.compile(r"(^|\.)(layers|stages)\.\d+\.blocks\.\d+\.(attn|norm1)\."),
        "a Swin Transformer (layers.N.blocks.M: shifted-window attention with relative position bias)",
    ),
    (
        re.compile(r"(^|\.)(cls_attn_blocks\.|pos_embeder\.|pos_embed\.token_projection)|\.local_mp\."),
        "an XCiT (cross-covariance attention: cls_attn_blocks / local_mp)",
    ),
    (
        re.compile(r"relative_position_bias_table$|(^|\.)rel_pos_bias\.|\.attn\.[qv]_bias$"),
        "a ViT with relative position bias (BEiT / data2vec style: relative_position_bias_table)",
    ),
    (
        re.compile(r"\.(mlp|ffn)\.(w12|w3)\.|\.mlp\.fc1_[gx]\."),
        "a ViT with SwiGLU feed-forward blocks (mlp.w12 / mlp.w3: DINOv2 ViT-g, EVA)",
    ),
    (re.compile(r"(^|\.)dist_token$"), "a distilled DeiT (dist_token: a second class token)"),
    (
        re.compile(r"(^|\.)patch_embed\.proj\.\d+\."),
        "a ViT with a convolutional stem (patch_embed.proj.N: MoCo v3 vit_conv_*)",
    ),
)

# Inside the backbone prefix but not part of the backbone (timm names): classifiers and SSL
# heads, old timm's representation layer, MAE's decoder and mask token, DINOv2's mask token,
# iBOT's masked_embed, torchvision's heads.
_NOT_BACKBONE = re.compile(
    r"^((head|heads|head_dist|pre_logits|decoder_\w+)(\.|$)|(mask_token|masked_embed)$)"
)

# num_heads is not in the shapes: DeiT-Ti/S, ViT-B/L/H [timm vision_transformer.py vit_* builders;
# dino vision_transformer.py:243-262; mae models_vit.py; dinov2 models/vision_transformer.py:344-385].
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
_MOCO_V3_SMALL_HEADS = 12  # [moco-v3 vits.py:44-49]: vit_small is 384 wide with 12 heads

_ESSENTIAL = ("cls_token", "pos_embed", "patch_embed.proj.weight")


def unsupported_layout(keys: list[str]) -> str | None:
    """One line naming a transformer that is not a plain ViT, or None."""
    for pattern, what in _UNSUPPORTED:
        key = next((k for k in keys if pattern.search(k)), None)
        if key is not None:
            return (
                f"this is {what}, found at {key}; npidbench evaluates plain ViTs (timm's VisionTransformer) "
                "only: refusing rather than loading part of it"
            )
    return None


def find_vit_branches(keys: list[str]) -> list[Branch]:
    """Every prefix under which a ViT's keys live, with its naming (timm, torchvision, mmpretrain)."""
    found: dict[str, str] = {}
    for naming, anchors in _ANCHORS:
        for key in keys:
            for anchor in anchors:
                if key == anchor or key.endswith("." + anchor):
                    found.setdefault(key[: len(key) - len(anchor)], naming)
    branches = [Branch(branch_name(p), p, n) for p, n in sorted(found.items())]
    names = Counter(b.name for b in branches)
    return [
        b if names[b.name] == 1 else Branch(b.prefix.rstrip(".") or "main", b.prefix, b.naming)
        for b in branches
    ]


def detect_vit_format(top: Any, flat: Flat, branches: list[Branch]) -> str:
    """A human name for the layout, from its containers, branches and key names."""
    top_keys = set(top.keys()) if isinstance(top, Mapping) else set()
    names = {b.name for b in branches}
    namings = {b.naming for b in branches}
    joined = "\n".join(flat)
    if {"teacher", "student"} <= top_keys:
        # iBOT's student has masked_embed and its head a patch layer [main_ibot.py:205-214]
        return "ibot" if re.search(r"(^|\.)masked_embed$|\.last_layer2\.", joined, re.M) else "dino"
    if "teacher" in names and re.search(r"(^|\.)(dino_head|ibot_head)\.", joined):
        return "dinov2-train"  # teacher_checkpoint.pth [dinov2 train/train.py:130]
    if names & {"base_encoder", "momentum_encoder"}:
        return "moco-v3"
    if MMPRETRAIN in namings:
        return "mmpretrain"
    if TORCHVISION in namings:
        return "torchvision"
    mask = next((v for k, v in flat.items() if k == "mask_token" or k.endswith(".mask_token")), None)
    if re.search(r"(^|\.)(register_tokens$|blocks\.\d+\.\d+\.)", joined, re.M) or (
        mask is not None and mask.ndim == 2  # DINOv2's is (1, D), MAE's (1, 1, D_decoder)
    ):
        return "dinov2"
    if re.search(r"(^|\.)decoder_", joined) or mask is not None:
        return "mae"
    if "state_dict_ema" in top_keys or {"arch", "args", "version"} <= top_keys:
        return "timm"
    if any(b.prefix.startswith("module.") or ".module." in f".{b.prefix}" for b in branches):
        return "ddp"
    return "timm"


def to_timm_name(key: str, naming: str) -> str:
    """A key under a ViT branch in timm's names; unknown keys are returned unchanged (so that a
    refusal names them as the file does)."""
    if naming == TORCHVISION:
        return _torchvision_name(key)
    if naming == MMPRETRAIN:
        return _mmpretrain_name(key)
    # DINOv2 block_chunks: blocks.C.N.* with N the global block index [dinov2 models/vision_transformer.py]
    key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
    # iBOT / DeiT III layer scale, as timm's adapt_layer_scale [timm vision_transformer.py:2020-2022]
    return re.sub(r"^blocks\.(\d+)\.gamma_([12])$", r"blocks.\1.ls\2.gamma", key)


# torchvision vit_b_16 [torchvision/models/vision_transformer.py]: the derived map of
# PROTOCOLS-ARCH.md; mlp.linear_1/2 are the names before torchvision 0.13's MLP.
_TV_TOP = {"class_token": "cls_token", "encoder.pos_embedding": "pos_embed"}
_TV_PREFIX = (("conv_proj.", "patch_embed.proj."), ("encoder.ln.", "norm."))
_TV_BLOCK = (
    ("ln_1.", "norm1."),
    ("ln_2.", "norm2."),
    ("self_attention.in_proj_weight", "attn.qkv.weight"),
    ("self_attention.in_proj_bias", "attn.qkv.bias"),
    ("self_attention.out_proj.", "attn.proj."),
    ("mlp.0.", "mlp.fc1."),
    ("mlp.3.", "mlp.fc2."),
    ("mlp.linear_1.", "mlp.fc1."),
    ("mlp.linear_2.", "mlp.fc2."),
)


def _torchvision_name(key: str) -> str:
    if key in _TV_TOP:
        return _TV_TOP[key]
    for old, new in _TV_PREFIX:
        if key.startswith(old):
            return new + key[len(old) :]
    match = re.match(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)$", key)
    if match:
        rest = match[2]
        for old, new in _TV_BLOCK:
            if rest.startswith(old):
                return f"blocks.{match[1]}.{new}{rest[len(old) :]}"
    return key


# mmpretrain / mmselfsup 1.x [mmpretrain models/backbones/vision_transformer.py:16-108, 245-369;
# tools/model_converters/deit3_to_mmpretrain.py]: final norm ``ln1``, avg_featmap norm ``ln2``.
_MM_TOP = (("patch_embed.projection.", "patch_embed.proj."), ("ln1.", "norm."), ("ln2.", "fc_norm."))
_MM_BLOCK = (
    ("ln1.", "norm1."),
    ("ln2.", "norm2."),
    ("attn.gamma1.weight", "ls1.gamma"),
    ("ffn.gamma2.weight", "ls2.gamma"),
    ("ffn.layers.0.0.", "mlp.fc1."),
    ("ffn.layers.1.", "mlp.fc2."),
    ("attn.qkv.", "attn.qkv."),
    ("attn.proj.", "attn.proj."),
)


def _mmpretrain_name(key: str) -> str:
    for old, new in _MM_TOP:
        if key.startswith(old):
            return new + key[len(old) :]
    match = re.match(r"^layers\.(\d+)\.(.+)$", key)
    if match:
        rest = match[2]
        for old, new in _MM_BLOCK:
            if rest.startswith(old):
                return f"blocks.{match[1]}.{new}{rest[len(old) :]}"
    return key


def branch_state(
    flat: Flat, branch: Branch, branches: list[Branch]
) -> tuple[dict[str, torch.Tensor], set[str], list[str]]:
    """The branch's backbone tensors in timm's names, the file keys they came from, and the
    conversions applied (in words). Heads, decoders and mask tokens under the prefix are left
    out (ignored); so are the keys of a branch nested deeper (another network)."""
    deeper = [
        b.prefix
        for b in branches
        if len(b.prefix) > len(branch.prefix) and b.prefix.startswith(branch.prefix)
    ]
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    renamed = False
    for key, tensor in flat.items():
        if not key.startswith(branch.prefix) or any(key.startswith(p) for p in deeper):
            continue
        rest = key[len(branch.prefix) :]
        name = to_timm_name(rest, branch.naming)
        if _NOT_BACKBONE.match(name):
            continue
        renamed |= name != rest
        state[name] = tensor
        used.add(key)
    converted = []
    if renamed:
        converted.append(f"{branch.naming} names -> timm names")
    if "register_tokens" in state and "cls_token" in state and "pos_embed" in state:
        # DINOv2 adds pos_embed to [cls, patches] and inserts the registers after it; timm's
        # no_embed_class model gets the same tokens from reg_token, cls_token + pos_embed[:, 0]
        # and pos_embed[:, 1:] [timm vision_transformer.py:1788-1792 _convert_dinov2].
        cls, pos = state.pop("cls_token"), state.pop("pos_embed")
        state["reg_token"] = state.pop("register_tokens")
        state["cls_token"] = cls.float() + pos[:, :1].float()
        state["pos_embed"] = pos[:, 1:]
        converted.append(
            "DINOv2 registers as timm: reg_token = register_tokens, cls_token += pos_embed[:, 0], "
            "pos_embed = pos_embed[:, 1:] (no_embed_class)"
        )
    return state, used, converted


def missing_essentials(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The tensors the spec is read from that the branch lacks."""
    return [name for name in _ESSENTIAL if name not in state]


def without_class_token(state: Mapping[str, torch.Tensor]) -> str | None:
    """The refusal for a complete ViT built without a class token (its position embedding has
    no prefix row), as opposed to a file that lost its cls_token."""
    pos = state.get("pos_embed")
    if (
        "cls_token" in state
        or pos is None
        or pos.ndim != 3
        or "reg_token" in state
        or not _square(pos.shape[1])
    ):
        return None
    return (
        "this ViT has no class token (timm class_token=False: a global-average-pool ViT, pos_embed "
        f"{tuple(pos.shape)} has no prefix row); npidbench's ViT features read the class token, so it "
        "cannot evaluate it yet"
    )


def fixed_sincos(pos: torch.Tensor | None) -> str | None:
    """``moco-v3`` or ``mae`` when ``pos`` (1, 1 + g*g, D) is that framework's fixed 2D sin-cos
    position embedding (zeros for the class token), else None.

    Both concatenate sin and cos of row and column positions times 1 / 10000^(k / (D/4)); MoCo v3
    puts the row first [moco-v3 vits.py:25-41, torch.meshgrid 'ij'], MAE the column first
    [mae util/pos_embed.py:20-71, np.meshgrid 'xy' with "w goes first"]. mmpretrain's
    build_2d_sincos_position_embedding (its MoCo v3 and MAE ViTs) is row first: it reads as
    ``moco-v3``, which only matters for the heads of a 384-wide ViT (mmselfsup's mocov3-small
    has 12 too)."""
    if pos is None or pos.ndim != 3 or not pos.is_floating_point() or pos.shape[-1] % 4:
        return None
    grid = math.isqrt(pos.shape[1] - 1)
    if grid < 2 or grid * grid != pos.shape[1] - 1:
        return None
    table = pos[0].double()
    if table[0].abs().max() > 1e-6:
        return None
    quarter = pos.shape[-1] // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    row = rows.flatten().double()[:, None] * omega
    col = cols.flatten().double()[:, None] * omega
    for kind, (first, second) in (("moco-v3", (row, col)), ("mae", (col, row))):
        expected = torch.cat([first.sin(), first.cos(), second.sin(), second.cos()], dim=1)
        if torch.allclose(table[1:], expected, atol=2e-3, rtol=0):  # fp16 files round to ~1e-3
            return kind
    return None


def infer_vit_spec(state: Mapping[str, torch.Tensor], moco_v3: bool) -> tuple[ViTSpec, str | None]:
    """The ViTSpec of these timm-named tensors and where num_heads came from (None: unknown, the
    spec then has a placeholder of 1 head so that the keys can still be checked).

    Raises:
        BadInput: shapes no timm VisionTransformer has (non-square patches or grids, no blocks).
    """
    cls, pos, proj = state["cls_token"], state["pos_embed"], state["patch_embed.proj.weight"]
    width = int(cls.shape[-1])
    if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise BadInput(f"patch_embed.proj.weight has shape {tuple(proj.shape)}: not a square patch embedding")
    patch = int(proj.shape[-1])
    registers = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    tokens = int(pos.shape[1]) if pos.ndim == 3 else -1
    if _square(tokens - 1 - registers):
        no_embed_class, grid = False, math.isqrt(tokens - 1 - registers)
    elif _square(tokens):
        no_embed_class, grid = True, math.isqrt(tokens)  # DeiT III, DINOv2 converted by timm
    else:
        raise BadInput(
            f"pos_embed has shape {tuple(pos.shape)}: not a square grid of patches plus "
            f"{1 + registers} prefix tokens; a timm VisionTransformer cannot hold it"
        )
    blocks = {int(m[1]) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))}
    if not blocks:
        raise BadInput("no transformer blocks (blocks.N.*) under the ViT's prefix")
    depth = max(blocks) + 1
    hidden = next(
        (
            int(state[f"blocks.{i}.mlp.fc1.weight"].shape[0])
            for i in sorted(blocks)
            if f"blocks.{i}.mlp.fc1.weight" in state
        ),
        4 * width,
    )
    fc2 = next((state[k] for k in state if re.match(r"^blocks\.\d+\.mlp\.fc2\.weight$", k)), None)
    if fc2 is not None and fc2.ndim == 2 and 2 * int(fc2.shape[1]) == hidden:
        raise BadInput(
            "this is a ViT with SwiGLU feed-forward blocks packed as mlp.fc1 (twice the width of mlp.fc2's "
            "input: timm's SwiGLUPacked, vit_giant_patch14_dinov2); npidbench evaluates plain ViTs only"
        )
    mlp_ratio = hidden / width
    if int(width * mlp_ratio) != hidden:  # timm builds int(dim * mlp_ratio) hidden units
        mlp_ratio = (hidden + 0.5) / width
    heads, source = _heads(width, depth, hidden, moco_v3)
    spec = ViTSpec(
        depth=depth,
        embed_dim=width,
        num_heads=heads or 1,
        patch_size=patch,
        img_size=grid * patch,
        mlp_ratio=mlp_ratio,
        qkv_bias=any(re.match(r"^blocks\.\d+\.attn\.qkv\.bias$", k) for k in state),
        # Only whether layer scale exists matters: its values are loaded from the file.
        init_values=1.0 if any(re.match(r"^blocks\.\d+\.ls[12]\.gamma$", k) for k in state) else None,
        reg_tokens=registers,
        no_embed_class=no_embed_class,
        fc_norm="fc_norm.weight" in state,
    )
    return spec, source if heads else None


def _heads(width: int, depth: int, hidden: int, moco_v3: bool) -> tuple[int | None, str]:
    if moco_v3 and width == 384:
        return _MOCO_V3_SMALL_HEADS, "MoCo v3 ViT-S (12 heads, moco-v3 vits.py)"
    if (width, depth, hidden) == (768, 8, 2304):
        return 8, "mmpretrain / original ViT 'small' (768 wide, 8 blocks, 8 heads)"
    if width in STANDARD_HEADS:
        return STANDARD_HEADS[width], f"standard for width {width}"
    return None, ""


def unknown_heads_message(spec: ViTSpec) -> str:
    known = ", ".join(f"{w} -> {h}" for w, h in STANDARD_HEADS.items())
    return (
        f"this Vision Transformer is {spec.embed_dim} wide, not a standard width ({known} heads), and "
        "the number of attention heads is not in its tensors; refusing rather than guessing it"
    )


def spec_description(spec: ViTSpec) -> str:
    """``ViT, 12 blocks x 384 (6 heads), patch 16, 224 px`` and extras."""
    extras = [f"{spec.reg_tokens} registers"] if spec.reg_tokens else []
    if spec.init_values is not None:
        extras.append("layer scale")
    if spec.no_embed_class:
        extras.append("class token without position")
    if spec.fc_norm:
        extras.append("fc_norm")
    more = f", {', '.join(extras)}" if extras else ""
    return (
        f"ViT, {spec.depth} blocks x {spec.embed_dim} ({spec.num_heads} heads, mlp {spec.mlp_ratio:g}x), "
        f"patch {spec.patch_size}, {spec.img_size} px{more}"
    )


def foreign_tensors_message(extra: list[str], arch: str) -> str:
    """The refusal for tensors inside the ViT's prefix that the built network does not have."""
    modules: list[str] = []
    for name in extra:
        module = name.rsplit(".", 1)[0] + ".*" if "." in name else name
        if module not in modules:
            modules.append(module)
    shown = ", ".join(modules[:3]) + (f", +{len(modules) - 3} more" if len(modules) > 3 else "")
    count = f"{len(extra)} tensor{'s' if len(extra) != 1 else ''}"
    return (
        f"{count} inside the ViT backbone that a timm VisionTransformer {arch} does not have ({shown}): "
        "another network, not a plain ViT; refusing rather than dropping them"
    )


def incomplete_message(fmt: str, branch: Branch, arch: str, missing: list[str], mismatched: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} backbone keys missing (first: {', '.join(missing[:3])})")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches (first: {mismatched[0]})")
    where = f"under '{branch.prefix}'" if branch.prefix else "at the top level"
    return (
        f"the {fmt} Vision Transformer checkpoint (branch {branch.name}) does not fill the {arch} "
        f"backbone: {'; '.join(parts)}; hint: keys {where} follow {branch.naming} names; check that the "
        "file is complete, or choose another --branch"
    )


def _square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n
