"""Breakdown-free block CG (``ConjugateGradient(block=True)``), checked in float64 against
``torch.linalg.solve`` on dense SPD matrices and on a damped Hessian."""

from __future__ import annotations

import warnings

import pytest
import torch

from infl import (
    Arnoldi,
    ConjugateGradient,
    DenseOperator,
    InflWarning,
    NotPositiveDefiniteError,
)
from infl.mixed_precision import MixedPrecisionOperator
from infl.solvers.base import relative_residuals, solver_from_spec, solver_spec
from infl.solvers.block_cg import orth
from reference import rel_err


def _spd(p: int, log_cond: float, seed: int = 0) -> torch.Tensor:
    """``Q diag(logspace(-log_cond, 0)) Q^T`` with a random orthogonal ``Q``."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    return (q * torch.logspace(-log_cond, 0, p, dtype=torch.float64)) @ q.T


def _exact(matrix: torch.Tensor, rhs: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    eye = torch.eye(matrix.shape[0], dtype=torch.float64)
    return torch.linalg.solve(matrix + damping * eye, rhs.T).T


def _rhs(k: int, p: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_block_cg_gives_the_exact_solution_and_plain_cgs_answer():
    matrix = _spd(80, 2)
    rhs = _rhs(5, 80)
    block = ConjugateGradient(rtol=1e-12, max_iter=500, block=True).solve(
        DenseOperator(matrix), rhs
    )
    plain = ConjugateGradient(rtol=1e-12, max_iter=500).solve(DenseOperator(matrix), rhs)
    assert block.converged
    assert block.info["iterations"] == block.iterations
    assert rel_err(block.value, _exact(matrix, rhs)) < 1e-10
    assert rel_err(block.value, plain.value) < 1e-10
    # the reported residuals (recursive) are the true ones, and within the tolerance
    true = relative_residuals(DenseOperator(matrix), block.value, rhs)
    assert float(block.residual_norms.max()) <= 1e-12
    torch.testing.assert_close(block.residual_norms, true, rtol=0, atol=1e-12)
    assert block.trace.shape == (block.iterations + 1, 5)
    torch.testing.assert_close(block.trace[-1], block.residual_norms)
    torch.testing.assert_close(block.trace[0], torch.ones(5, dtype=torch.float64))


def test_block_cg_on_a_damped_hessian(hessian_problem):
    op, dense, rhs = hessian_problem
    result = ConjugateGradient(damping=0.1, rtol=1e-12, max_iter=200, block=True).solve(op, rhs)
    assert result.converged
    assert rel_err(result.value, _exact(dense, rhs, 0.1)) < 1e-10


def test_block_cg_needs_far_fewer_iterations_than_independent_cg():
    # kappa = 1e3, p = 200, k = 8: the block Krylov space grows by 8 dimensions per iteration
    matrix = _spd(200, 3)
    rhs = _rhs(8, 200)
    op = DenseOperator(matrix)
    plain = ConjugateGradient(rtol=1e-10, max_iter=2000).solve(op, rhs)
    block = ConjugateGradient(rtol=1e-10, max_iter=2000, block=True).solve(op, rhs)
    assert plain.converged
    assert block.converged
    assert block.iterations * 3 <= plain.iterations  # measured: 45 against 276
    assert rel_err(block.value, _exact(matrix, rhs)) < 1e-9


@pytest.mark.parametrize("case", ["duplicated and zero", "k > p", "copy at 1e-6", "copy at 1e-9"])
def test_block_cg_on_rank_deficient_right_hand_sides_does_not_break_down(case):
    p = 30
    matrix = _spd(p, 2, seed=3)
    base = _rhs(3, p, seed=4)
    if case == "duplicated and zero":
        rhs = torch.cat([base, base, torch.zeros(1, p, dtype=torch.float64)])
    elif case == "k > p":
        rhs = _rhs(45, p, seed=5)
    else:  # 6 right-hand sides in a 3-dimensional space, and one nearly a copy
        mix = _rhs(3, 3, seed=6) @ base
        gap = float(case.removeprefix("copy at "))
        rhs = torch.cat([base, mix, base[:1] + gap * _rhs(1, p, seed=7)])
    result = ConjugateGradient(rtol=1e-10, max_iter=100, block=True).solve(
        DenseOperator(matrix), rhs
    )
    assert result.converged
    if case == "k > p":  # the first block spans the whole space: one iteration
        assert result.iterations == 1
    else:  # about as fast as the 3 independent ones alone (12 iterations; plain CG: 39)
        alone = ConjugateGradient(rtol=1e-10, max_iter=100, block=True).solve(
            DenseOperator(matrix), base
        )
        assert result.iterations <= 2 * alone.iterations  # measured: 20 (1e-6), 12 (1e-9)
    assert rel_err(result.value, _exact(matrix, rhs)) < 1e-9
    if case == "duplicated and zero":
        assert float(result.value[6].abs().max()) == 0.0
        assert float(result.residual_norms[6]) == 0.0


@pytest.mark.parametrize("shape", [(6, 500), (45, 30)])
def test_orth_spans_the_singular_vectors_above_the_deflation_threshold(shape):
    # w = U diag(sigma) V^T with sigma = 1, 1e-2, ..., 1e-10 (as many as fit): the rows kept are
    # orthonormal and span exactly the right singular vectors with sigma > rtol * sigma_max
    a, p = shape
    gen = torch.Generator().manual_seed(8)
    m = min(a, p, 6)
    u, _ = torch.linalg.qr(torch.randn(a, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(p, m, generator=gen, dtype=torch.float64))
    sigma = torch.logspace(0, -10, m, dtype=torch.float64)
    w = (u * sigma) @ v.T
    for rtol, expected in ((1e-5, 3), (1e-9, 5), (1e-12, 6)):
        rows = orth(w, rtol, max_rank=a)
        assert rows.shape == (expected, p)
        torch.testing.assert_close(rows @ rows.T, torch.eye(expected, dtype=torch.float64))
        top = v[:, :expected]  # determined to ~eps / sigma_min (both routes measured alike)
        tol = 100 * torch.finfo(torch.float64).eps / float(sigma[expected - 1])
        torch.testing.assert_close(rows.T @ (rows @ top), top, rtol=0, atol=tol)
    assert orth(w, 1e-12, max_rank=2).shape == (2, p)  # the two largest
    torch.testing.assert_close(orth(w, 1e-12, max_rank=2).abs(), v[:, :2].T.abs())
    assert orth(torch.zeros(a, p, dtype=torch.float64), 1e-8, a).shape == (0, p)


@pytest.mark.parametrize(
    ("sigma", "svd_taken"),
    [((1.0, 0.5, 0.3, 0.1), False), ((1.0, 1e-3, 1e-3, 1e-3), True)],
    ids=["plainly-full-rank", "bound-below-rtol"],
)
def test_orth_skips_the_svd_only_when_the_triangular_factor_proves_full_rank(
    monkeypatch, sigma, svd_taken
):
    # prod |R_ii| / ||R||_F^a is about 0.015 for the first spectrum and 1e-9 (< rtol = 1e-8)
    # for the second, whose rows are still of full rank (sigma_min / sigma_max = 1e-3)
    gen = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(50, 4, generator=gen, dtype=torch.float64))
    w = (u * torch.tensor(sigma, dtype=torch.float64)) @ v.T
    calls = [0]
    svd = torch.linalg.svd

    def counted(*args, **kwargs):
        calls[0] += 1
        return svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counted)
    rows = orth(w, 1e-8, max_rank=4)
    assert calls[0] == int(svd_taken)
    assert rows.shape == (4, 50)
    torch.testing.assert_close(rows @ rows.T, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close((w @ rows.T) @ rows, w, rtol=0, atol=1e-14)  # w's row space
    assert orth(w, 1e-8, max_rank=3).shape == (3, 50)  # truncated: the SVD chooses
    assert calls[0] == int(svd_taken) + 1


def test_a_converged_system_leaves_the_block():
    # b_0 an eigenvector: the first block contains the solution, so system 0 converges at
    # iteration 1; every later block has at most k - 1 = 3 directions and x_0 stays put
    p = 60
    gen = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    mu = torch.logspace(-2, 0, p, dtype=torch.float64)
    op = DenseOperator((q * mu) @ q.T)
    rhs = torch.cat([q[:, 10][None], _rhs(3, p, seed=12)])
    result = ConjugateGradient(rtol=1e-10, max_iter=200, block=True).solve(op, rhs)
    assert result.converged
    assert result.iterations >= 5
    assert float(result.trace[1, 0]) <= 1e-10
    torch.testing.assert_close(result.value[0], q[:, 10] / mu[10], rtol=1e-12, atol=0)
    assert result.info["true_residual_checked"]  # rtol 1e-10 < sqrt(eps): one more product
    assert op.num_matvecs <= 4 + 3 * (result.iterations - 1) + 4  # not 4 per iteration
    assert rel_err(result.value, _exact(op.matrix, rhs)) < 1e-9


def test_block_pcg_with_an_arnoldi_preconditioner():
    matrix = _spd(150, 4, seed=8)
    rhs = _rhs(6, 150, seed=9)
    op = DenseOperator(matrix)
    lam = 1e-3
    block = ConjugateGradient(damping=lam, rtol=1e-11, max_iter=500, block=True)
    pcg = ConjugateGradient(
        damping=lam, rtol=1e-11, max_iter=500, block=True, preconditioner=Arnoldi(rank=20)
    )
    plain = block.solve(op, rhs)
    pre = pcg.solve(op, rhs)
    assert plain.converged
    assert pre.converged
    assert pre.info["preconditioner"] == "Arnoldi"
    assert pre.iterations < plain.iterations
    assert rel_err(pre.value, _exact(matrix, rhs, lam)) < 1e-9
    assert float(relative_residuals(op.damped(lam), pre.value, rhs).max()) <= 2e-11


def test_block_cg_on_an_indefinite_operator_raises_with_a_negative_rayleigh_quotient():
    op = DenseOperator(torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=torch.float64)))
    rhs = torch.tensor([[1.0, 1.0, 1.0], [3.0, 1.0, 1.0], [1.0, 2.0, 5.0]], dtype=torch.float64)
    # three independent right-hand sides: the first block spans R^3, so the smallest eigenvalue
    # of P^T A P is lambda_min(A) itself
    match = r"iteration 1 .*= -0\.5 <= 0.*LOWER bound"
    with pytest.raises(NotPositiveDefiniteError, match=match):
        ConjugateGradient(block=True).solve(op, rhs)
    with pytest.raises(NotPositiveDefiniteError, match=r"iteration 2 .*= -0\.2 <= 0"):
        ConjugateGradient(block=True).solve(op, rhs[:2])  # two: a 2-D subspace first
    result = ConjugateGradient(damping=1.0, block=True).solve(op, rhs)
    torch.testing.assert_close(result.value, rhs / torch.tensor([3.0, 2.0, 0.5]).double())


def test_block_cg_with_auto_damping_raises_the_damping_on_negative_curvature():
    # the negative eigenvector is orthogonal to Lanczos's start vector, so the estimate misses it
    p = 120
    start = torch.randn(p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    basis = torch.cat([start[None] / start.norm(), _rhs(p - 1, p, seed=5)])
    q, _ = torch.linalg.qr(basis.T)
    mu = torch.linspace(0.5, 5.0, p, dtype=torch.float64)
    mu[1] = -1.0
    op = DenseOperator((q * mu) @ q.T)
    fitted = ConjugateGradient(damping="auto", max_iter=400, rtol=1e-10, block=True).fit(op)
    assert fitted.damping < 1.0  # the estimate missed lambda_min = -1
    rhs = torch.stack([q[:, 1] + 0.1 * q[:, 5], q[:, 7]])
    with pytest.warns(InflWarning, match="met negative curvature.*Raised damping"):
        result = fitted.solve(rhs)
    assert result.converged
    assert 1 <= len(result.info["damping_attempts"]) <= 4
    assert fitted.damping > 1.0
    assert rel_err(result.value, _exact(op.matrix, rhs, fitted.damping)) < 1e-9


def test_block_cg_not_converged_warns_and_reports():
    matrix = _spd(60, 4, seed=2)
    rhs = _rhs(4, 60, seed=3)
    with pytest.warns(InflWarning, match="block CG stopped at max_iter=2"):
        result = ConjugateGradient(rtol=1e-12, max_iter=2, block=True).solve(
            DenseOperator(matrix), rhs
        )
    assert not result.converged
    assert result.iterations == 2
    assert result.trace.shape == (3, 4)
    true = relative_residuals(DenseOperator(matrix), result.value, rhs)
    torch.testing.assert_close(result.residual_norms, true, rtol=1e-8, atol=0)


def test_block_cg_in_mixed_precision_refinement():
    matrix = _spd(60, 4)
    rhs = _rhs(5, 60)
    mixed = MixedPrecisionOperator(DenseOperator(matrix), DenseOperator(matrix.float()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", InflWarning)  # no fallback to float64 products
        result = ConjugateGradient(rtol=1e-10, max_iter=500, block=True).solve(mixed, rhs)
    assert result.converged
    assert result.info["refinement_steps"] >= 2
    assert float(relative_residuals(DenseOperator(matrix), result.value, rhs).max()) <= 1e-10
    assert rel_err(result.value, _exact(matrix, rhs)) < 1e-7


def test_block_is_left_out_of_the_spec_at_its_default() -> None:
    """Stores and saved fits written before the field existed hold specs without it: at the
    default the spec is unchanged, so they still match; block=True is recorded and restored."""
    plain = solver_spec(ConjugateGradient(damping=0.1))
    assert "block" not in plain["fields"]
    assert solver_from_spec(plain) == ConjugateGradient(damping=0.1)
    blocked = solver_spec(ConjugateGradient(damping=0.1, block=True))
    assert blocked["fields"]["block"] is True
    assert solver_from_spec(blocked) == ConjugateGradient(damping=0.1, block=True)
