"""Many L2-regularised squared-hinge linear SVMs with bias, solved together with dense algebra.

The anchors (FAIR benchmark, VISSL, mmselfsup; PROTOCOLS.md "VOC07 SVM") fit sklearn's
LinearSVC (liblinear's dual coordinate descent) one class and one cost at a time: 1,520 fits
per layer. All of those problems share the training samples; only the labels, class weights,
cross-validation masks and the cost differ. This module solves them as columns of one problem:

1. The Gram matrix K = X Xᵀ + 1 (the +1 is liblinear's bias: a constant feature of value
   intercept_scaling = 1, regularised like the weights) is formed once in float64 and
   eigendecomposed, K = Q Λ Qᵀ. With Z = Q Λ^½ the primal problem over w is the same problem
   over v in at most N dimensions (w = X̃ᵀ Q Λ^-½ v keeps ||w|| = ||v|| and scores X̃ w = Z v),
   and Zᵀ Z = Λ is diagonal.
2. Every column takes truncated Newton steps (Keerthi & DeCoste 2005; Chapelle 2007, "Training
   a support vector machine in the primal") with preconditioned conjugate gradients whose matrix
   products are batched over the columns. The Hessian I + 2 Zᵀ diag(c·active) Z is close to
   diagonal in the eigenbasis except among the leading directions (the mean of the features
   alone carries most of the spectrum): the preconditioner inverts the leading ``head`` x
   ``head`` block exactly per column and the rest by its diagonal. On VOC07-size problems a
   Newton step then needs 1-4 CG iterations at small costs and 6-45 at C = 100.
3. Costs are solved in increasing order, each warm-started from the previous cost's solution
   (or that solution rescaled by the cost ratio, whichever has the lower objective: at small
   costs the solution grows linearly with the cost).
4. Each column stops when its Newton decrement, an estimate of the distance to the optimal
   objective, is below ``tol`` x the objective. Results come back as dual coefficients
   β = 2 c max(0, 1 - y o) y, for which w = X̃ᵀ β (the primal optimality condition): scores of
   any other sample x are (x·X ᵀ + 1) β, with no division by small eigenvalues.

The objective, per column: ½||w||² + Σ_i c_i max(0, 1 - y_i w·x̃_i)², c_i = cost x weight_i; a
weight of 0 leaves a sample out (cross-validation folds, low-shot subsets).

Step 1 has a primal twin for N > D + 1 (:class:`FeatureBasis`): with X̃ᵀ X̃ = V Σ Vᵀ, Z = X̃ V has
the same Z Zᵀ = K and the same diagonal Zᵀ Z (the non-zero eigenvalues of X̃ᵀ X̃ and X̃ X̃ᵀ are the
same), so steps 2-4 run unchanged on an (N, D + 1) matrix instead of an (N, N) one, and w = V v.
It costs O(N D² + D³) time and O(N D) memory where the Gram path costs O(N² D + N³) and O(N²):
linear in N, which the Gram path is not (issue 18 measured 33 s at N = 2,500 and 396 s at 10,000).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Eigenvalues below this fraction of the largest are rounding noise of a rank-deficient Gram
# matrix (float64 eigh is accurate to ~1e-16 of the largest): their directions are dropped.
_RANK_TOL = 1e-13
# Inexact Newton: CG stops at this relative residual (looser tolerances measured no faster on
# VOC07: fewer CG iterations, more Newton steps).
_CG_TOL = 1e-2


@dataclass(frozen=True)
class CostSolution:
    """One cost of the path for every column."""

    cost: float
    beta: torch.Tensor  # (G, N, m) float64 dual coefficients
    objective: torch.Tensor  # (G, m) float64
    newton_steps: int
    cg_iterations: int
    unconverged: int  # columns that hit max_newton
    v: torch.Tensor  # (G, r, m) float64 coordinates in the basis Z (primal: w = V v)


def gram_matrix(features: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """X Yᵀ + 1 in float64 (the +1: liblinear's bias feature, intercept_scaling = 1)."""
    x = features.double()
    y = x if other is None else other.double()
    return torch.addmm(torch.ones(x.shape[0], y.shape[0], dtype=torch.float64, device=x.device), x, y.T)


def eigen_embedding(gram: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Z with Z Zᵀ = K and Zᵀ Z diagonal, directions by decreasing eigenvalue.

    ``gram``: (G, N, N) float64. Directions whose eigenvalue is rounding noise are zeroed, so
    the shape stays (G, N, N) and a batch of same-size problems stays one tensor.
    """
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues, vectors = eigenvalues.flip(-1), vectors.flip(-1)
    floor = eigenvalues[..., :1].clamp_min(0) * _RANK_TOL
    scale = torch.where(eigenvalues > floor, eigenvalues, torch.zeros_like(eigenvalues)).sqrt()
    return (vectors * scale.unsqueeze(-2)).to(dtype)


# Rows per block when the primal basis is built and applied: blocks of (rows, D + 1) float64 stay
# near 64 MB, so nothing of size N x D is ever held in float64.
_ROW_BLOCK_ELEMENTS = 8_000_000


class FeatureBasis:
    """The primal twin of :func:`eigen_embedding` (module docstring): Z = X̃ V from the (D + 1) x
    (D + 1) eigendecomposition of X̃ᵀ X̃, X̃ = [X, 1]; w = V v maps a solution back to feature space.

    ``rows(start, stop)`` gives float64 rows of X (already normalised by the caller's function),
    so that a memory-mapped float32 or float16 source is converted block by block: the peak is the
    float32 Z and the (D + 1)² float64 rotation, O(N D), never a float64 copy of X.
    """

    def __init__(
        self,
        rows: Callable[[int, int], torch.Tensor],
        n: int,
        dims: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.n, self.dims, self.device = n, dims, device
        self.block = max(1, _ROW_BLOCK_ELEMENTS // (dims + 1))
        self._rows = rows
        covariance = torch.zeros(dims + 1, dims + 1, dtype=torch.float64, device=device)
        for _, x in self.blocks():
            covariance += x.T @ x
        eigenvalues, vectors = torch.linalg.eigh(covariance)
        eigenvalues, vectors = eigenvalues.flip(-1), vectors.flip(-1)
        floor = eigenvalues[:1].clamp_min(0) * _RANK_TOL
        # Noise directions are dropped as in eigen_embedding: their column of Z is zero, so their
        # coordinate of v stays 0 and w gets nothing along them.
        self.rotation = vectors * (eigenvalues > floor).to(vectors.dtype)
        z = torch.empty(n, dims + 1, dtype=dtype, device=device)
        for start, x in self.blocks():
            z[start : start + len(x)] = (x @ self.rotation).to(dtype)
        self.z = z.unsqueeze(0)  # (1, N, D + 1), as eigen_embedding's batch of one

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, X̃ block in float64) over the training rows."""
        for start in range(0, self.n, self.block):
            x = self._rows(start, min(self.n, start + self.block)).to(self.device, torch.float64)
            yield start, torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)

    def weights(self, v: torch.Tensor) -> torch.Tensor:
        """(D + 1, m) w̃ = V v of one group's (1, D + 1, m) coordinates; the last row is the bias."""
        return self.rotation @ v[0]


class _Preconditioner:
    """Exact inverse of the Hessian's leading head x head block per column, diagonal elsewhere.

    The blocks are kept per unit cost, Zₕᵀ diag(weight·active) Zₕ, and rebuilt only when some
    column's active set changes: along the small costs, where every sample stays active, one
    build serves the whole path and only the small Cholesky factors are redone.
    """

    def __init__(self, z: torch.Tensor, head: int) -> None:
        self.z_head = z[..., :head]
        self.z_tail = z[..., head:]  # squared block by block in _build, not kept: Z's size again
        self.head = head
        self.pattern: torch.Tensor | None = None
        self.builds = 0

    def prepare(self, active: torch.Tensor, weights: torch.Tensor, cost: float) -> None:
        if self.pattern is None or not torch.equal(active, self.pattern):
            self._build(weights * active)
            self.pattern = active.clone()
        h = self.head
        eye = torch.eye(h, dtype=torch.float64, device=self.unit_blocks.device)
        self.factor = torch.linalg.cholesky(eye + (2 * cost) * self.unit_blocks)
        self.tail = 1 + (2 * cost) * self.unit_tail

    def _build(self, unit_cost: torch.Tensor) -> None:
        z_head = self.z_head
        g, n, h = z_head.shape
        m = unit_cost.shape[-1]
        blocks = torch.empty(g, m, h, h, dtype=torch.float64, device=z_head.device)
        w = unit_cost.to(z_head.dtype).transpose(1, 2)  # (G, m, N)
        # Chunk the columns so the (G, chunk, N, h) weighted copy stays near 64M elements.
        chunk = max(1, int(64e6 // max(1, g * n * h)))
        for start in range(0, m, chunk):
            weighted = z_head.unsqueeze(1) * w[:, start : start + chunk].unsqueeze(-1)
            blocks[:, start : start + chunk] = (weighted.transpose(-1, -2) @ z_head.unsqueeze(1)).double()
        self.unit_blocks = blocks
        tail = torch.zeros(g, self.z_tail.shape[-1], m, dtype=torch.float64, device=z_head.device)
        rows = max(1, int(16e6 // max(1, g * self.z_tail.shape[-1])))
        for start in range(0, n, rows):
            z_sq = self.z_tail[:, start : start + rows] ** 2
            tail += (z_sq.transpose(1, 2) @ unit_cost[:, start : start + rows].to(z_head.dtype)).double()
        self.unit_tail = tail
        self.builds += 1

    def __call__(self, residual: torch.Tensor) -> torch.Tensor:
        h = self.head
        out = torch.empty_like(residual)
        top = residual[:, :h].transpose(1, 2).unsqueeze(-1)  # (G, m, h, 1)
        out[:, :h] = torch.cholesky_solve(top, self.factor).squeeze(-1).transpose(1, 2)
        out[:, h:] = residual[:, h:] / self.tail
        return out


def _objective(
    v: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, cost: torch.Tensor
) -> torch.Tensor:
    slack = (1 - labels * scores).clamp_min(0)
    return 0.5 * (v * v).sum(1) + (cost * slack * slack).sum(1)


class _Hessian:
    """p -> (I + 2 Zᵀ diag(c·active) Z) p, remembering Z p so that Z d of the CG solution comes
    for free (the line search needs it)."""

    def __init__(self, z: torch.Tensor, active_cost: torch.Tensor) -> None:
        self.z, self.zt = z, z.transpose(1, 2)
        self.w = active_cost.to(z.dtype)
        self.last_zp: torch.Tensor | None = None

    def __call__(self, p: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """Products for the columns still moving (G x m bool); the others get zeros. With one
        group, finished columns are left out of the matrix products altogether: at large costs
        a few slow columns would otherwise keep every column's products running."""
        if self.z.shape[0] == 1 and not bool(moving.all()):
            cols = moving[0].nonzero().squeeze(1)
            zp = torch.zeros(1, self.z.shape[1], p.shape[2], dtype=self.z.dtype, device=p.device)
            out = torch.zeros_like(p)
            zp[..., cols] = self.z @ p[..., cols].to(self.z.dtype)
            out[..., cols] = p[..., cols] + 2 * (self.zt @ (self.w[..., cols] * zp[..., cols])).double()
            self.last_zp = zp
            return out
        zp = self.z @ p.to(self.z.dtype)
        self.last_zp = zp
        return p + 2 * (self.zt @ (self.w * zp)).double()


def _pcg(
    hessian: _Hessian,
    precondition: _Preconditioner,
    rhs: torch.Tensor,
    live: torch.Tensor,
    rel_tol: float,
    max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Preconditioned CG for every column at once; finished columns stop moving.
    Returns (x, Z x, iterations)."""
    x = torch.zeros_like(rhs)
    zx = torch.zeros(rhs.shape[0], hessian.z.shape[1], rhs.shape[2], dtype=torch.float64, device=rhs.device)
    residual = rhs.clone()
    target = rel_tol * rhs.norm(dim=1)  # (G, m)
    z = precondition(residual)
    direction = z.clone()
    rz = (residual * z).sum(1)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        moving = live & (residual.norm(dim=1) > target)
        if not moving.any():
            return x, zx, iterations - 1
        hd = hessian(direction, moving)
        curvature = (direction * hd).sum(1)
        alpha = torch.where(moving, rz / curvature.clamp_min(1e-300), torch.zeros_like(rz)).unsqueeze(1)
        # (frozen columns: alpha = 0, so their zero products change nothing)
        x += alpha * direction
        zx += alpha * hessian.last_zp.double()
        residual -= alpha * hd
        z = precondition(residual)
        rz_next = (residual * z).sum(1)
        beta = torch.where(moving, rz_next / rz.clamp_min(1e-300), torch.zeros_like(rz)).unsqueeze(1)
        direction = z + beta * direction
        rz = rz_next
    return x, zx, iterations


def _line_search(
    v: torch.Tensor,
    d: torch.Tensor,
    scores: torch.Tensor,
    scores_d: torch.Tensor,
    labels: torch.Tensor,
    cost: torch.Tensor,
) -> torch.Tensor:
    """Exact step along d: the objective is a convex piecewise quadratic in the step size, so a
    few 1-D Newton iterations from 1 land on its minimum (Keerthi & DeCoste 2005)."""
    vd, dd = (v * d).sum(1), (d * d).sum(1)
    step = torch.ones_like(vd)
    for _ in range(12):
        s = step.unsqueeze(1)
        slack = 1 - labels * (scores + s * scores_d)
        c = cost * (slack > 0)
        first = vd + step * dd - 2 * (c * slack * labels * scores_d).sum(1)
        second = dd + 2 * (c * scores_d * scores_d).sum(1)
        update = first / second.clamp_min(1e-300)
        step = (step - update).clamp_min(0)
        if (update.abs() <= 1e-12 * step.clamp_min(1e-12)).all():
            break
    return step


@dataclass
class _State:
    v: torch.Tensor  # (G, r, m) float64
    scores: torch.Tensor  # (G, N, m) float64, Z v


def _newton(
    z: torch.Tensor,
    precondition: _Preconditioner,
    labels: torch.Tensor,
    weights: torch.Tensor,
    cost_value: float,
    state: _State,
    tol: float,
    max_newton: int,
    max_cg: int,
) -> tuple[_State, int, int, int]:
    """Minimise every column's objective from ``state``; returns (state, Newton steps, CG
    iterations, columns not converged)."""
    zt = z.transpose(1, 2)
    cost = weights * cost_value
    v, scores = state.v, state.scores
    live = torch.ones(v.shape[0], v.shape[2], dtype=torch.bool, device=v.device)
    cg_total = 0
    steps = 0
    for steps in range(1, max_newton + 1):
        slack = 1 - labels * scores
        active = slack > 0
        active_cost = cost * active
        gradient = v - 2 * (zt @ (active_cost * slack * labels).to(z.dtype)).double()
        objective = _objective(v, scores, labels, cost)
        if steps > 1 and precondition.pattern is not None and torch.equal(active, precondition.pattern):
            # Same active sets, same Hessian: ½ gᵀP⁻¹g with its (good) preconditioner estimates
            # the remaining gap; columns already there stop without another CG solve.
            estimate = 0.5 * (gradient * precondition(gradient)).sum(1)
            live = live & (estimate > 0.1 * tol * objective.clamp_min(1e-300))
            if not live.any():
                break
        precondition.prepare(active, weights, cost_value)
        hessian = _Hessian(z, active_cost)
        direction, scores_d, iterations = _pcg(hessian, precondition, -gradient, live, _CG_TOL, max_cg)
        cg_total += iterations
        keep = live.unsqueeze(1)
        direction, scores_d = direction * keep, scores_d * keep
        step = _line_search(v, direction, scores, scores_d, labels, cost)
        v = v + step.unsqueeze(1) * direction
        scores = scores + step.unsqueeze(1) * scores_d
        # Newton decrement: -g·d / 2 estimates how far the objective was above its minimum.
        decrement = -0.5 * (gradient * direction).sum(1)
        live = live & (decrement > tol * objective.clamp_min(1e-300))
        if not live.any():
            break
    # Scores were updated incrementally from reduced-precision products: recompute them once.
    scores = (z @ v.to(z.dtype)).double()
    return _State(v, scores), steps, cg_total, int(live.sum())


def solve_cost_path(
    z: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, costs: Sequence[float], **options: Any
) -> list[CostSolution]:
    """Every column at every cost, in the order of ``costs`` (``options``: iter_cost_path's)."""
    solutions = dict(iter_cost_path(z, labels, weights, costs, **options))
    return [solutions[i] for i in range(len(costs))]


def iter_cost_path(
    z: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    costs: Sequence[float],
    *,
    tol: float = 1e-8,
    head: int = 128,
    max_newton: int = 60,
    max_cg: int = 300,
) -> Iterator[tuple[int, CostSolution]]:
    """Solve every column at every cost, one cost at a time in increasing order, yielding (index
    in ``costs``, solution): a caller that scores each cost at once holds one (N, m) β, not all.

    ``z``: (G, N, r) from :func:`eigen_embedding` or :class:`FeatureBasis`; ``labels``: (G, N, m)
    in {-1, +1}; ``weights``: (G, N, m) >= 0 (class weight x membership). Columns of group g share
    z[g].
    """
    if labels.shape != weights.shape or labels.shape[:2] != z.shape[:2]:
        raise ValueError(
            f"labels {tuple(labels.shape)} / weights {tuple(weights.shape)} do not fit z {tuple(z.shape)}"
        )
    if any(c <= 0 for c in costs):
        raise ValueError(f"costs must be positive, got {list(costs)}")
    labels = labels.double()
    weights = weights.double()
    precondition = _Preconditioner(z, min(head, z.shape[-1]))
    g, n, m = labels.shape
    state = _State(
        v=torch.zeros(g, z.shape[-1], m, dtype=torch.float64, device=z.device),
        scores=torch.zeros(g, n, m, dtype=torch.float64, device=z.device),
    )
    previous: float | None = None
    for index in sorted(range(len(costs)), key=lambda i: costs[i]):
        c = float(costs[index])
        cost = weights * c
        if previous is not None:
            state = _warm_start(state, c / previous, labels, cost)
        state, steps, iterations, unconverged = _newton(
            z, precondition, labels, weights, c, state, tol, max_newton, max_cg
        )
        slack = (1 - labels * state.scores).clamp_min(0)
        solution = CostSolution(
            cost=c,
            beta=2 * cost * slack * labels,
            objective=_objective(state.v, state.scores, labels, cost),
            newton_steps=steps,
            cg_iterations=iterations,
            unconverged=unconverged,
            v=state.v,
        )
        yield index, solution
        previous = c


def _warm_start(state: _State, ratio: float, labels: torch.Tensor, cost: torch.Tensor) -> _State:
    """Per column, the previous solution or that solution x the cost ratio, whichever has the
    lower objective (scores scale with v, so no matrix product is needed)."""
    scaled = _State(state.v * ratio, state.scores * ratio)
    better = _objective(scaled.v, scaled.scores, labels, cost) < _objective(
        state.v, state.scores, labels, cost
    )
    pick = better.unsqueeze(1)
    return _State(torch.where(pick, scaled.v, state.v), torch.where(pick, scaled.scores, state.scores))


def primal_objective(
    features: torch.Tensor, labels: torch.Tensor, cost: torch.Tensor, w: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """liblinear's primal objective ½(||w||² + b²) + Σ c_i max(0, 1 - y_i (w·x_i + b))², per column.

    ``features`` (N, D), ``labels``/``cost`` (N, m), ``w`` (D, m), ``bias`` (m,): for checking
    any solver's solution (ours, sklearn's) on the same footing.
    """
    scores = features.double() @ w.double() + bias.double()
    slack = (1 - labels.double() * scores).clamp_min(0)
    return 0.5 * ((w.double() ** 2).sum(0) + bias.double() ** 2) + (cost.double() * slack * slack).sum(0)
