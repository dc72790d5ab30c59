"""The VOC07 SVM and low-shot SVM protocols on arrays (PROTOCOLS.md "VOC07 SVM", "low-shot").

Arrays in, numbers out: features (N, D) and label matrices in VOC's convention (1 present,
-1 absent, 0 difficult). Two solvers give the same protocol:

- ``batched`` (default): every (class, cost, fold) problem as one column of
  :func:`npidbench.solvers.svm.solve_cost_path`, on CPU or GPU.
- ``sklearn``: the anchors' procedure, one LinearSVC per class and cost, 3-fold stratified
  cross-validation with sklearn's average precision, for reproducing the old way side by side.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from npidbench.metrics import average_precision_columns, voc_ap_columns
from npidbench.solvers.svm import eigen_embedding, gram_matrix, solve_cost_path

# User cost lists (PROTOCOLS.md): MMS is the default; FAIR and MMS append 0.5^n, n = 4..19.
USER_COSTS: dict[str, list[float]] = {
    "mms": [1.0, 10.0, 100.0],
    "fair": [10.0**e for e in range(-7, 3)],  # 1e-7 .. 100 in decades
    "vissl": [0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0],
}
LOWSHOT_KS = (1, 2, 4, 8, 16, 32, 64, 96)
POSITIVE_WEIGHT = 2.0  # class_weight {1: 2, -1: 1} of the anchors
NEGATIVES_PER_POSITIVE = 19  # low-shot: k positives, 19k negatives per class
CHUNK_BYTES = 256e6  # low-shot: Gram blocks of one batch of equal-size problems


def cost_list(name: str) -> list[float]:
    """The full cost list in the anchors' order (their argmax breaks ties by this order)."""
    if name not in USER_COSTS:
        raise ValueError(f"unknown cost list {name!r}; choose one of {', '.join(USER_COSTS)}")
    powers = [] if name == "vissl" else [0.5**n for n in range(4, 20)]
    return USER_COSTS[name] + powers


