"""The strict match of a file's tensors against the network built for them, shared by every
backbone family: each tensor the network has must come from the file with its shape (a buffer
named ``optional`` may be absent and is then defaulted to zeros, and reported), and every tensor
the file holds under the backbone must be one the network has."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass
class TensorMatch:
    loaded: dict[str, torch.Tensor] = field(default_factory=dict)  # in the network's dtypes
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "name: (file shape) vs (network shape)"
    defaulted: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.mismatched or self.unexpected)


def match_tensors(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], optional: str | None = None
) -> TensorMatch:
    """``state`` against ``expected`` (a state dict of the built network, meta tensors are fine)."""
    match = TensorMatch()
    for name, target in expected.items():
        source = state.get(name)
        if source is None:
            if optional is not None and name.endswith(optional):
                match.defaulted.append(name)
                match.loaded[name] = torch.zeros(target.shape, dtype=target.dtype)
            else:
                match.missing.append(name)
        elif tuple(source.shape) != tuple(target.shape):
            match.mismatched.append(f"{name}: {tuple(source.shape)} vs {tuple(target.shape)}")
        else:
            match.loaded[name] = source.to(target.dtype) if source.is_floating_point() else source
    match.unexpected = [name for name in state if name not in expected]
    return match
