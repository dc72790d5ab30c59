"""Linear classification heads on frozen features, and top-k accuracy (tensors in, numbers out).

PROTOCOLS.md "Linear probes": each FeatureN head takes the pooled map (e.g. 64x12x12 for
ResNet-50 Feature1), normalises it with BatchNorm2d over its channels without affine parameters
(mmselfsup's MultiClsHead), flattens it and applies Linear(dims -> classes) initialised
normal(0, 0.01). The AvgPool head ("MoCo protocol") is a plain Linear on the global pooled vector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from npidbench.backbones import Layer


class FeatureHead(nn.Module):
    """BN2d(channels, affine=False) on the (channels, grid, grid) map -> flatten -> Linear."""

    def __init__(self, channels: int, grid: int, classes: int) -> None:
        super().__init__()
        self.channels, self.grid = channels, grid
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.fc = nn.Linear(channels * grid * grid, classes)
        nn.init.normal_(self.fc.weight, std=0.01)  # mmselfsup MultiClsHead init
        nn.init.zeros_(self.fc.bias)

    @property
    def in_features(self) -> int:
        return self.fc.in_features

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """``pooled``: (B, channels * grid * grid), the flattened pooled map (as extracted)."""
        x = pooled.reshape(-1, self.channels, self.grid, self.grid)
        return self.fc(self.norm(x).flatten(1))


class AvgPoolHead(nn.Module):
    """Linear(channels -> classes) on globally pooled features, no normalisation (MoCo lincls)."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    @property
    def in_features(self) -> int:
        return self.fc.in_features

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)


class BatchNormLinearHead(nn.Module):
    """MAE's linear-probe head: BatchNorm1d(affine=False, eps 1e-6) then Linear with weights
    trunc_normal(std 0.01) and zero bias (mae main_linprobe.py; PROTOCOLS-ARCH.md section 2)."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(channels, affine=False, eps=1e-6)
        self.fc = nn.Linear(channels, classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    @property
    def in_features(self) -> int:
        return self.fc.in_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(features))


class HeadSet(nn.Module):
    """Several heads trained together on one forward pass: {layer: features} -> {layer: logits}."""

    def __init__(self, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(dict(heads))

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.heads)

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: head(features[name]) for name, head in self.heads.items()}


def build_heads(layers: Sequence[Layer], classes: int) -> HeadSet:
    """One head per layer: FeatureHead for a pooled map (FeatureN: its grid), AvgPoolHead for a
    vector (AvgPool)."""
    heads: dict[str, nn.Module] = {}
    for layer in layers:
        if layer.grid:
            heads[layer.name] = FeatureHead(layer.channels, layer.grid, classes)
        else:
            heads[layer.name] = AvgPoolHead(layer.channels, classes)
    return HeadSet(heads)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """How many rows have their label among the k highest logits (k capped at the class count).

    Ties at the k-th place are broken by ``torch.topk``'s order, as in the reference evaluators.
    """
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels.view(-1, 1)
    return {k: int(hits[:, : min(k, top.shape[1])].any(dim=1).sum()) for k in ks}
