"""The VOC07 SVM and low-shot SVM protocols on arrays (PROTOCOLS.md "VOC07 SVM", "low-shot").

Arrays in, numbers out: features (N, D) and label matrices in VOC's convention (1 present,
-1 absent, 0 difficult). Two solvers give the same protocol:

- ``batched`` (default): every (class, cost, fold) problem as one column of
  :func:`npidbench.solvers.svm.solve_cost_path`, on CPU or GPU.
- ``sklearn``: the anchors' procedure, one LinearSVC per class and cost, 3-fold stratified
  cross-validation with sklearn's average precision, for reproducing the old way side by side
  (:mod:`npidbench.solvers.voc_svm_sklearn`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch

from npidbench.metrics import average_precision_columns, voc_ap_columns
from npidbench.solvers.svm import (
    CostSolution,
    FeatureBasis,
    eigen_embedding,
    gram_matrix,
    iter_cost_path,
    solve_cost_path,
)

SolverName = Literal["batched", "sklearn"]
Method = Literal["auto", "gram", "primal"]  # the batched solver's basis: svm.py, pick_method
Selection = Literal["test", "heldout"]  # what a cost is chosen on: test (published) or held-out trainval
CostListName = Literal["mms", "fair", "vissl"]
# User cost lists (PROTOCOLS.md), one per CostListName in its order (zip fails on a missing one):
# MMS is the default; FAIR and MMS append 0.5^n, n = 4..19.
USER_COSTS: dict[str, list[float]] = dict(
    zip(
        get_args(CostListName),
        (
            [1.0, 10.0, 100.0],  # mms
            [10.0**e for e in range(-7, 3)],  # fair: 1e-7 .. 100 in decades
            [0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0],  # vissl
        ),
        strict=True,
    )
)
LOWSHOT_KS = (1, 2, 4, 8, 16, 32, 64, 96)
POSITIVE_WEIGHT = 2.0  # class_weight {1: 2, -1: 1} of the anchors
NEGATIVES_PER_POSITIVE = 19  # low-shot: k positives, 19k negatives per class
CHUNK_BYTES = 256e6  # low-shot: Gram blocks of one batch of equal-size problems
# Full SVM: N x columns of one group of classes (class_groups). The solver's (N, columns) working
# arrays take about 72 bytes per element (benchmarks/scaling.py's peaks at 40,000 and 118,287
# rows), so a group stays near 1.2 GB; COCO-size trainval with VOC's 20 classes is one group.
COLUMN_BLOCK_ELEMENTS = 16e6


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


@dataclass
class FullProblem:
    """What either solver of the full SVM takes: one layer's trainval features and labels, its test
    features, the cost list, the number of cross-validation folds and the classes to solve."""

    train_x: np.ndarray
    train_labels: np.ndarray
    test_x: np.ndarray
    test_labels: np.ndarray
    costs: Sequence[float]
    folds: int
    classes: list[int]


def _check_solver(solver: str) -> None:
    if solver not in get_args(SolverName):
        raise ValueError(f"unknown solver {solver!r}; choose batched or sklearn")


def full_svm(
    train_x: np.ndarray,
    train_labels: np.ndarray,
    test_x: np.ndarray,
    test_labels: np.ndarray,
    costs: Sequence[float],
    *,
    solver: SolverName = "batched",
    folds: int = 3,
    classes: Sequence[int] | None = None,
    device: str = "cpu",
    jobs: int = 1,
    progress: Callable[[int, int], None] | None = None,
    keep_kernel: bool = False,
    method: Method = "auto",
) -> LayerResult:
    """VOC07 SVM of one layer: per class, the cost of best mean CV AP; test AP of its refit.

    ``method`` (batched solver): gram, primal, or auto (by size, :func:`pick_method`); the two
    solve the same problems to the same tolerance. ``progress(done, total)`` follows the solves.
    """
    _check_solver(solver)
    if method not in get_args(Method):
        raise ValueError(f"unknown method {method!r}; choose {', '.join(get_args(Method))}")
    classes = list(range(train_labels.shape[1])) if classes is None else list(classes)
    started = time.perf_counter()
    problem = FullProblem(train_x, train_labels, test_x, test_labels, costs, folds, classes)
    kernel = None
    if solver == "batched":
        cv_ap, test_ap, stats, kernel = _full_batched(problem, device, progress, method)
    else:
        from npidbench.solvers.voc_svm_sklearn import full_sklearn  # it imports this module

        cv_ap, test_scores, stats = full_sklearn(problem, jobs)  # (N_test, classes, costs)
        n_test = test_scores.shape[0]
        labels = np.repeat(test_labels[:, classes], len(costs), axis=1)
        test_ap = 100 * voc_ap_columns(test_scores.reshape(n_test, -1), labels).reshape(len(classes), len(costs))
        if progress is not None:
            progress(len(costs), len(costs))
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


@dataclass
class _FoldColumns:
    """The full SVM's problems as columns: per class, the folds' training parts, then the refit on
    all of trainval. Each fold column is scored on its held-out rows only (labels 0 elsewhere)."""

    labels: np.ndarray  # (N, columns) +1 / -1
    weights: np.ndarray  # (N, columns) class weights, 0 outside a fold's training part
    held_out: np.ndarray  # (N, columns) int8: a fold column's labels on its held-out rows
    fold_cols: list[int]
    refit_cols: list[int]


def _fold_columns(train_labels: np.ndarray, classes: list[int], folds: int) -> _FoldColumns:
    n = train_labels.shape[0]
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
    held_out_labels = np.zeros((n, len(ys)), dtype=np.int8)
    fold_cols = [i * per_class + f for i in range(len(classes)) for f in range(folds)]
    for col, val in zip(fold_cols, held_out, strict=True):
        held_out_labels[val, col] = ys[col][val]
    refit_cols = [i * per_class + folds for i in range(len(classes))]
    return _FoldColumns(np.stack(ys, 1), np.stack(weights, 1), held_out_labels, fold_cols, refit_cols)


def pick_method(n: int, dims: int) -> Literal["gram", "primal"]:
    """The smaller of the two eigenproblems (svm.py): the N x N Gram matrix while N <= D + 1, the
    (D + 1) x (D + 1) feature covariance beyond. Each Newton-CG product then also costs
    O(N min(N, D + 1)) per column. benchmarks/scaling.py measures the crossover."""
    return "gram" if n <= dims + 1 else "primal"


def class_groups(classes: list[int], n: int, folds: int) -> list[list[int]]:
    """Classes solved together: all of them while N x columns stays under COLUMN_BLOCK_ELEMENTS
    (VOC07: 5,011 x 80 columns, one group), else groups that keep the solver's (N, columns)
    working arrays bounded as N grows (COCO's 118k trainval x 80 classes x 4 columns would need
    about 2.7 GB at once: three groups). Each group streams Z through every CG product again, so
    groups are as large as the bound allows."""
    per_group = max(1, int(COLUMN_BLOCK_ELEMENTS // (n * (folds + 1))))
    return [classes[i : i + per_group] for i in range(0, len(classes), per_group)]


class _GramSpace:
    """The dual side: normalised trainval and test features, K = X̃ X̃ᵀ, its eigen-embedding;
    scores from the dual coefficients β (K β on trainval, T̃ X̃ᵀ β on test)."""

    def __init__(self, train_x: np.ndarray, test_x: np.ndarray, device: str) -> None:
        self.x = normalise(train_x, device)
        self.gram = gram_matrix(self.x)
        self.z = eigen_embedding(self.gram.unsqueeze(0), _solver_dtype(device))
        self.test = normalise(test_x, device)

    def trainval_scores(self, solution: CostSolution) -> np.ndarray:
        return (self.gram @ solution.beta[0]).cpu().numpy()

    def test_scores(self, solution: CostSolution, columns: list[int]) -> np.ndarray:
        refit = solution.beta[0][:, columns]  # w = X̃ᵀ β: weights Xᵀ β and bias Σ β
        return (self.test @ (self.x.T @ refit) + refit.sum(0)).cpu().numpy()

    def kernel(self) -> TrainKernel:
        return TrainKernel(self.x, self.gram, self.z[0])


class _PrimalSpace:
    """The primal side (svm.FeatureBasis): Z = X̃ V in float32, scores X̃ w with w = V v, every
    product over row blocks normalised on the fly, so memory stays O(N D) in float32."""

    def __init__(self, train_x: np.ndarray, test_x: np.ndarray, device: str) -> None:
        self.test_x, self.device = test_x, device
        self.basis = FeatureBasis(
            lambda a, b: normalise(train_x[a:b], device),
            train_x.shape[0],
            train_x.shape[1],
            device,
            _solver_dtype(device),
        )
        self.z = self.basis.z

    def trainval_scores(self, solution: CostSolution) -> np.ndarray:
        w = self.basis.weights(solution.v)
        return np.concatenate([(x @ w).cpu().numpy() for _, x in self.basis.blocks()])

    def test_scores(self, solution: CostSolution, columns: list[int]) -> np.ndarray:
        w = self.basis.weights(solution.v)[:, columns]
        out = []
        for start in range(0, self.test_x.shape[0], self.basis.block):
            t = normalise(self.test_x[start : start + self.basis.block], self.device)
            out.append((t @ w[:-1] + w[-1]).cpu().numpy())
        return np.concatenate(out)

    def kernel(self) -> None:
        return None  # low-shot builds its own Gram matrix: there is none here to hand over


def _full_batched(
    problem: FullProblem,
    device: str,
    progress: Callable[[int, int], None] | None,
    method: Method = "auto",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], TrainKernel | None]:
    """CV AP (classes, costs), test AP x100 (classes, costs), the solver's counts and timings, and
    the trainval kernel (the Gram path's only). Each cost is scored as soon as it is solved, group
    of classes by group, so neither the β of every cost nor every test score is ever held."""
    n, dims = problem.train_x.shape
    chosen = pick_method(n, dims) if method == "auto" else method
    t = time.perf_counter()
    space: _GramSpace | _PrimalSpace = (_GramSpace if chosen == "gram" else _PrimalSpace)(
        problem.train_x, problem.test_x, device
    )
    timings = {"basis_s": time.perf_counter() - t, "solve_s": 0.0, "score_s": 0.0}
    shape = (len(problem.classes), len(problem.costs))
    cv_ap, test_ap = np.zeros(shape), np.zeros(shape)
    newton, cg = [0] * len(problem.costs), [0] * len(problem.costs)
    unconverged = 0
    groups = class_groups(problem.classes, n, problem.folds)
    total, done = len(groups) * len(problem.costs), 0
    row = 0
    for group in groups:
        rows = slice(row, row + len(group))
        row += len(group)
        columns = _fold_columns(problem.train_labels, group, problem.folds)
        labels_t = torch.tensor(columns.labels, device=device).unsqueeze(0)
        weights_t = torch.tensor(columns.weights, device=device).unsqueeze(0)
        t = time.perf_counter()
        for j, solution in iter_cost_path(space.z, labels_t, weights_t, problem.costs):
            timings["solve_s"] += time.perf_counter() - t
            t = time.perf_counter()
            cv_ap[rows, j], test_ap[rows, j] = _score_cost(space, solution, columns, group, problem)
            newton[j] += solution.newton_steps
            cg[j] += solution.cg_iterations
            unconverged += solution.unconverged
            done += 1
            if progress is not None:
                progress(done, total)
            timings["score_s"] += time.perf_counter() - t
            t = time.perf_counter()
    stats = {
        "method": chosen,
        "class_groups": len(groups),
        "newton_steps": newton,
        "cg_iterations": cg,
        "unconverged": unconverged,
        **{k: round(v, 2) for k, v in timings.items()},
    }
    return cv_ap, test_ap, stats, space.kernel()


def _score_cost(
    space: _GramSpace | _PrimalSpace,
    solution: CostSolution,
    columns: _FoldColumns,
    group: list[int],
    problem: FullProblem,
) -> tuple[np.ndarray, np.ndarray]:
    """One cost of one group of classes: mean CV AP on the fold columns' held-out rows, and the
    refits' test AP x100."""
    trainval_scores = space.trainval_scores(solution)  # held-out rows give the CV scores
    cv = (
        average_precision_columns(trainval_scores, columns.held_out)[columns.fold_cols]
        .reshape(-1, problem.folds)
        .mean(1)
    )
    test_scores = space.test_scores(solution, columns.refit_cols)
    return cv, 100 * voc_ap_columns(test_scores, problem.test_labels[:, group])


def _solver_dtype(device: str | torch.device) -> torch.dtype:
    """float32 products for the Newton/CG iterations (objective within ~1e-8 of float64 runs on
    VOC07; twice as fast on a CPU); the Gram matrix and its eigendecomposition stay float64."""
    return torch.float32


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


@dataclass
class _Draws:
    """The problems of one k: every (sample, class) subset of trainval rows and its class."""

    subsets: np.ndarray  # (samples * classes, 20k), sample-major
    owner: np.ndarray  # (samples * classes,) the class of each subset

    @classmethod
    def draw(cls, train_labels: np.ndarray, k: int, samples: int, seed: int, classes: list[int]) -> _Draws:
        draws = [draw_lowshot(train_labels, k, s, seed, classes) for s in range(samples)]
        subsets = np.stack([sub for draw in draws for sub in draw])
        return cls(subsets, np.array([c for _ in range(samples) for c in classes]))

    def held_out(self, train_labels: np.ndarray) -> np.ndarray:
        """(N, problems) labels of the trainval images not drawn for each problem (drawn: 0)."""
        held = train_labels[:, self.owner].copy()
        for p, sub in enumerate(self.subsets):
            held[sub, p] = 0
        return held


@dataclass
class _LowShotSpace:
    """What every low-shot problem is solved and scored in: normalised trainval and test features,
    the trainval Gram matrix, the test x trainval kernel (test scores from β), and the trainval
    eigenbasis, computed once when a large k first needs it."""

    x: torch.Tensor
    test: torch.Tensor
    gram: torch.Tensor
    cross: torch.Tensor
    device: str
    z: torch.Tensor | None = None  # (1, N, rank)

    @classmethod
    def build(
        cls, train_x: np.ndarray, test_x: np.ndarray, kernel: TrainKernel | None, device: str
    ) -> _LowShotSpace:
        if kernel is None:
            x = normalise(train_x, device)
            kernel = TrainKernel(x, gram_matrix(x))
        test = normalise(test_x, device)
        z = None if kernel.z is None else kernel.z.unsqueeze(0)
        return cls(kernel.x, test, kernel.gram, gram_matrix(test, kernel.x), device, z)

    def basis(self) -> torch.Tensor:
        if self.z is None:
            self.z = eigen_embedding(self.gram.unsqueeze(0), _solver_dtype(self.device))
        return self.z


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
    selection: Selection = "test",
    solver: SolverName = "batched",
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
    _check_solver(solver)
    classes = list(range(train_labels.shape[1])) if classes is None else list(classes)
    started = time.perf_counter()
    space = _LowShotSpace.build(train_x, test_x, kernel, device)
    shape = (len(ks), samples, len(costs))
    maps, heldout_maps = np.zeros(shape), np.zeros(shape)
    stats: dict[str, Any] = {"newton_steps": {}, "cg_iterations": {}}
    for a, k in enumerate(ks):
        draws = _Draws.draw(train_labels, k, samples, seed, classes)
        test_scores, train_scores, counts = _solve_lowshot(
            space, draws, train_labels, costs, selection == "heldout", solver, jobs
        )
        if counts is not None:
            stats["newton_steps"][str(k)], stats["cg_iterations"][str(k)] = counts
        maps[a] = _sample_maps(test_scores, test_labels[:, draws.owner], samples)
        if train_scores is not None:
            heldout_maps[a] = _sample_maps(train_scores, draws.held_out(train_labels), samples)
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


_Counts = tuple[list[int], list[int]]  # Newton steps and CG iterations per cost


def _solve_lowshot(
    space: _LowShotSpace,
    draws: _Draws,
    train_labels: np.ndarray,
    costs: Sequence[float],
    want_train: bool,
    solver: SolverName,
    jobs: int,
) -> tuple[np.ndarray, np.ndarray | None, _Counts | None]:
    """Scores (images, problems, costs) of one k's problems on test and, when wanted, trainval, by
    either solver; the batched one also counts its work. Scores come from the dual coefficients:
    K_other,subset β.

    Batched: small subsets get their own Gram block and eigenbasis. From a quarter of trainval up,
    eigendecomposing every block costs more than solving all subsets as masked columns of the
    trainval basis (measured at k = 64/96 on VOC07: eigh alone took 51 s of 123 s), so they share
    that one."""
    if solver == "batched":
        if 4 * draws.subsets.shape[1] > space.gram.shape[0]:
            return _lowshot_shared_basis(space, draws, train_labels, costs, want_train)
        return _lowshot_blocks(space, draws, train_labels, costs, want_train)
    from npidbench.solvers.voc_svm_sklearn import lowshot_sklearn  # it imports this module

    x, test = space.x.cpu().numpy(), space.test.cpu().numpy()
    test_scores, train_scores = lowshot_sklearn(
        x, test, draws.subsets, draws.owner, train_labels, costs, want_train, jobs
    )
    return test_scores, train_scores, None


def _sample_maps(scores: np.ndarray, labels: np.ndarray, samples: int) -> np.ndarray:
    """(images, problems, costs) scores and (images, problems) labels -> (samples, costs) mAP x100,
    the mean over the classes of a sample."""
    costs = scores.shape[-1]
    ap = voc_ap_columns(scores.reshape(scores.shape[0], -1), np.repeat(labels, costs, axis=1))
    return 100 * ap.reshape(samples, -1, costs).mean(axis=1)


def _lowshot_blocks(
    space: _LowShotSpace, draws: _Draws, train_labels: np.ndarray, costs: Sequence[float], want_train: bool
) -> tuple[np.ndarray, np.ndarray | None, _Counts]:
    """Every (sample, class) subset of one k, solved as a batch, each on its own Gram block and
    eigenbasis (batches of equal-size problems, in chunks that keep the blocks near 256 MB)."""
    problems, size = draws.subsets.shape
    chunk = max(1, int(CHUNK_BYTES // (8 * size * size)))
    test_scores = np.zeros((space.cross.shape[0], problems, len(costs)))
    train_scores = np.zeros((space.gram.shape[0], problems, len(costs))) if want_train else None
    newton = [0] * len(costs)
    cg = [0] * len(costs)
    for start in range(0, problems, chunk):
        part = slice(start, start + chunk)
        idx, solutions = _solve_chunk(space, draws.subsets[part], draws.owner[part], train_labels, costs)
        beta = torch.cat([s.beta for s in solutions], dim=-1)  # (P, size, costs)
        for p in range(len(idx)):
            test_scores[:, start + p] = (space.cross[:, idx[p]] @ beta[p]).cpu().numpy()
            if train_scores is not None:
                train_scores[:, start + p] = (space.gram[:, idx[p]] @ beta[p]).cpu().numpy()
        for j, solution in enumerate(solutions):
            newton[j] += solution.newton_steps
            cg[j] += solution.cg_iterations
    return test_scores, train_scores, (newton, cg)


def _solve_chunk(
    space: _LowShotSpace,
    subsets: np.ndarray,
    owner: np.ndarray,
    train_labels: np.ndarray,
    costs: Sequence[float],
) -> tuple[torch.Tensor, list[CostSolution]]:
    """Equal-size subsets, each on its own Gram block and eigenbasis: their indices, solutions."""
    idx = torch.as_tensor(subsets, device=space.gram.device)
    block = space.gram[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # (P, size, size)
    z = eigen_embedding(block, _solver_dtype(space.device))
    del block
    y = np.stack([binary_labels(train_labels[sub, c]) for sub, c in zip(subsets, owner, strict=True)])
    y_t = torch.tensor(y, device=space.gram.device).unsqueeze(-1)
    w_t = torch.tensor(class_weights(y), device=space.gram.device).unsqueeze(-1)
    return idx, solve_cost_path(z, y_t, w_t, costs)


def _lowshot_shared_basis(
    space: _LowShotSpace, draws: _Draws, train_labels: np.ndarray, costs: Sequence[float], want_train: bool
) -> tuple[np.ndarray, np.ndarray | None, _Counts]:
    """All subsets as columns over the whole trainval basis; rows outside a subset weigh 0."""
    z = space.basis()
    y = binary_labels(train_labels[:, draws.owner])  # (N, problems)
    member = np.zeros_like(y)
    for p, sub in enumerate(draws.subsets):
        member[sub, p] = 1
    y_t = torch.tensor(y, device=space.gram.device).unsqueeze(0)
    w_t = torch.tensor(class_weights(y) * member, device=space.gram.device).unsqueeze(0)
    solutions = solve_cost_path(z, y_t, w_t, costs)
    test_scores = np.stack([(space.cross @ s.beta[0]).cpu().numpy() for s in solutions], axis=-1)
    train_scores = (
        np.stack([(space.gram @ s.beta[0]).cpu().numpy() for s in solutions], axis=-1) if want_train else None
    )
    counts = ([s.newton_steps for s in solutions], [s.cg_iterations for s in solutions])
    return test_scores, train_scores, counts
