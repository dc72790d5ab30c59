"""NPID's pieces (Wu et al. 2018; lemniscate, mmselfsup): embedding model, memory bank, noise
draws and the two losses. Pure tensors in, tensors out; the training loop is in train.py.

Scoring without a B x K x 128 copy: mmselfsup gathers a (B, K, 128) negatives tensor (about 1 GB
per GPU at B = 32, K = 65,536; PROTOCOLS.md). Here the dot products of the batch with the whole
bank are one dense matrix product (B x N), from which the B x (K + 1) scores are gathered; the
backward pass scatters the score gradients back into a B x N matrix and multiplies by the bank.
Its cost does not depend on K (it is about 3% of a ResNet-50 step at N = 1.28M).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NCE_EPS = 1e-7  # lemniscate's NCECriterion


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 (autocast outputs) up to float32; float32 and float64 unchanged (the exactness
    checks train in float64)."""
    return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor


class EmbeddingModel(nn.Module):
    """Backbone -> global average pool -> Linear(., dim) -> L2 normalise (NPID's network)."""

    def __init__(self, backbone: nn.Module, in_features: int, dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(in_features, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(at_least_fp32(self.head(self.backbone(images))), dim=1)


class MemoryBank(nn.Module):
    """N x dim normalised features, one per training image, kept as a module buffer."""

    def __init__(
        self,
        size: int,
        dim: int = 128,
        init: str = "lemniscate",
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if init == "lemniscate":  # uniform in +-1/sqrt(dim/3), not normalised
            bound = 1.0 / math.sqrt(dim / 3)
            bank = torch.rand(size, dim, generator=generator, dtype=dtype) * 2 * bound - bound
        elif init == "mmselfsup":  # randn, then L2-normalised
            bank = F.normalize(torch.randn(size, dim, generator=generator, dtype=dtype), dim=1)
        else:
            raise ValueError(f"bank_init must be lemniscate or mmselfsup, got {init!r}")
        self.register_buffer("bank", bank)

    @torch.no_grad()
    def update(self, indices: torch.Tensor, features: torch.Tensor, momentum: float = 0.5) -> None:
        """bank[i] = normalise(m * bank[i] + (1 - m) * f_i) (lemniscate; at m = 0.5 mmselfsup agrees)."""
        mixed = self.bank[indices] * momentum + features.detach().to(self.bank.dtype) * (1 - momentum)
        self.bank.index_copy_(0, indices, F.normalize(mixed, dim=1))


def draw_noise(
    global_batch: int, negatives: int, bank_size: int, seed: int, step: int, device: torch.device
) -> torch.Tensor:
    """K noise indices per sample, uniform over the bank (the positive may be drawn), for the
    whole global batch: every rank draws the same matrix from (seed, step) and takes its rows,
    so the draws do not depend on the number of processes and resume exactly. On CPU numpy's
    PCG64 draws them (3x faster than torch's generator at K = 65,536); on GPU torch does."""
    mixed = (seed * 1_000_003 + step) % (2**63)
    if device.type == "cpu":
        rng = np.random.Generator(np.random.PCG64(mixed))
        return torch.from_numpy(rng.integers(0, bank_size, (global_batch, negatives), dtype=np.int64))
    generator = torch.Generator(device=device)
    generator.manual_seed(mixed)
    return torch.randint(bank_size, (global_batch, negatives), generator=generator, device=device)


class _BankScores(torch.autograd.Function):
    """scores[b, j] = features[b] . bank[indices[b, j]] via one dense product.

    Measured on CPU (B = 128, N = 50,000): with few scores per row (K + 1 <= N / 8) the product
    laid out N x B and read with take(), and gradients summed by embedding_bag, are fastest;
    with many, the B x N product with gather() and a scattered B x N gradient are."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(bank, indices)
        if _sparse(indices, bank):
            rows = torch.arange(features.shape[0], device=indices.device)[:, None]
            return torch.take(bank @ features.t(), indices * features.shape[0] + rows)
        return (features @ bank.t()).gather(1, indices)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        bank, indices = ctx.saved_tensors
        if _sparse(indices, bank):  # sum the weighted bank rows directly (no B x N matrix)
            return (
                F.embedding_bag(indices, bank, per_sample_weights=grad.to(bank.dtype), mode="sum"),
                None,
                None,
            )
        dense = torch.zeros(grad.shape[0], bank.shape[0], dtype=grad.dtype, device=grad.device)
        dense.scatter_add_(1, indices, grad)  # repeated indices accumulate, as they should
        return dense @ bank, None, None


def _sparse(indices: torch.Tensor, bank: torch.Tensor) -> bool:
    return indices.shape[1] * 8 <= bank.shape[0]


def bank_scores(
    features: torch.Tensor, bank: torch.Tensor, positives: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """(B, 1 + K) dot products: column 0 with each sample's own bank entry, then its K noise
    entries. Gradients flow to ``features`` only (the bank is not a parameter)."""
    indices = torch.cat([positives[:, None], noise], dim=1)
    return _BankScores.apply(features.to(bank.dtype), bank, indices)


def estimate_z(scores: torch.Tensor, temperature: float, bank_size: int) -> torch.Tensor:
    """NCE's normalising constant, once on the first batch: mean(exp(s / T)) * N (lemniscate:
    over the batch's positive and noise scores). Summed over ranks by the caller when distributed."""
    return torch.exp(scores.detach().double() / temperature).mean() * bank_size


def nce_loss(scores: torch.Tensor, z: torch.Tensor, temperature: float, bank_size: int) -> torch.Tensor:
    """NCE (Wu et al. 2018; lemniscate's NCECriterion), with P(i|v) = exp(s / T) / Z and noise
    P_n = 1 / N, in log space (the probabilities themselves span 1e-7 .. 1e6):

        -(1/B) sum_b [ log(P_pos / (P_pos + K P_n + eps)) + sum_k log(K P_n / (P_neg,k + K P_n + eps)) ]
    """
    k = scores.shape[1] - 1
    scores = at_least_fp32(scores)
    log_z = torch.log(z).to(scores.dtype)
    mass = k / bank_size + NCE_EPS  # K P_n + eps
    p = torch.exp(scores / temperature - log_z)  # at most ~e^18 here: float32 is ample
    positive = scores[:, 0] / temperature - log_z - torch.log(p[:, 0] + mass)
    negative = math.log(k / bank_size) - torch.log(p[:, 1:] + mass)
    return -(positive.sum() + negative.sum()) / scores.shape[0]


def softmax_loss(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy over [positive, K negatives] / T, the positive at index 0 (mmselfsup)."""
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores / temperature, target)
