"""VOC average precision on hand-made scores with exact values, and against sklearn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from npidbench.metrics import voc_ap, voc_map


def test_perfect_and_worst_rankings():
    assert voc_ap(np.array([0.9, 0.8, 0.1]), np.array([1, 1, -1])) == 1.0
    # Positive ranked last of 4: precision at its recall is 1/4.
    assert voc_ap(np.array([0.9, 0.8, 0.7, 0.1]), np.array([-1, -1, -1, 1])) == 0.25


def test_envelope_makes_precision_monotone():
    # ranks: +, -, +, -, + -> precisions at the hits 1, 2/3, 3/5; envelope keeps them (decreasing).
    scores = np.array([5, 4, 3, 2, 1], dtype=float)
    labels = np.array([1, -1, 1, -1, 1])
    assert voc_ap(scores, labels) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # ranks: -, +, + -> precisions 1/2, 2/3; the envelope lifts the first to 2/3.
    assert voc_ap(np.array([3.0, 2.0, 1.0]), np.array([-1, 1, 1])) == pytest.approx(2 / 3)


def test_difficult_images_are_removed():
    scores = np.array([0.9, 0.8, 0.7])
    assert voc_ap(scores, np.array([0, 1, -1])) == 1.0  # the difficult top score does not count
    assert np.isnan(voc_ap(scores, np.array([-1, 0, -1])))  # no positive at all


def test_ties_are_one_threshold():
    # two tied scores (one positive, one negative), then a positive: thresholds give (R, P) =
    # (1/2, 1/2) and (1, 2/3); the envelope lifts 1/2 to 2/3.
    assert voc_ap(np.array([1.0, 1.0, 0.5]), np.array([-1, 1, 1])) == pytest.approx(2 / 3)
    # broken ties would have given 1/2 * 1 + 1/2 * 2/3 in one order and something else in the other
    assert voc_ap(np.array([1.0, 0.99, 0.5]), np.array([1, -1, 1])) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert voc_ap(np.array([1.0, 1.0, 0.5]), np.array([1, -1, 1])) == voc_ap(
        np.array([1.0, 1.0, 0.5]), np.array([-1, 1, 1])
    )


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_sklearn_when_precision_is_monotone(seed):
    rng = np.random.default_rng(seed)
    scores = rng.permutation(40).astype(float)
    labels = np.where(scores > 25, 1, -1)  # every positive above every negative: monotone precision
    labels[rng.integers(40)] = 1
    order = np.argsort(-scores)
    hits = labels[order] == 1
    precision = np.cumsum(hits) / np.arange(1, 41)
    if np.all(np.diff(precision[hits]) <= 1e-12):
        assert voc_ap(scores, labels) == pytest.approx(average_precision_score(labels == 1, scores))
    # and in general the envelope can only raise it
    assert voc_ap(scores, labels) >= average_precision_score(labels == 1, scores) - 1e-12


def test_map_over_classes():
    scores = np.array([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]])
    labels = np.array([[1, -1], [-1, 1], [-1, 0]])
    mean, per_class = voc_map(scores, labels)
    assert per_class == [100.0, 100.0] and mean == 100.0


def test_column_average_precision_is_sklearns_with_ties():
    from npidbench.metrics import average_precision_columns

    rng = np.random.default_rng(11)
    for trial in range(20):
        n = int(rng.integers(5, 60))
        scores = rng.integers(0, 6, size=(n, 4)).astype(float) if trial % 2 else rng.normal(size=(n, 4))
        labels = rng.choice([1, -1], size=(n, 4))
        labels[0] = 1
        expected = [average_precision_score(labels[:, j] == 1, scores[:, j]) for j in range(4)]
        np.testing.assert_allclose(average_precision_columns(scores, labels), expected)
