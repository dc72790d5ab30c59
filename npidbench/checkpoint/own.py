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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from npidbench.atomic import atomic_write
from npidbench.checkpoint.formats import to_detectron2_name
from npidbench.errors import BadInput
from npidbench.provenance import versions

FORMAT_VERSION = 1
CONVERT_TARGETS = ("torchvision", "detectron2")


def npidbench_checkpoint(
    model: nn.Module,
    arch: str,
    meta: dict[str, Any],
    head: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict for a backbone (its fc, if any, is dropped)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    return {
        "format": "npidbench",
        "version": FORMAT_VERSION,
        "arch": arch,
        "state_dict": state,
        "head": {k: v.detach().cpu().clone() for k, v in (head or {}).items()},
        "meta": {"versions": versions(), **meta},
    }


def save_npidbench_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> Path:
    """Write a checkpoint dict atomically (a crash never leaves a half-written file)."""
    return atomic_write(path, lambda handle: torch.save(checkpoint, handle))


def export_backbone(model: nn.Module, to: str, out: str | Path, *, input_normalised: bool = True) -> Path:
    """Write the loaded backbone for use elsewhere.

    ``torchvision``: a plain state_dict without fc, loadable with
    ``resnet.load_state_dict(sd, strict=False)`` (only fc missing).
    ``detectron2``: MoCo's convention: a pickle ``{"model": {name: ndarray}, "__author__",
    "matching_heuristics": True}`` with detectron2 names (stem, res2..res5, convK.norm, shortcut).
    """
    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Conv2d) and conv1.kernel_size == (3, 3) and conv1.padding != (1, 1):
        raise BadInput(
            f"this backbone's CIFAR stem pads conv1 by {conv1.padding[0]} (solo-learn's): a plain state dict "
            "cannot say so and would be read back with padding 1, another network; evaluate the original file"
        )
    if not input_normalised:
        raise BadInput(
            "this backbone takes pixels in [0, 1] without ImageNet mean/std (SimCLR v1): a plain state dict "
            "cannot say so and would be read back as a normalised-input network; evaluate the original file"
        )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    if to == "torchvision":
        return atomic_write(out, lambda handle: torch.save(state, handle))
    if to == "detectron2":
        converted = {to_detectron2_name(k): v.numpy() for k, v in state.items()}
        payload = {"model": converted, "__author__": "npidbench", "matching_heuristics": True}
        return atomic_write(out, lambda handle: pickle.dump(payload, handle, protocol=4))
    raise ValueError(f"unknown export target {to}; choose from {CONVERT_TARGETS}")
