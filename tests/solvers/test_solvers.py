"""Every solver against torch.linalg.solve on the exact Hessian (float64)."""

from __future__ import annotations

import pytest
import torch

import reference
from infl import (
    ConjugateGradient,
    DenseOperator,
    ExactHessian,
    HessianOperator,
    IndexedData,
    InflWarning,
    LiSSA,
    ModelWrapper,
    NotPositiveDefiniteError,
    Objective,
    SolverDivergedError,
)


@pytest.fixture
def hessian_problem(logistic):
    wrapper = ModelWrapper(logistic.model, Objective("bce_with_logits", logistic.wd))
    op = HessianOperator(wrapper, IndexedData((logistic.x, logistic.y)), chunk_size=16)
    dense = reference.hessian(logistic.theta, logistic.x, logistic.y, logistic.wd)
    rhs = torch.randn(4, dense.shape[0], dtype=torch.float64)
    return op, dense, rhs


def _rel_err(got, expected):
    return float((got - expected).norm() / expected.norm())


@pytest.mark.parametrize("damping", [0.0, 0.1])
@pytest.mark.parametrize(
    ("make_solver", "tol"),
    [
        (lambda d: ExactHessian(damping=d), 1e-6),
        (lambda d: ConjugateGradient(damping=d, rtol=1e-10), 1e-6),
        (lambda d: LiSSA(damping=d, scale="auto", depth=5000, rtol=1e-6), 1e-3),
    ],
    ids=["exact", "cg", "lissa"],
)
def test_solver_matches_linalg_solve(hessian_problem, make_solver, tol, damping):
    op, dense, rhs = hessian_problem
    eye = torch.eye(dense.shape[0], dtype=torch.float64)
    expected = torch.linalg.solve(dense + damping * eye, rhs.T).T
    result = make_solver(damping).solve(op, rhs)
    assert result.value.shape == rhs.shape
    assert result.converged
    assert _rel_err(result.value, expected) < tol
    assert float(result.residual_norms.max()) < max(tol, 1e-6)


def test_lissa_fixed_scale_with_enough_depth_is_accurate(hessian_problem):
    op, dense, rhs = hessian_problem
    top = float(torch.linalg.eigvalsh(dense)[-1])
    result = LiSSA(scale=top, depth=20000, rtol=1e-8).solve(op, rhs)
    assert _rel_err(result.value, torch.linalg.solve(dense, rhs.T).T) < 1e-3


def test_lissa_with_scale_far_below_top_eigenvalue_diverges(hessian_problem):
    op, dense, rhs = hessian_problem
    top = float(torch.linalg.eigvalsh(dense)[-1])
    with pytest.raises(SolverDivergedError, match=r"diverged at step \d+.*scale >="):
        LiSSA(scale=top / 10, depth=500).solve(op, rhs)


def test_lissa_too_shallow_fails_tolerance_and_warns(hessian_problem):
    op, _, rhs = hessian_problem
    with pytest.warns(InflWarning, match="increase depth"):
        result = LiSSA(scale="auto", depth=3, rtol=1e-6).solve(op, rhs)
    assert not result.converged
    assert float(result.residual_norms.max()) > 1e-6


def test_lissa_stochastic_minibatches_approximate_and_are_seeded(hessian_problem):
    op, dense, rhs = hessian_problem
    solver = LiSSA(damping=0.05, scale="auto", depth=300, repeats=4, batch_size=20, seed=3)
    with pytest.warns(InflWarning):
        a = solver.solve(op, rhs[:1])
    with pytest.warns(InflWarning):
        b = solver.solve(op, rhs[:1])
    torch.testing.assert_close(a.value, b.value)
    eye = torch.eye(dense.shape[0], dtype=torch.float64)
    expected = torch.linalg.solve(dense + 0.05 * eye, rhs[:1].T).T
    assert 1e-6 < _rel_err(a.value, expected) < 0.3


