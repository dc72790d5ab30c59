"""NPID's numerical core on tiny tensors with hand-computed values."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from npidbench.pretrain.npid import (
    NCE_EPS,
    MemoryBank,
    bank_scores,
    draw_noise,
    estimate_z,
    nce_loss,
    softmax_loss,
)


def test_nce_loss_matches_hand_computation():
    scores = torch.tensor([[0.5, 0.1, -0.2]])  # positive, then K = 2 noise scores
    n, t, z = 4, 1.0, torch.tensor(1.0)
    p = [math.exp(s) for s in (0.5, 0.1, -0.2)]  # P = exp(s / T) / Z
    k_pn = 2 / 4
    expected = -(
        math.log(p[0] / (p[0] + k_pn + NCE_EPS))
        + math.log(k_pn / (p[1] + k_pn + NCE_EPS))
        + math.log(k_pn / (p[2] + k_pn + NCE_EPS))
    )
    assert abs(nce_loss(scores, z, t, n).item() - expected) < 1e-6 * abs(expected)


def test_nce_loss_with_temperature_and_z_and_batch_mean():
    scores = torch.tensor([[0.9, 0.2], [0.3, -0.4]])
    n, t, z = 10, 0.5, torch.tensor(3.0)
    total = 0.0
    for row in scores.tolist():
        p = [math.exp(s / t) / 3.0 for s in row]
        total += math.log(p[0] / (p[0] + 0.1 + NCE_EPS)) + math.log(0.1 / (p[1] + 0.1 + NCE_EPS))
    assert abs(nce_loss(scores, z, t, n).item() - (-total / 2)) < 1e-6


def test_softmax_loss_is_cross_entropy_on_the_positive():
    scores = torch.tensor([[0.7, 0.1, 0.3]])
    expected = -math.log(math.exp(7.0) / (math.exp(7.0) + math.exp(1.0) + math.exp(3.0)))
    assert abs(softmax_loss(scores, 0.1).item() - expected) < 1e-5


def test_z_is_mean_exp_times_bank_size():
    scores = torch.tensor([[0.0, 0.07], [0.14, -0.07]])
    expected = (1 + math.e + math.e**2 + math.exp(-1)) / 4 * 100
    assert abs(estimate_z(scores, 0.07, 100).item() - expected) < 1e-6 * expected  # float32 scores


def test_bank_scores_values_and_gradient():
    torch.manual_seed(0)
    features = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(6, 4, dtype=torch.float64)
    positives = torch.tensor([0, 5, 2])
    noise = torch.tensor([[1, 1], [4, 0], [2, 3]])  # repeated index and a positive drawn as noise
    scores = bank_scores(features, bank, positives, noise)
    manual = torch.stack(
        [
            torch.stack([features[b] @ bank[j] for j in [positives[b].item(), *noise[b].tolist()]])
            for b in range(3)
        ]
    )
    torch.testing.assert_close(scores, manual)

    def via_gather(f):
        idx = torch.cat([positives[:, None], noise], 1)
        return torch.einsum("bd,bkd->bk", f, bank[idx])

    weights = torch.randn(3, 3, dtype=torch.float64)
    (grad,) = torch.autograd.grad(
        (_BankScores_double(features, bank, positives, noise) * weights).sum(), features
    )
    (expected,) = torch.autograd.grad((via_gather(features) * weights).sum(), features)
    torch.testing.assert_close(grad, expected)


def _BankScores_double(features, bank, positives, noise):
    from npidbench.pretrain.npid import _BankScores

    return _BankScores.apply(features, bank, torch.cat([positives[:, None], noise], 1))


def test_bank_update_momentum_and_normalisation():
    bank = MemoryBank(4, dim=2, init="mmselfsup", generator=torch.Generator().manual_seed(0))
    before = bank.bank.clone()
    features = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    bank.update(torch.tensor([3, 1]), features, momentum=0.5)
    expected3 = F.normalize(0.5 * before[3] + 0.5 * features[0], dim=0)
    torch.testing.assert_close(bank.bank[3], expected3)
    torch.testing.assert_close(bank.bank[1], F.normalize(0.5 * before[1] + 0.5 * features[1], dim=0))
    torch.testing.assert_close(bank.bank[[0, 2]], before[[0, 2]])


def test_bank_initialisations():
    lem = MemoryBank(1000, 128, "lemniscate", torch.Generator().manual_seed(0)).bank
    bound = 1 / math.sqrt(128 / 3)
    assert lem.abs().max() <= bound and lem.abs().max() > 0.9 * bound
    mms = MemoryBank(10, 128, "mmselfsup", torch.Generator().manual_seed(0)).bank
    torch.testing.assert_close(mms.norm(dim=1), torch.ones(10))


def test_noise_is_reproducible_and_independent_of_process_count():
    full = draw_noise(8, 5, 100, seed=3, step=7, device=torch.device("cpu"))
    assert torch.equal(full, draw_noise(8, 5, 100, seed=3, step=7, device=torch.device("cpu")))
    assert not torch.equal(full, draw_noise(8, 5, 100, seed=3, step=8, device=torch.device("cpu")))
    assert full.min() >= 0 and full.max() < 100


def test_sparse_and_dense_score_paths_agree():
    torch.manual_seed(1)
    features = torch.randn(4, 8, requires_grad=True)
    bank = torch.randn(400, 8)
    positives = torch.randint(400, (4,))
    few = torch.randint(400, (4, 9))  # (1 + 9) * 8 <= 400: the sparse path
    many = torch.cat([few, torch.randint(400, (4, 60))], 1)  # the dense path
    weights = torch.randn(4, 70)
    for noise in (few, many):
        idx = torch.cat([positives[:, None], noise], 1)
        expected = torch.einsum("bd,bkd->bk", features, bank[idx])
        scores = bank_scores(features, bank, positives, noise)
        torch.testing.assert_close(scores, expected)
        (grad,) = torch.autograd.grad((scores * weights[:, : idx.shape[1]]).sum(), features)
        (ref,) = torch.autograd.grad((expected * weights[:, : idx.shape[1]]).sum(), features)
        torch.testing.assert_close(grad, ref)
