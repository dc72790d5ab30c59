"""Weighted k-nearest-neighbour classification (NPID, Wu et al. 2018; lemniscate, mmselfsup).

Cosine similarity s between L2-normalised features, neighbour weight exp(s / T), class score =
sum of the weights of the k neighbours in that class; top-1 / top-5 accuracy.

Memory-bounded: queries and training features are processed in blocks and a running top-k is
merged block by block, so neither a dense queries x train similarity matrix nor the whole
training matrix in float32 on the device is ever needed (dino#161 ran out of memory there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class KnnResult:
    """Top-1 / top-5 accuracy in percent for each k."""

    top1: dict[int, float]
    top5: dict[int, float]


def l2_normalize(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=1)


def _as_tensor(block: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(block, np.ndarray):
        block = torch.from_numpy(np.array(block, dtype=np.float32))  # copies out of a memory map
    return block.to(device=device, dtype=torch.float32, copy=True)  # normalised in place below


def _labels(labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        return labels.long()
    return torch.from_numpy(np.array(labels, dtype=np.int64))  # copies out of a memory map


def nearest_neighbours(
    train: np.ndarray | torch.Tensor,
    queries: torch.Tensor,
    k: int,
    block_bytes: int = 256 * 1024**2,
    normalize_train: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities and train indices for each (already normalised) query.

    ``train`` may be a read-only memory map: it is streamed once, in blocks sized so that neither
    a block of training rows nor its block of similarities exceeds ``block_bytes``.
    """
    device = queries.device
    n_train, dim = train.shape
    rows_per_block = max(1, min(n_train, block_bytes // (4 * max(queries.shape[0], dim))))
    best_sim = torch.full((queries.shape[0], 0), -float("inf"), device=device)
    best_idx = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=device)
    for start in range(0, n_train, rows_per_block):
        block = _as_tensor(train[start : start + rows_per_block], device)
        if normalize_train:
            block.div_(block.norm(dim=1, keepdim=True).clamp_min_(1e-12))  # in place: no 2nd copy
        sims = queries @ block.T
        del block
        # Top-k of the block first, then merge with the running top-k: only q x 2k is ever
        # concatenated, never a q x block index matrix.
        block_sim, block_pos = sims.topk(min(k, sims.shape[1]), dim=1)
        del sims
        merged_sim = torch.cat([best_sim, block_sim], dim=1)
        merged_idx = torch.cat([best_idx, block_pos + start], dim=1)
        keep = min(k, merged_sim.shape[1])
        best_sim, order = merged_sim.topk(keep, dim=1)  # sorted, largest first
        best_idx = merged_idx.gather(1, order)
    return best_sim, best_idx


# exp(s / T) stays finite in float32 for s / T <= 80 even summed over k = 200 neighbours.
_MAX_EXPONENT = 80.0


def neighbour_weights(similarities: torch.Tensor, temperature: float) -> torch.Tensor:
    """exp(s / T), as lemniscate computes it (cosine s <= 1, so finite for T >= 1 / 80). At a
    smaller T it would overflow: then relative to the nearest neighbour, exp((s - s_1) / T), the
    same ranking and vote up to rounding."""
    if 1.0 / temperature <= _MAX_EXPONENT:
        return (similarities / temperature).exp()
    return ((similarities - similarities[:, :1]) / temperature).exp()


def rank_classes(scores: torch.Tensor) -> torch.Tensor:
    """Class indices by decreasing score, equal scores in increasing class order: lemniscate
    ranks with torch's CPU sort, which keeps the lower class first (topk promises no order). It
    decides top-5 whenever fewer than five classes got a vote (k = 1, small k)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def weighted_knn(
    train_features: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    test_features: np.ndarray | torch.Tensor,
    test_labels: np.ndarray | torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),  # mmselfsup; lemniscate uses 200 only
    temperature: float = 0.07,  # NPID, Wu et al. 2018
    num_classes: int | None = None,
    query_block: int = 8192,
    block_bytes: int = 256 * 1024**2,
    device: str | torch.device = "cpu",
) -> KnnResult:
    """The NPID weighted kNN evaluation. Features need not be normalised (done here).

    Queries are taken ``query_block`` at a time (large blocks: the training features are streamed
    once per query block, and big matrix products run fastest).
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    device = torch.device(device)
    train_y = _labels(train_labels).to(device)
    test_y = _labels(test_labels)
    classes = int(num_classes if num_classes is not None else int(train_y.max()) + 1)
    k_max = max(ks)
    if k_max > train_features.shape[0]:
        raise ValueError(f"k={k_max} exceeds the {train_features.shape[0]} training samples")
    correct1 = {k: 0 for k in ks}
    correct5 = {k: 0 for k in ks}
    for start in range(0, test_features.shape[0], query_block):
        queries = l2_normalize(_as_tensor(test_features[start : start + query_block], device))
        targets = test_y[start : start + queries.shape[0]].to(device)
        sims, idx = nearest_neighbours(train_features, queries, k_max, block_bytes)
        weights = neighbour_weights(sims, temperature)
        neighbour_labels = train_y[idx]
        for k in ks:
            scores = torch.zeros(queries.shape[0], classes, device=device)
            scores.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            top = rank_classes(scores)[:, : min(5, classes)]
            hits = top == targets[:, None]
            correct1[k] += int(hits[:, 0].sum())
            correct5[k] += int(hits.any(dim=1).sum())
    total = test_features.shape[0]
    return KnnResult(
        top1={k: 100.0 * correct1[k] / total for k in ks},
        top5={k: 100.0 * correct5[k] / total for k in ks},
    )
