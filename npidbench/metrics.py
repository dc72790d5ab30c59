"""Evaluation metrics shared by the benchmarks: VOC average precision, top-k accuracy."""

from __future__ import annotations

import numpy as np


def _ranked(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Columns sorted by decreasing score: hits, misses, cumulative counts, run ends of ties."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    labels = np.asarray(labels)
    labels = np.broadcast_to(labels[:, None] if labels.ndim == 1 else labels, scores.shape)
    order = np.argsort(-scores, axis=0, kind="stable")
    ranked = np.take_along_axis(scores, order, axis=0)
    hits = np.take_along_axis(labels == 1, order, axis=0)
    misses = np.take_along_axis(labels == -1, order, axis=0)
    tp, fp = np.cumsum(hits, axis=0), np.cumsum(misses, axis=0)
    # A threshold sits at the last row of each run of tied scores.
    run_end = np.ones_like(hits)
    run_end[:-1] = ranked[1:] != ranked[:-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(run_end & (tp + fp > 0), tp / np.maximum(tp + fp, 1), 0.0)
    return hits, run_end, precision


def average_precision_columns(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """sklearn's average_precision_score (no interpolation) of every column, vectorised.

    The anchors' cross-validation metric: Σ over thresholds of (recall step) x precision. Labels
    as in :func:`voc_ap_columns` (1 positive, -1 negative, 0 ignored). Equal to sklearn's value
    (tested); 1,140 separate calls per layer cost more than the solver's small costs.
    """
    hits, run_end, precision = _ranked(scores, labels)
    n = hits.shape[0]
    # Every hit counts at the precision of the end of its run of tied scores.
    end_index = np.where(run_end, np.arange(n)[:, None], n - 1)
    next_end = np.minimum.accumulate(end_index[::-1], axis=0)[::-1]
    at_end = np.take_along_axis(precision, next_end, axis=0)
    positives = hits.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(positives > 0, (hits * at_end).sum(axis=0) / positives, np.nan)


def voc_ap_columns(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """All-points VOC average precision of every column (PROTOCOLS.md "VOC07 SVM", test AP).

    ``scores`` (N, m); ``labels`` (N, m) or (N,) in VOC's convention: 1 present, -1 absent,
    0 difficult or left out (neither a hit nor a miss: removed). Precision is made monotone from
    the right and summed where recall changes; this is not the 11-point metric. Tied scores form
    one threshold (as sklearn's precision_recall_curve, which the anchors use in cross-validation).
    A column without positives gives NaN. Vectorised because low-shot scores ~15,000 columns.
    """
    hits, _, precision = _ranked(scores, labels)
    # Envelope: every hit counts at the best precision of any threshold at or below its rank,
    # and the first threshold at or below a hit is the end of its own run of ties.
    envelope = np.maximum.accumulate(precision[::-1], axis=0)[::-1]
    positives = hits.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(positives > 0, (hits * envelope).sum(axis=0) / positives, np.nan)


def voc_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """All-points VOC AP of one class: :func:`voc_ap_columns` of a single column."""
    return float(voc_ap_columns(np.asarray(scores)[:, None], np.asarray(labels)[:, None])[0])


def voc_map(scores: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    """Mean of voc_ap over classes (columns), x100, and the per-class APs x100."""
    aps = [float(ap) for ap in 100.0 * voc_ap_columns(scores, labels)]
    present = [ap for ap in aps if not np.isnan(ap)]
    return float(np.mean(present)) if present else float("nan"), aps
