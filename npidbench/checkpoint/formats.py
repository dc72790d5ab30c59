"""Find the ResNet backbone(s) inside any checkpoint layout and name the format it came in.

Every framework of USERS.md's table nests a torchvision-like ResNet somewhere: under a prefix
(``module.encoder_q.``, ``teacher.backbone.``, ``classy_state_dict...trunk._feature_blocks.``),
with detectron2 names (``res2.0.conv1.norm``) or as ``nn.Sequential(*resnet.children())`` (lightly's
examples). Instead of one hard-coded path per framework, all tensors are flattened to dotted paths
and every prefix under which a ResNet lives becomes a *branch*; the format's rule then picks the
branch its own evaluation uses (DINO teacher, MoCo encoder_q, timm EMA, else the online network).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from npidbench.checkpoint.safe_unpickle import Inert

Flat = dict[str, torch.Tensor]

# Path parts that only wrap the network (DDP, torch.compile, Lightning, VISSL, detectron2 FPN...).
_WRAPPERS = {
    "module",
    "_orig_mod",
    "state_dict",
    "model",
    "classy_state_dict",
    "base_model",
    "trunk",
    "_feature_blocks",
    "bottom_up",
    "backbone",
    "0",
    "encoder",
    "network",
    "net",
}
_ALIASES = {
    "state_dict_ema": "ema",
    "model_ema": "ema",
    "ema_state_dict": "ema",
    # lightly's DINO example: self.student_backbone / self.teacher_backbone, each
    # nn.Sequential(*resnet.children()[:-1]), next to student_head / teacher_head.
    "teacher_backbone": "teacher",
    "student_backbone": "student",
}
# The branch each framework's own evaluation uses, in order of preference (USERS.md).
DEFAULT_BRANCH_ORDER = ("teacher", "encoder_q", "base_encoder", "ema", "main")

_NAMING_PATTERNS = {
    "torchvision": re.compile(
        r"^(?P<prefix>(?:[^.]+\.)*?)(?:conv1\.weight|bn1\.[a-z_]+|layer[1-4]\.\d+\..+)$"
    ),
    "detectron2": re.compile(r"^(?P<prefix>(?:[^.]+\.)*?)(?:stem\.conv1\..+|res[2-5]\.\d+\..+)$"),
    "sequential": re.compile(r"^(?P<prefix>(?:[^.]+\.)*?)(?:0\.weight|1\.[a-z_]+|[4-7]\.\d+\..+)$"),
}
# A prefix is a backbone only if it also holds residual-block convolutions (any block, so that a
# partly renamed file is still found and refused with its missing keys named).
_ANCHOR = {
    "torchvision": re.compile(r"^layer[1-4]\.\d+\.conv\d\.weight$"),
    "detectron2": re.compile(r"^res[2-5]\.\d+\.conv\d\.weight$"),
    "sequential": re.compile(r"^[4-7]\.\d+\.conv\d\.weight$"),
}


@dataclass(frozen=True)
class Branch:
    """One backbone found in the file (a ResNet, or a ViT): where it lives and how its keys are named."""

    name: str
    prefix: str
    # torchvision | detectron2 | sequential; ViTs (checkpoint/vit.py): timm | torchvision-vit | mmpretrain-vit
    naming: str


def flatten(obj: Any, prefix: str = "", out: Flat | None = None, _seen: set | None = None) -> Flat:
    """Every tensor (or numeric numpy array) in a nested object, keyed by its dotted path."""
    out = {} if out is None else out
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return out
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj.detach()
        return out
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "fiub":
            out[prefix.rstrip(".")] = torch.from_numpy(np.array(obj))  # a writable copy
        return out
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    elif isinstance(obj, Inert):
        module_state = obj.module_state()
        items = (module_state if module_state is not None else obj.contents()).items()
    else:
        return out
    for key, value in items:
        flatten(value, f"{prefix}{key}.", out, seen)
    return out


def find_branches(keys: list[str]) -> list[Branch]:
    """Every prefix under which a ResNet's keys live, with its naming scheme."""
    found: dict[str, str] = {}
    for naming, pattern in _NAMING_PATTERNS.items():
        counts: Counter[str] = Counter()
        anchored: set[str] = set()
        for key in keys:
            match = pattern.match(key)
            if match:
                prefix = match.group("prefix")
                counts[prefix] += 1
                if _ANCHOR[naming].match(key[len(prefix) :]):
                    anchored.add(prefix)
        for prefix, count in counts.items():
            if count >= 4 and prefix in anchored and prefix not in found:
                found[prefix] = naming
    branches = [Branch(branch_name(p), p, n) for p, n in sorted(found.items())]
    names = Counter(b.name for b in branches)
    # Two prefixes that simplify to the same name keep their full prefix as the name.
    return [
        b if names[b.name] == 1 else Branch(b.prefix.rstrip(".") or "main", b.prefix, b.naming)
        for b in branches
    ]


