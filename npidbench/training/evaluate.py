"""Top-1 / top-5 evaluation shared by the linear probes and semi-supervised fine-tuning.

Hits are counted per batch into float64 (exact for any split size), summed over torchrun's
processes, and reported as ``round(100 * hits / images, 3)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from npidbench.data.images import EvalTransform, normalize_batch
from npidbench.data.splits import DatasetSplit
from npidbench.distributed import DistInfo
from npidbench.precision import autocast
from npidbench.solvers.linear import topk_correct
from npidbench.training.batches import eval_batches
from npidbench.training.loop import all_reduce_sum

if TYPE_CHECKING:
    from npidbench.features import ExtractOptions

Outputs = Iterable[tuple[Iterable[torch.Tensor], torch.Tensor]]


@torch.no_grad()
def topk_accuracy(
    model: nn.Module, outputs: Outputs, names: Sequence[str], world: DistInfo
) -> dict[str, dict[str, float]]:
    """{name: {"top1", "top5"}} in % over all ranks' test images. ``outputs`` yields, per batch,
    the logits of each named output (in ``names`` order) and the labels; it is read with
    ``model`` in eval mode (BN statistics frozen), and ``model`` is back in train mode after."""
    device = torch.device(world.device)
    model.eval()
    hits = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for logits, labels in outputs:
        for i, out in enumerate(logits):
            found = topk_correct(out, labels, (1, 5))
            hits[i, 0] += found[1]
            hits[i, 1] += found[5]
        total += len(labels)
    all_reduce_sum(hits, world)
    all_reduce_sum(total, world)
    model.train()
    n = float(total.item())
    return {
        name: {"top1": round(100 * float(h[0]) / n, 3), "top5": round(100 * float(h[1]) / n, 3)}
        for name, h in zip(names, hits, strict=True)
    }


def forward_on(
    forward: Callable[[torch.Tensor], Any],
    split: DatasetSplit,
    transform: EvalTransform,
    world: DistInfo,
    extract: ExtractOptions,
    amp: bool,
    *,
    imagenet_norm: bool = True,
) -> Iterator[tuple[Any, torch.Tensor]]:
    """(``forward`` of a normalised batch without gradients, bf16 autocast with ``amp`` on CUDA;
    the labels on the device) for this rank's share of ``split`` under the test transform
    (``imagenet_norm=False``: pixels in [0, 1] without mean/std)."""
    device = torch.device(world.device)
    for uint8, labels in eval_batches(split, transform, world, extract.batch_size, extract.workers):
        with torch.no_grad(), autocast(device, amp):
            out = forward(normalize_batch(uint8.to(device), imagenet_norm=imagenet_norm))
        yield out, labels.to(device)