def test_cg_not_converged_warns_and_reports(hessian_problem):
    op, _, rhs = hessian_problem
    with pytest.warns(InflWarning, match="max_iter=1"):
        result = ConjugateGradient(max_iter=1, rtol=1e-12).solve(op, rhs)
    assert not result.converged
    assert result.iterations == 1
    assert result.trace.shape == (2, rhs.shape[0])


def test_cg_on_indefinite_operator_raises():
    op = DenseOperator(torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=torch.float64)))
    match = r"negative curvature.*at most -[0-9.]+.*damping"
    with pytest.raises(NotPositiveDefiniteError, match=match):
        ConjugateGradient().solve(op, torch.ones(3, dtype=torch.float64))
    # enough damping fixes it
    result = ConjugateGradient(damping=1.0).solve(op, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(result.value[0], 1 / torch.tensor([3.0, 2.0, 0.5]).double())


def test_exact_refuses_indefinite_with_the_fixing_damping():
    op = DenseOperator(torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=torch.float64)))
    match = r"smallest eigenvalue of H is -0\.5.*> 0\.5"
    with pytest.raises(NotPositiveDefiniteError, match=match):
        ExactHessian().fit(op)
    fitted = ExactHessian(damping=0.6).fit(op)
    assert fitted.info["num_negative"] == 1
    assert fitted.info["min_eigenvalue"] == pytest.approx(-0.5)


def test_exact_pseudo_inverse_inverts_nonzero_eigenvalues():
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    evals = torch.tensor([-1.0, 0.0, 2.0, 4.0], dtype=torch.float64)
    matrix = q @ torch.diag(evals) @ q.T
    rhs = torch.randn(2, 4, dtype=torch.float64)
    result = ExactHessian(pseudo_inverse=True).solve(DenseOperator(matrix), rhs)
    torch.testing.assert_close(result.value, rhs @ torch.linalg.pinv(matrix).T)
    assert result.info["num_inverted"] == 3


def test_exact_refuses_too_many_parameters():
    op = DenseOperator(torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_params=4"):
        ExactHessian(max_params=4).fit(op)


@pytest.mark.parametrize(
    "make_solver",
    [ExactHessian, ConjugateGradient, lambda: LiSSA(depth=3000)],
    ids=["exact", "cg", "lissa"],
)
def test_inverse_hvp_is_linear_in_rhs(hessian_problem, make_solver):
    op, _, rhs = hessian_problem
    fitted = make_solver().fit(op)
    combo = 2.0 * rhs[0] - 3.0 * rhs[1]
    lhs = fitted.solve(combo).value[0]
    parts = fitted.solve(rhs[:2]).value
    torch.testing.assert_close(lhs, 2.0 * parts[0] - 3.0 * parts[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "make_solver",
    [ExactHessian, ConjugateGradient, lambda damping: LiSSA(damping=damping, rtol=1e-9)],
    ids=["exact", "cg", "lissa"],
)
def test_large_damping_tends_to_v_over_lambda(hessian_problem, make_solver):
    op, _, rhs = hessian_problem
    lam = 1e6
    value = make_solver(damping=lam).solve(op, rhs).value
    torch.testing.assert_close(value * lam, rhs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: ConjugateGradient(damping=-1.0), "damping"),
        (lambda: ConjugateGradient(max_iter=0), "max_iter"),
        (lambda: ConjugateGradient(rtol=0.0, atol=0.0), "rtol"),
        (lambda: LiSSA(depth=0), "depth"),
        (lambda: LiSSA(scale=-2.0), "scale"),
        (lambda: LiSSA(scale="big"), "scale"),
        (lambda: LiSSA(repeats=1.5), "repeats"),
        (lambda: ExactHessian(damping=float("nan")), "damping"),
    ],
)
def test_invalid_hyperparameters_are_refused_at_construction(factory, match):
    from infl import InputError

    with pytest.raises(InputError, match=match):
        factory()


def test_rhs_shape_is_checked(hessian_problem):
    from infl import InputError

    op, _, _ = hessian_problem
    with pytest.raises(InputError, match=r"shape \[k, p=5\]"):
        ConjugateGradient().solve(op, torch.ones(2, 7, dtype=torch.float64))
