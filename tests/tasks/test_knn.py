"""The NPID weighted kNN on hand-made tensors with exact expected scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from npidbench.solvers.knn import nearest_neighbours, rank_classes, weighted_knn


def test_weighted_vote_exact_scores():
    # Train points on the unit circle; the query at angle 0.
    angles = torch.tensor([0.1, 0.2, 0.3, 1.5, 3.0])
    train = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 1, 1, 0, 2])
    query = torch.tensor([[1.0, 0.0]])
    sims, idx = nearest_neighbours(train, query, k=3)
    assert idx.tolist() == [[0, 1, 2]]
    torch.testing.assert_close(sims[0], torch.cos(angles[:3]))
    # k=1: class 0 (weight exp(cos 0.1 / T)); k=3: class 1 has two neighbours.
    t = 0.07
    w = [math.exp(math.cos(a) / t) for a in (0.1, 0.2, 0.3)]
    assert w[1] + w[2] > w[0]  # so k=3 must vote class 1
    result = weighted_knn(train, labels, query, torch.tensor([1]), ks=(1, 3), temperature=t, num_classes=3)
    assert result.top1 == {1: 0.0, 3: 100.0}
    assert result.top5 == {1: 100.0, 3: 100.0}


def test_temperature_changes_the_vote():
    # Two close class-0 neighbours against one very close class-1 neighbour.
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    sharp = weighted_knn(train, labels, query, torch.tensor([1]), ks=(3,), temperature=0.05)
    flat = weighted_knn(train, labels, query, torch.tensor([1]), ks=(3,), temperature=10.0)
    # exp(1/0.05) = 4.85e8 > 2 exp(0.8/0.05) = 1.78e7: class 1 wins when sharp; loses when flat.
    assert sharp.top1[3] == 100.0
    assert flat.top1[3] == 0.0


def test_blocked_equals_dense_and_reads_memory_maps(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.standard_normal((1000, 16)).astype(np.float32)
    labels = rng.integers(0, 7, 1000)
    test = rng.standard_normal((130, 16)).astype(np.float32)
    test_labels = rng.integers(0, 7, 130)
    path = tmp_path / "train.npy"
    np.save(path, train)
    mapped = np.load(path, mmap_mode="r")
    dense = weighted_knn(torch.from_numpy(train), labels, test, test_labels, ks=(1, 10, 50), num_classes=7)
    blocked = weighted_knn(
        mapped,
        labels,
        test,
        test_labels,
        ks=(1, 10, 50),
        num_classes=7,
        query_block=17,
        block_bytes=17 * 4 * 33,
    )  # 33 train rows per block
    assert dense == blocked
    original = torch.from_numpy(train.copy())
    weighted_knn(original, labels, test, test_labels, ks=(1,), num_classes=7)
    np.testing.assert_array_equal(original.numpy(), train)  # the caller's features are not modified
    # Reference: brute force with numpy.
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    qn = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = qn @ tn.T
    correct = 0
    for i in range(len(test)):
        order = np.argsort(-sims[i])[:10]
        scores = np.zeros(7)
        np.add.at(scores, labels[order], np.exp(sims[i, order] / 0.07))
        correct += int(np.argmax(scores) == test_labels[i])
    assert dense.top1[10] == pytest.approx(100.0 * correct / len(test))


def test_k_larger_than_train_is_refused():
    with pytest.raises(ValueError, match="exceeds"):
        weighted_knn(
            torch.randn(5, 3),
            torch.zeros(5, dtype=torch.long),
            torch.randn(2, 3),
            torch.zeros(2, dtype=torch.long),
            ks=(10,),
        )


def test_small_temperature_does_not_overflow():
    train = torch.tensor([[1.0, 0.0], [0.999, 0.0447], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    query = torch.tensor([[1.0, 0.01]])
    result = weighted_knn(train, labels, query, torch.tensor([0]), ks=(3,), temperature=0.001)
    assert result.top1[3] == 100.0


def test_top5_ties_go_to_the_lower_class_index_as_lemniscates_sort():
    """k = 1: one class gets the vote, the other nine score 0; lemniscate's top-5 fills in the
    four lowest-numbered of them (torch's CPU sort keeps the lower index first)."""
    train = torch.eye(10)
    labels = torch.arange(10)
    queries = torch.eye(10)[[7, 7, 0]]  # nearest: class 7, 7, 0
    targets = torch.tensor([3, 4, 4])  # top-5 = [7, 0, 1, 2, 3], [7, 0, 1, 2, 3], [0, 1, 2, 3, 4]
    result = weighted_knn(train, labels, queries, targets, ks=(1,), num_classes=10)
    assert result.top5[1] == pytest.approx(200 / 3)  # the first and the third
    tied = torch.tensor([[0.0, 2.0, 2.0, 1.0, 2.0]])
    assert rank_classes(tied).tolist() == [[1, 2, 4, 3, 0]]


def _lemniscate_knn(train, train_y, test, test_y, k, t, classes):
    """lemniscate's kNN as its paper and code describe it, written out here: cosine similarities,
    the k largest, weights exp(s / T) summed per class through a one-hot matrix, classes ranked by
    a sort in which equal scores keep the lower class index first."""
    train = torch.nn.functional.normalize(train, dim=1)
    test = torch.nn.functional.normalize(test, dim=1)
    sims, idx = (test @ train.T).topk(k, dim=1)
    one_hot = torch.nn.functional.one_hot(train_y[idx], classes).float()
    probs = (one_hot * (sims / t).exp()[..., None]).sum(dim=1)
    top1 = top5 = 0
    for row, target in zip(probs.tolist(), test_y.tolist(), strict=True):
        order = sorted(range(classes), key=lambda c: (-row[c], c))
        top1 += order[0] == target
        top5 += target in order[:5]
    return 100.0 * top1 / len(test_y), 100.0 * top5 / len(test_y)


@pytest.mark.parametrize("case", range(40))
def test_equals_lemniscates_knn_on_random_cases(case):
    rng = np.random.default_rng(case)
    classes = int(rng.integers(2, 12))
    dim = int(rng.integers(2, 16))
    train = torch.from_numpy(rng.normal(size=(int(rng.integers(20, 120)), dim)).astype(np.float32))
    train_y = torch.from_numpy(rng.integers(0, classes, len(train)))
    if case % 3 == 0:  # duplicated images (same label): tied similarities and tied class scores
        train, train_y = torch.cat([train, train[::2]]), torch.cat([train_y, train_y[::2]])
    test = torch.from_numpy(rng.normal(size=(60, dim)).astype(np.float32))
    test_y = torch.from_numpy(rng.integers(0, classes, 60))
    ks = (1, 2, 5, min(20, len(train)))
    result = weighted_knn(train, train_y, test, test_y, ks=ks, temperature=0.07, num_classes=classes)
    for k in ks:
        assert (result.top1[k], result.top5[k]) == _lemniscate_knn(
            train, train_y, test, test_y, k, 0.07, classes
        ), k