def normalise(features: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """f / (||f|| + 1e-5) in float64, as the anchors do."""
    if isinstance(features, torch.Tensor):
        x = features.to(device=device, dtype=torch.float64)
    else:  # one float64 copy, also of a read-only memory map
        x = torch.from_numpy(np.array(features, dtype=np.float64)).to(device)
    return x / (x.norm(dim=1, keepdim=True) + 1e-5)


def binary_labels(labels: np.ndarray) -> np.ndarray:
    """Training labels: present -> +1; absent and difficult -> -1 (difficult count as negatives)."""
    return np.where(np.asarray(labels) == 1, 1.0, -1.0)


def class_weights(y: np.ndarray) -> np.ndarray:
    return np.where(y > 0, POSITIVE_WEIGHT, 1.0)


def stratified_folds(y: np.ndarray, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The anchors' split: sklearn's StratifiedKFold without shuffling (cross_val_score, cv=3)."""
    from sklearn.model_selection import StratifiedKFold

    return list(StratifiedKFold(n_splits=folds).split(np.zeros(len(y)), y))


@dataclass
class TrainKernel:
    """What the solvers build from trainval once: normalised features, Gram matrix, eigenbasis.
    voc-svm hands the best layer's to low-shot instead of building it again (~20 s on VOC07)."""

    x: torch.Tensor  # (N, D) float64, L2-normalised
    gram: torch.Tensor  # (N, N) float64, X Xᵀ + 1
    z: torch.Tensor | None = None  # eigen-embedding, when already computed


@dataclass
class LayerResult:
    """The full SVM of one layer: test mAP at the cost chosen per class by cross-validation."""

    map: float
    ap: list[float]  # per class, x100, at the chosen cost
    chosen_costs: list[float]
    cv_ap: np.ndarray  # (classes, costs) mean cross-validated AP
    test_ap: np.ndarray  # (classes, costs) test AP x100 of the refit at every cost
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)
    kernel: TrainKernel | None = None  # kept when asked for (keep_kernel=True)

    def summary(self) -> dict[str, Any]:
        return {
            "mAP": round(self.map, 4),
            "ap": [round(a, 4) for a in self.ap],
            "costs": self.chosen_costs,
            "cv_map": round(100 * float(np.mean(self.cv_ap.max(axis=1))), 4),
            # per class, per cost of the list: what the choice was made on, and the test AP
            "cv_ap_by_cost": np.round(100 * self.cv_ap, 4).tolist(),
            "test_ap_by_cost": np.round(self.test_ap, 4).tolist(),
            "seconds": round(self.seconds, 2),
            **self.stats,
        }


def choose(values: np.ndarray) -> np.ndarray:
    """Index of the best value along the last axis; ties to the first in list order (np.argmax)."""
    return np.argmax(values, axis=-1)


def full_svm(
    train_x: np.ndarray,
    train_labels: np.ndarray,
    test_x: np.ndarray,
    test_labels: np.ndarray,
    costs: Sequence[float],
    *,
    solver: str = "batched",
    folds: int = 3,
    classes: Sequence[int] | None = None,
    device: str = "cpu",
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
    keep_kernel: bool = False,
) -> LayerResult:
    """VOC07 SVM of one layer: per class, the cost of best mean CV AP; test AP of its refit."""
    classes = list(range(train_labels.shape[1])) if classes is None else list(classes)
    started = time.perf_counter()
    kernel = None
    if solver == "batched":
        cv_ap, test_scores, stats, kernel = _full_batched(
            train_x, train_labels, test_x, costs, folds, classes, device, progress
        )
    elif solver == "sklearn":
        cv_ap, test_scores, stats = _full_sklearn(train_x, train_labels, test_x, costs, folds, classes, jobs)
    else:
        raise ValueError(f"unknown solver {solver!r}; choose batched or sklearn")
    # test_scores: (N_test, classes, costs)
    n_test = test_scores.shape[0]
    labels = np.repeat(test_labels[:, classes], len(costs), axis=1)
    test_ap = 100 * voc_ap_columns(test_scores.reshape(n_test, -1), labels).reshape(len(classes), len(costs))
    best = choose(cv_ap)
    ap = [float(test_ap[i, j]) for i, j in enumerate(best)]
    return LayerResult(
        map=float(np.nanmean(ap)),
        ap=ap,
        chosen_costs=[float(costs[j]) for j in best],
        cv_ap=cv_ap,
        test_ap=test_ap,
        seconds=time.perf_counter() - started,
        stats=stats,
        kernel=kernel if keep_kernel else None,
    )


def _full_batched(
    train_x: np.ndarray,
    train_labels: np.ndarray,
    test_x: np.ndarray,
    costs: Sequence[float],
    folds: int,
    classes: list[int],
    device: str,
    progress: Callable[[str], None] | None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], TrainKernel]:
    x = normalise(train_x, device)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    gram = gram_matrix(x)
    z = eigen_embedding(gram.unsqueeze(0), _solver_dtype(device))
    timings["gram_eigh_s"] = time.perf_counter() - t
    # Columns: per class, the folds' training parts, then the refit on all of trainval.
    n = x.shape[0]
    ys, weights, held_out = [], [], []
    for c in classes:
        y = binary_labels(train_labels[:, c])
        w = class_weights(y)
        for train_idx, val_idx in stratified_folds(y, folds):
            mask = np.zeros(n)
            mask[train_idx] = 1
            ys.append(y)
            weights.append(w * mask)
            held_out.append(val_idx)
        ys.append(y)
        weights.append(w)
    per_class = folds + 1
    # Each fold column is scored on its held-out rows only (labels 0 elsewhere: ignored).
    held_out_labels = np.zeros((n, len(ys)), dtype=np.int8)
    fold_cols = [i * per_class + f for i in range(len(classes)) for f in range(folds)]
    for col, val in zip(fold_cols, held_out, strict=True):
        held_out_labels[val, col] = ys[col][val]
    labels_t = torch.tensor(np.stack(ys, 1), device=device).unsqueeze(0)
    weights_t = torch.tensor(np.stack(weights, 1), device=device).unsqueeze(0)
    t = time.perf_counter()
    done = 0

    def report(solution: Any) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(f"cost {done}/{len(costs)} (C={solution.cost:g})")

    solutions = solve_cost_path(z, labels_t, weights_t, costs, on_cost=report)
    timings["solve_s"] = time.perf_counter() - t
    t = time.perf_counter()
    test = normalise(test_x, device)
    cv_ap = np.zeros((len(classes), len(costs)))
    test_scores = np.zeros((test.shape[0], len(classes), len(costs)))
    refit_cols = [i * per_class + folds for i in range(len(classes))]
    for j, solution in enumerate(solutions):
        beta = solution.beta[0]  # (N, columns)
        trainval_scores = (gram @ beta).cpu().numpy()  # held-out rows give the CV scores
        cv_ap[:, j] = (
            average_precision_columns(trainval_scores, held_out_labels)[fold_cols].reshape(-1, folds).mean(1)
        )
        refit = beta[:, refit_cols]  # w = X̃ᵀ β: weights Xᵀ β and bias Σ β
        test_scores[:, :, j] = (test @ (x.T @ refit) + refit.sum(0)).cpu().numpy()
    timings["score_s"] = time.perf_counter() - t
    stats = {
        "newton_steps": [s.newton_steps for s in solutions],
        "cg_iterations": [s.cg_iterations for s in solutions],
        "unconverged": sum(s.unconverged for s in solutions),
        **{k: round(v, 2) for k, v in timings.items()},
    }
    return cv_ap, test_scores, stats, TrainKernel(x, gram, z[0])