def branch_name(prefix: str) -> str:
    """The short name of the network under ``prefix`` (wrappers dropped, aliases applied)."""
    parts = [p for p in prefix.strip(".").split(".") if p and p not in _WRAPPERS]
    name = ".".join(_ALIASES.get(p, p) for p in parts)
    return name or "main"


def default_branch(branches: list[Branch]) -> Branch | None:
    """The branch the framework's own evaluation uses; None when that is ambiguous."""
    by_name = {b.name: b for b in branches}
    for name in DEFAULT_BRANCH_ORDER:
        if name in by_name:
            return by_name[name]
    return branches[0] if len(branches) == 1 else None


def detect_format(top: Any, keys: list[str], branches: list[Branch]) -> str:
    """A human name for the layout, from its top-level keys and branches (USERS.md's table)."""
    top_keys = set(top.keys()) if isinstance(top, dict) else set()
    names = {b.name for b in branches}
    joined = "\n".join(keys)
    if isinstance(top, dict) and top.get("format") == "npidbench":
        return "npidbench"
    if "classy_state_dict" in top_keys:
        return "vissl"
    if any(b.naming == "detectron2" for b in branches):
        return "detectron2"
    if any(b.naming == "sequential" for b in branches):
        lightly = re.search(r"(^|\.)(projection_head|(student|teacher)_(backbone|head))\.", joined)
        return "lightly" if "lightly" in joined or lightly else "sequential"
    lightning = (
        _lightning_format(joined) if top_keys & {"hyper_parameters", "pytorch-lightning_version"} else ""
    )
    if lightning not in ("", "lightning"):
        # Before the mmselfsup rule: solo-learn's DINO has backbone./head./momentum_head., which
        # alone would read as mmselfsup; a Lightning checkpoint is never an mmselfsup file.
        return lightning
    if {"teacher", "student"} <= top_keys:
        return "dino"
    if "lemniscate" in top_keys:
        return "lemniscate"
    if re.search(r"(^|\.)backbone\.", joined) and (
        "meta" in top_keys or re.search(r"(^|\.)(neck|head|memory_bank|momentum_encoder)\.", joined)
    ):
        return "mmselfsup"
    if "encoder_q" in names:
        return "moco-v2" if re.search(r"encoder_q\.fc\.[02]\.weight", joined) else "moco-v1"
    if "base_encoder" in names:
        return "moco-v3"
    if "state_dict_ema" in top_keys or ({"arch", "args", "version"} <= top_keys):
        return "timm"
    if lightning:
        return lightning
    if re.search(r"(^|\.)(prototypes|projection_head)\.", joined):
        return "swav"
    if re.search(r"(^|\.)backbone\.", joined):
        return "backbone-prefixed"
    if any(b.prefix.endswith("module.") or ".module." in f".{b.prefix}" for b in branches):
        return "ddp"
    if simclr_converter_layout(top):
        return "simclr-converter"
    return "torchvision"


# Formats whose networks were trained on pixels in [0, 1] without ImageNet mean/std: SimCLR v1's
# TF models ("the original TF models were not trained with normalization" [simclr-converter
# README; eval.py:66-74: Resize 256, CenterCrop, ToTensor only]).
UNNORMALISED_INPUT_FORMATS = frozenset({"simclr-converter"})
_TOP_LEVEL_RESNET_KEY = re.compile(r"^(conv1|bn1|fc|layer[1-4]\.\d+)\.")


