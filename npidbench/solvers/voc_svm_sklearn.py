"""The ``sklearn`` solver of the VOC07 SVM protocols: the anchors' procedure, for side-by-side runs.

One liblinear LinearSVC (dual, L2 penalty, squared hinge) per class x cost x fold, 3-fold
stratified cross-validation with sklearn's average precision, in ``jobs`` processes. The protocol
itself (cost lists, fold splits, AP, low-shot draws) and the batched solver live in
:mod:`npidbench.solvers.voc_svm`, which dispatches here for ``solver="sklearn"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from npidbench.solvers.voc_svm import POSITIVE_WEIGHT, FullProblem, binary_labels, normalise

MAX_ITER = 2000  # the anchors' liblinear iteration limit


def linear_svc(cost: float) -> Any:
    from sklearn.svm import LinearSVC

    # The anchors' parameters (PROTOCOLS.md): liblinear dual, L2 penalty, squared hinge.
    return LinearSVC(
        C=cost,
        class_weight={1: POSITIVE_WEIGHT, -1: 1},
        intercept_scaling=1.0,
        penalty="l2",
        loss="squared_hinge",
        tol=1e-4,
        dual=True,
        max_iter=MAX_ITER,
    )


@contextmanager
def _quiet_liblinear() -> Iterator[None]:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # liblinear often stops at max_iter
        yield


def _full_one(
    x: np.ndarray, y: np.ndarray, test_x: np.ndarray, cost: float, folds: int
) -> tuple[float, np.ndarray, list[int]]:
    """One (class, cost) the anchors' way: cross-validated AP, then the refit on all trainval."""
    from sklearn.model_selection import StratifiedKFold, cross_validate

    with _quiet_liblinear():
        cv = cross_validate(
            linear_svc(cost),
            x,
            y,
            cv=StratifiedKFold(n_splits=folds),
            scoring="average_precision",
            return_estimator=True,
        )
        model = linear_svc(cost).fit(x, y)
    iterations = [int(e.n_iter_) for e in cv["estimator"]] + [int(model.n_iter_)]
    return float(np.mean(cv["test_score"])), model.decision_function(test_x), iterations


def full_sklearn(problem: FullProblem, jobs: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """CV AP (classes, costs), test scores (N_test, classes, costs) and liblinear's counts."""
    from joblib import Parallel, delayed

    labels, costs, folds, classes = problem.train_labels, problem.costs, problem.folds, problem.classes
    x = normalise(problem.train_x).numpy()
    test = normalise(problem.test_x).numpy()
    pairs = [(i, j) for i in range(len(classes)) for j in range(len(costs))]
    outputs = Parallel(n_jobs=jobs)(
        delayed(_full_one)(x, binary_labels(labels[:, classes[i]]), test, float(costs[j]), folds)
        for i, j in pairs
    )
    cv_ap = np.zeros((len(classes), len(costs)))
    test_scores = np.zeros((test.shape[0], len(classes), len(costs)))
    iterations = np.zeros((len(classes), len(costs), folds + 1), dtype=int)
    for (i, j), (ap, scores, its) in zip(pairs, outputs, strict=True):
        cv_ap[i, j] = ap
        test_scores[:, i, j] = scores
        iterations[i, j] = its
    stats = {
        "liblinear_iterations_by_cost": iterations.sum(axis=(0, 2)).tolist(),
        "liblinear_max_iter_hits": int((iterations >= MAX_ITER).sum()),
        "fits": int(iterations.size),
    }
    return cv_ap, test_scores, stats


def _lowshot_one(
    x: np.ndarray,
    test: np.ndarray,
    subset: np.ndarray,
    y: np.ndarray,
    costs: Sequence[float],
    want_train: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    test_scores = np.zeros((test.shape[0], len(costs)))
    train_scores = np.zeros((x.shape[0], len(costs))) if want_train else None
    with _quiet_liblinear():
        for j, cost in enumerate(costs):
            model = linear_svc(float(cost)).fit(x[subset], y)
            test_scores[:, j] = model.decision_function(test)
            if train_scores is not None:
                train_scores[:, j] = model.decision_function(x)
    return test_scores, train_scores


def lowshot_sklearn(
    x: np.ndarray,
    test: np.ndarray,
    subsets: np.ndarray,
    owner: np.ndarray,
    train_labels: np.ndarray,
    costs: Sequence[float],
    want_train: bool,
    jobs: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The anchors' low-shot: one LinearSVC per (subset, cost) on normalised features ``x``."""
    from joblib import Parallel, delayed

    outputs = Parallel(n_jobs=jobs)(
        delayed(_lowshot_one)(x, test, sub, binary_labels(train_labels[sub, c]), costs, want_train)
        for sub, c in zip(subsets, owner, strict=True)
    )
    test_scores = np.stack([o[0] for o in outputs], axis=1)
    train_scores = np.stack([o[1] for o in outputs], axis=1) if want_train else None
    return test_scores, train_scores