def _solver_dtype(device: str | torch.device) -> torch.dtype:
    """float32 products for the Newton/CG iterations (objective within ~1e-8 of float64 runs on
    VOC07; twice as fast on a CPU); the Gram matrix and its eigendecomposition stay float64."""
    return torch.float32


def _linear_svc(cost: float) -> Any:
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
        max_iter=2000,
    )


def _sklearn_one(
    x: np.ndarray, y: np.ndarray, test_x: np.ndarray, cost: float, folds: int
) -> tuple[float, np.ndarray, list[int]]:
    """One (class, cost) the anchors' way: cross-validated AP, then the refit on all trainval."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold, cross_validate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # liblinear often stops at max_iter
        cv = cross_validate(
            _linear_svc(cost),
            x,
            y,
            cv=StratifiedKFold(n_splits=folds),
            scoring="average_precision",
            return_estimator=True,
        )
        model = _linear_svc(cost).fit(x, y)
    iterations = [int(e.n_iter_) for e in cv["estimator"]] + [int(model.n_iter_)]
    return float(np.mean(cv["test_score"])), model.decision_function(test_x), iterations


def _full_sklearn(
    train_x: np.ndarray,
    train_labels: np.ndarray,
    test_x: np.ndarray,
    costs: Sequence[float],
    folds: int,
    classes: list[int],
    jobs: int,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    from joblib import Parallel, delayed

    x = normalise(train_x).numpy()
    test = normalise(test_x).numpy()
    pairs = [(i, j) for i in range(len(classes)) for j in range(len(costs))]
    outputs = Parallel(n_jobs=jobs)(
        delayed(_sklearn_one)(x, binary_labels(train_labels[:, classes[i]]), test, float(costs[j]), folds)
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
        "liblinear_max_iter_hits": int((iterations >= 2000).sum()),
        "fits": int(iterations.size),
    }
    return cv_ap, test_scores, stats


# ---------------------------------------------------------------------------------------------
# Low-shot


@dataclass
class LowShotResult:
    """Per k: mAP of every sample at every cost; the cost chosen; mean/min/max/std there."""

    layer: str
    ks: list[int]
    costs: list[float]
    maps: np.ndarray  # (k, samples, costs) test mAP x100
    selection_maps: np.ndarray  # (k, samples, costs) what the cost is chosen on
    selection: str
    seed: int
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for a, k in enumerate(self.ks):
            best = int(choose(self.selection_maps[a].mean(axis=0)))
            at = self.maps[a, :, best]
            out[str(k)] = {
                "mean": round(float(at.mean()), 4),
                "min": round(float(at.min()), 4),
                "max": round(float(at.max()), 4),
                "std": round(float(at.std()), 4),  # over the samples, ddof 0 as np.std
                "cost": self.costs[best],
                "samples": [round(float(v), 4) for v in at],
            }
        return out


def draw_lowshot(
    train_labels: np.ndarray, k: int, sample: int, seed: int, classes: Sequence[int]
) -> list[np.ndarray]:
    """Per class: k positives (present) then 19k negatives (absent), difficult never drawn.

    Seeded per (seed, k, sample) so any one draw can be reproduced on its own.
    """
    rng = np.random.default_rng([seed, k, sample])
    subsets = []
    for c in classes:
        present = np.flatnonzero(train_labels[:, c] == 1)
        absent = np.flatnonzero(train_labels[:, c] == -1)
        negatives = NEGATIVES_PER_POSITIVE * k
        if len(present) < k or len(absent) < negatives:
            raise ValueError(
                f"low-shot k={k} needs {k} positives and {negatives} negatives of class {c}; "
                f"trainval has {len(present)} and {len(absent)}"
            )
        pos = rng.choice(present, size=k, replace=False)
        neg = rng.choice(absent, size=negatives, replace=False)
        subsets.append(np.concatenate([pos, neg]))
    return subsets


def lowshot_svm(
    train_x: np.ndarray,
    train_labels: np.ndarray,
    test_x: np.ndarray,
    test_labels: np.ndarray,
    costs: Sequence[float],
    *,
    layer: str,
    ks: Sequence[int] = LOWSHOT_KS,
    samples: int = 5,
    seed: int = 0,
    selection: str = "test",
    solver: str = "batched",
    classes: Sequence[int] | None = None,
    device: str = "cpu",
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
    kernel: TrainKernel | None = None,
) -> LowShotResult:
    """Low-shot SVM: for each k and sample, one SVM per class and cost on k positives and 19k
    negatives, tested on the full test set (difficult removed). ``selection="test"`` picks the
    cost per k on the test mAP (the published, test-selected protocol); ``"heldout"`` picks it on
    the trainval images not drawn for the class."""
    classes = list(range(train_labels.shape[1])) if classes is None else list(classes)
    started = time.perf_counter()
    if kernel is None:
        x = normalise(train_x, device)
        kernel = TrainKernel(x, gram_matrix(x))
    x, gram = kernel.x, kernel.gram
    test = normalise(test_x, device)
    cross = gram_matrix(test, x)  # test x trainval kernel: scores of test images from β
    embedding: list[torch.Tensor] = [] if kernel.z is None else [kernel.z.unsqueeze(0)]

    def basis() -> torch.Tensor:
        """The trainval eigenbasis, computed once when a large k first needs it."""
        if not embedding:
            embedding.append(eigen_embedding(gram.unsqueeze(0), _solver_dtype(device)))
        return embedding[0]

    shape = (len(ks), samples, len(costs))
    maps, heldout_maps = np.zeros(shape), np.zeros(shape)
    stats: dict[str, Any] = {"newton_steps": {}, "cg_iterations": {}}
    for a, k in enumerate(ks):
        draws = [draw_lowshot(train_labels, k, s, seed, classes) for s in range(samples)]
        subsets = np.stack([sub for draw in draws for sub in draw])  # (samples*classes, 20k)
        owner = np.array([c for _ in range(samples) for c in classes])
        want_train = selection == "heldout"
        if solver == "batched":
            test_scores, train_scores, newton, cg = _lowshot_batched(
                gram, basis, cross, subsets, owner, train_labels, costs, want_train, device
            )
            stats["newton_steps"][str(k)], stats["cg_iterations"][str(k)] = newton, cg
        elif solver == "sklearn":
            test_scores, train_scores = _lowshot_sklearn(
                x.cpu().numpy(), test.cpu().numpy(), subsets, owner, train_labels, costs, want_train, jobs
            )
        else:
            raise ValueError(f"unknown solver {solver!r}; choose batched or sklearn")
        # scores: (images, problems, costs); one AP per column
        labels = np.repeat(test_labels[:, owner], len(costs), axis=1)
        ap = voc_ap_columns(test_scores.reshape(test_scores.shape[0], -1), labels)
        maps[a] = 100 * ap.reshape(samples, len(classes), len(costs)).mean(axis=1)
        if train_scores is not None:
            held = train_labels[:, owner].copy()
            for p, sub in enumerate(subsets):
                held[sub, p] = 0  # the drawn images are not held out
            held = np.repeat(held, len(costs), axis=1)
            hap = voc_ap_columns(train_scores.reshape(train_scores.shape[0], -1), held)
            heldout_maps[a] = 100 * hap.reshape(samples, len(classes), len(costs)).mean(axis=1)
        if progress is not None:
            progress(f"low-shot k={k}")
    return LowShotResult(
        layer=layer,
        ks=list(ks),
        costs=[float(c) for c in costs],
        maps=maps,
        selection_maps=maps if selection == "test" else heldout_maps,
        selection=selection,
        seed=seed,
        seconds=time.perf_counter() - started,
        stats=stats,
    )


def _lowshot_batched(
    gram: torch.Tensor,
    basis: Callable[[], torch.Tensor],
    cross: torch.Tensor,
    subsets: np.ndarray,
    owner: np.ndarray,
    train_labels: np.ndarray,
    costs: Sequence[float],
    want_train: bool,
    device: str,
) -> tuple[np.ndarray, np.ndarray | None, list[int], list[int]]:
    """Every (sample, class) subset of one k, solved as a batch. Scores of test (and trainval)
    images come from the dual coefficients: K_other,subset β.

    Small subsets get their own Gram block and eigenbasis (batches of equal-size problems, in
    chunks that keep the blocks near 256 MB). From a quarter of trainval up, eigendecomposing
    every block costs more than solving all subsets as masked columns of the trainval basis
    (measured at k = 64/96 on VOC07: eigh alone took 51 s of 123 s), so they share that one."""
    problems, size = subsets.shape
    n = gram.shape[0]
    if 4 * size > n:
        return _lowshot_shared_basis(gram, basis, cross, subsets, owner, train_labels, costs, want_train)
    chunk = max(1, int(CHUNK_BYTES // (8 * size * size)))
    test_scores = np.zeros((cross.shape[0], problems, len(costs)))
    train_scores = np.zeros((gram.shape[0], problems, len(costs))) if want_train else None
    newton = [0] * len(costs)
    cg = [0] * len(costs)
    for start in range(0, problems, chunk):
        part = subsets[start : start + chunk]
        idx = torch.as_tensor(part, device=gram.device)
        block = gram[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # (P, size, size)
        z = eigen_embedding(block, _solver_dtype(device))
        del block
        y = np.stack(
            [
                binary_labels(train_labels[sub, c])
                for sub, c in zip(part, owner[start : start + chunk], strict=True)
            ]
        )
        y_t = torch.tensor(y, device=gram.device).unsqueeze(-1)
        w_t = torch.tensor(class_weights(y), device=gram.device).unsqueeze(-1)
        solutions = solve_cost_path(z, y_t, w_t, costs)
        del z
        beta = torch.cat([s.beta for s in solutions], dim=-1)  # (P, size, costs)
        for p in range(len(part)):
            test_scores[:, start + p] = (cross[:, idx[p]] @ beta[p]).cpu().numpy()
            if train_scores is not None:
                train_scores[:, start + p] = (gram[:, idx[p]] @ beta[p]).cpu().numpy()
        for j, solution in enumerate(solutions):
            newton[j] += solution.newton_steps
            cg[j] += solution.cg_iterations
    return test_scores, train_scores, newton, cg


def _lowshot_shared_basis(
    gram: torch.Tensor,
    basis: Callable[[], torch.Tensor],
    cross: torch.Tensor,
    subsets: np.ndarray,
    owner: np.ndarray,
    train_labels: np.ndarray,
    costs: Sequence[float],
    want_train: bool,
) -> tuple[np.ndarray, np.ndarray | None, list[int], list[int]]:
    """All subsets as columns over the whole trainval basis; rows outside a subset weigh 0."""
    z = basis()
    y = binary_labels(train_labels[:, owner])  # (N, problems)
    member = np.zeros_like(y)
    for p, sub in enumerate(subsets):
        member[sub, p] = 1
    y_t = torch.tensor(y, device=gram.device).unsqueeze(0)
    w_t = torch.tensor(class_weights(y) * member, device=gram.device).unsqueeze(0)
    solutions = solve_cost_path(z, y_t, w_t, costs)
    test_scores = np.stack([(cross @ s.beta[0]).cpu().numpy() for s in solutions], axis=-1)
    train_scores = (
        np.stack([(gram @ s.beta[0]).cpu().numpy() for s in solutions], axis=-1) if want_train else None
    )
    return (
        test_scores,
        train_scores,
        [s.newton_steps for s in solutions],
        [s.cg_iterations for s in solutions],
    )


def _sklearn_lowshot_one(
    x: np.ndarray,
    test: np.ndarray,
    subset: np.ndarray,
    y: np.ndarray,
    costs: Sequence[float],
    want_train: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    from sklearn.exceptions import ConvergenceWarning

    test_scores = np.zeros((test.shape[0], len(costs)))
    train_scores = np.zeros((x.shape[0], len(costs))) if want_train else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for j, cost in enumerate(costs):
            model = _linear_svc(float(cost)).fit(x[subset], y)
            test_scores[:, j] = model.decision_function(test)
            if train_scores is not None:
                train_scores[:, j] = model.decision_function(x)
    return test_scores, train_scores


def _lowshot_sklearn(
    x: np.ndarray,
    test: np.ndarray,
    subsets: np.ndarray,
    owner: np.ndarray,
    train_labels: np.ndarray,
    costs: Sequence[float],
    want_train: bool,
    jobs: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The anchors' low-shot: one LinearSVC per (subset, cost)."""
    from joblib import Parallel, delayed

    outputs = Parallel(n_jobs=jobs)(
        delayed(_sklearn_lowshot_one)(x, test, sub, binary_labels(train_labels[sub, c]), costs, want_train)
        for sub, c in zip(subsets, owner, strict=True)
    )
    test_scores = np.stack([o[0] for o in outputs], axis=1)
    train_scores = np.stack([o[1] for o in outputs], axis=1) if want_train else None
    return test_scores, train_scores
