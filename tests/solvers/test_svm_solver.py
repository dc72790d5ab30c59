"""The batched squared-hinge SVM solver against liblinear (sklearn LinearSVC) on the same problems."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

from npidbench.solvers.svm import (
    FeatureBasis,
    eigen_embedding,
    gram_matrix,
    primal_objective,
    solve_cost_path,
)

COSTS = [100.0, 1.0, 0.5**6, 0.5**19, 10.0]  # deliberately unsorted: results keep this order


def _problem(n: int, d: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=d)
    y = np.where(rng.random(n) < 0.3, 1.0, -1.0)
    x = (
        rng.normal(size=(n, d)) + 0.8 * y[:, None] * centre / np.linalg.norm(centre) + 1.0
    )  # offset: a mean direction
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return torch.from_numpy(x), y


def _liblinear(
    x: np.ndarray, y: np.ndarray, cost: float, weight_pos: float = 2.0
) -> tuple[np.ndarray, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LinearSVC(
            C=cost, class_weight={1: weight_pos, -1: 1}, loss="squared_hinge", tol=1e-10, max_iter=200000
        )
        model.fit(x, y)
    return model.coef_.ravel(), float(model.intercept_[0])


def _basis(x: torch.Tensor, method: str) -> torch.Tensor:
    if method == "gram":
        return eigen_embedding(gram_matrix(x)[None], torch.float64)
    return FeatureBasis(lambda a, b: x[a:b], x.shape[0], x.shape[1], dtype=torch.float64).z


def _solve(x: torch.Tensor, y: np.ndarray, weights: np.ndarray, costs, method: str = "gram", **kwargs):
    z = _basis(x, method)
    labels = torch.tensor(y)[None, :, None]
    return solve_cost_path(z, labels, torch.tensor(weights)[None, :, None], costs, **kwargs)


@pytest.mark.parametrize("method", ["gram", "primal"])
@pytest.mark.parametrize(("n", "d"), [(120, 40), (60, 150)], ids=["n>d", "n<d"])
def test_objective_and_scores_match_a_tightly_converged_liblinear(n, d, method):
    x, y = _problem(n, d, seed=n + d)
    weights = np.where(y > 0, 2.0, 1.0)
    solutions = _solve(x, y, weights, COSTS, method, tol=1e-12)
    assert [s.cost for s in solutions] == COSTS
    for solution in solutions:
        w_ref, b_ref = _liblinear(x.numpy(), y, solution.cost)
        c = torch.tensor(weights * solution.cost)[:, None]
        labels = torch.tensor(y)[:, None]
        reference = primal_objective(x, labels, c, torch.tensor(w_ref)[:, None], torch.tensor([b_ref]))
        ours = float(solution.objective[0, 0])
        assert ours <= float(reference[0]) * (1 + 1e-6)
        assert ours >= float(reference[0]) * (1 - 1e-6)
        # scores of the samples from the dual coefficients: (X Xᵀ + 1) β == liblinear's w·x + b
        beta = solution.beta[0, :, 0]
        scores = (gram_matrix(x) @ beta).numpy()
        np.testing.assert_allclose(
            scores, x.numpy() @ w_ref + b_ref, atol=2e-4 * max(1, np.abs(scores).max())
        )


def test_a_zero_weight_leaves_samples_out_exactly():
    x, y = _problem(90, 30, seed=3)
    keep = np.arange(90) % 3 != 0
    weights = np.where(y > 0, 2.0, 1.0)
    masked = _solve(x, y, weights * keep, [1.0], tol=1e-12)[0]
    alone = _solve(x[keep], y[keep], weights[keep], [1.0], tol=1e-12)[0]
    assert float(masked.objective) == pytest.approx(float(alone.objective), rel=1e-9)
    assert torch.all(masked.beta[0, ~torch.from_numpy(keep), 0] == 0)
    torch.testing.assert_close(
        masked.beta[0, torch.from_numpy(keep), 0], alone.beta[0, :, 0], rtol=1e-6, atol=1e-9
    )


def test_batches_of_problems_equal_separate_solves_in_float32():
    problems = [_problem(50, 80, seed=s) for s in range(3)]
    grams = torch.stack([gram_matrix(x) for x, _ in problems])
    labels = torch.tensor(np.stack([y for _, y in problems]))[..., None]
    weights = torch.where(labels > 0, 2.0, 1.0).double()
    together = solve_cost_path(eigen_embedding(grams), labels, weights, [0.1, 10.0])
    for g, (x, y) in enumerate(problems):
        alone = _solve(x, y, np.where(y > 0, 2.0, 1.0), [0.1, 10.0], tol=1e-12)
        for a, b in zip(together, alone, strict=True):
            assert float(a.objective[g, 0]) == pytest.approx(float(b.objective[0, 0]), rel=1e-6)
            assert a.unconverged == 0


def test_bad_shapes_and_costs_are_refused():
    x, y = _problem(20, 5, seed=0)
    z = eigen_embedding(gram_matrix(x)[None])
    labels = torch.tensor(y)[None, :, None]
    with pytest.raises(ValueError, match="do not fit"):
        solve_cost_path(z, labels[:, :10], labels[:, :10], [1.0])
    with pytest.raises(ValueError, match="positive"):
        solve_cost_path(z, labels, torch.ones_like(labels), [0.0])


def test_the_primal_basis_has_the_gram_bases_kernel_and_diagonal_and_maps_back_to_w():
    """Z = X̃ V: Z Zᵀ = K = X Xᵀ + 1 and Zᵀ Z diagonal, as the Gram eigen-embedding; the solution's
    w = V v scores every sample as the dual coefficients do (K β), in any block size."""
    x, y = _problem(150, 20, seed=11)
    basis = FeatureBasis(lambda a, b: x[a:b], 150, 20, dtype=torch.float64)
    basis.block = 7  # many blocks: the sums over them must not depend on where they are cut
    again = FeatureBasis(lambda a, b: x[a:b], 150, 20, dtype=torch.float64)
    z = basis.z[0]
    torch.testing.assert_close(z @ z.T, gram_matrix(x), rtol=0, atol=1e-12)
    zz = z.T @ z
    torch.testing.assert_close(zz, torch.diag(torch.diagonal(zz)), rtol=0, atol=1e-10)
    weights = torch.tensor(np.where(y > 0, 2.0, 1.0))[None, :, None]
    labels = torch.tensor(y)[None, :, None]
    (solution,) = solve_cost_path(basis.z, labels, weights, [3.0], tol=1e-12)
    w = basis.weights(solution.v)
    torch.testing.assert_close(x @ w[:-1] + w[-1], gram_matrix(x) @ solution.beta[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(again.z, basis.z, rtol=0, atol=1e-12)


def test_primal_and_gram_reach_the_same_objective_at_every_cost_in_float32():
    x, y = _problem(400, 60, seed=12)
    weights = np.where(y > 0, 2.0, 1.0)
    labels = torch.tensor(y)[None, :, None]
    w_t = torch.tensor(weights)[None, :, None]
    gram = solve_cost_path(eigen_embedding(gram_matrix(x)[None]), labels, w_t, COSTS)
    primal = solve_cost_path(FeatureBasis(lambda a, b: x[a:b], 400, 60).z, labels, w_t, COSTS)
    for a, b in zip(gram, primal, strict=True):
        assert float(b.objective[0, 0]) == pytest.approx(float(a.objective[0, 0]), rel=1e-6)
        assert a.unconverged == b.unconverged == 0