def simclr_converter_layout(top: Any) -> bool:
    """A file of tonylins/simclr-converter: ``torch.save({'state_dict': model.state_dict()})`` of
    its ResNet-50 1x/2x/4x [convert.py:85; resnet_wider.py:200-208], torchvision names at the top
    of the dict, ``fc`` holding TF's 1000-class supervised head [convert.py:81] (its fc.bias is
    the Linear's random initialisation: convert.py:82 sets ``fc.weight.bias``, not ``fc.bias``).

    The 1x network has exactly torchvision's resnet50 shapes, so the layout alone cannot tell it
    from a {'state_dict'} of a PyTorch-trained resnet50; the converter's fingerprint does: it writes
    the TF statistics into fresh BatchNorm modules [convert.py:74-79], so every num_batches_tracked
    is present and 0 while the running statistics are not the defaults. Any model trained with
    PyTorch's BatchNorm counts its batches."""
    if not isinstance(top, dict) or set(top) != {"state_dict"} or not isinstance(top["state_dict"], dict):
        return False
    state = top["state_dict"]
    if not all(isinstance(k, str) and _TOP_LEVEL_RESNET_KEY.match(k) for k in state):
        return False
    fc = state.get("fc.weight")
    if not isinstance(fc, torch.Tensor) or fc.ndim != 2 or fc.shape[0] != 1000:
        return False
    # ResNet-50: Bottleneck blocks (3, 4, 6, 3), the only depth the converter builds.
    if not all(f"layer{s}.{n - 1}.conv3.weight" in state for s, n in ((1, 3), (2, 4), (3, 6), (4, 3))):
        return False
    if "layer3.6.conv1.weight" in state:
        return False
    tracked = [v for k, v in state.items() if k.endswith(".num_batches_tracked")]
    variances = [v for k, v in state.items() if k.endswith(".running_var")]
    return (
        bool(tracked)
        and len(tracked) == len(variances)
        and all(isinstance(t, torch.Tensor) and t.numel() == 1 and int(t) == 0 for t in tracked)
        and any(isinstance(v, torch.Tensor) and not bool(torch.all(v == 1)) for v in variances)
    )


def _lightning_format(joined: str) -> str:
    """solo-learn or lightly, for a Lightning checkpoint, from the names of its modules.

    solo-learn's DINO keeps the student as ``backbone``/``head`` and the teacher as
    ``momentum_backbone``/``momentum_head`` (solo/methods/dino.py); its own linear evaluation
    (main_linear.py) keeps keys containing "backbone" after ``replace("backbone.", "")``, which
    turns momentum_backbone.* into names the ResNet lacks, dropped by strict=False: it evaluates
    the online ``backbone``, for DINO too, and so does the default branch ("main") here.
    """
    if re.search(r"(^|\.)(projector|momentum_backbone|classifier)\.", joined):
        return "solo-learn"
    if re.search(
        r"(^|\.)(projection_head|prediction_head|(teacher|student)_backbone|backbone_momentum)\.", joined
    ):
        return "lightly"
    return "lightning"


_D2_BLOCK = re.compile(r"^res(?P<stage>[2-5])\.(?P<block>\d+)\.(?P<rest>.+)$")
_SEQ_INDEX = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def to_torchvision_name(key: str, naming: str) -> str | None:
    """A key under a branch prefix in torchvision's ResNet names; None if it is not backbone."""
    if naming == "torchvision":
        return key
    if naming == "sequential":
        head, _, rest = key.partition(".")
        return f"{_SEQ_INDEX[head]}.{rest}" if head in _SEQ_INDEX and rest else None
    # detectron2 (MoCo's conversion, PROTOCOLS.md "Weight conversion to detectron2 names")
    if key.startswith("stem.conv1.norm."):
        return "bn1." + key[len("stem.conv1.norm.") :]
    if key.startswith("stem.conv1."):
        return "conv1." + key[len("stem.conv1.") :]
    match = _D2_BLOCK.match(key)
    if not match:
        return None
    layer = f"layer{int(match['stage']) - 1}.{match['block']}."
    rest = match["rest"]
    rest = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", rest)
    rest = re.sub(r"^shortcut\.norm\.", "downsample.1.", rest)
    rest = re.sub(r"^shortcut\.", "downsample.0.", rest)
    return layer + rest


def to_detectron2_name(key: str) -> str:
    """The inverse of to_torchvision_name for detectron2 naming (MoCo's convert script rules)."""
    if key.startswith("conv1."):
        return "stem.conv1." + key[len("conv1.") :]
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[len("bn1.") :]
    match = re.match(r"^layer(\d)\.(\d+)\.(.+)$", key)
    if not match:
        raise ValueError(f"not a torchvision ResNet backbone key: {key}")
    stage, block, rest = int(match[1]) + 1, match[2], match[3]
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
    rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
    return f"res{stage}.{block}.{rest}"


def looks_like_vit(keys: list[str]) -> bool:
    """ViT checkpoints (DINO, MoCo v3, MAE, DINOv2, timm, torchvision, mmpretrain) carry a patch
    embedding, a class token or a position embedding under one of their names."""
    return any(
        k.endswith(
            (
                "patch_embed.proj.weight",
                "patch_embed.projection.weight",
                "cls_token",
                "pos_embed",
                "conv_proj.weight",
                "class_token",
                "encoder.pos_embedding",
            )
        )
        for k in keys
    )
