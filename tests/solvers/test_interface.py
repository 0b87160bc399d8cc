"""What every solver shares, checked on each: torch.linalg.solve on the exact Hessian (float64),
linearity, the large-damping limit, validation, ``info`` and ``with_damping``."""

from __future__ import annotations

import pytest
import torch

from infl import (
    ConjugateGradient,
    ExactHessian,
    InputError,
    LiSSA,
)
from reference import rel_err


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
    assert rel_err(result.value, expected) < tol
    assert float(result.residual_norms.max()) < max(tol, 1e-6)


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
    with pytest.raises(InputError, match=match):
        factory()


def test_rhs_shape_is_checked(hessian_problem):
    op, _, _ = hessian_problem
    with pytest.raises(InputError, match=r"shape \[k, p=5\]"):
        ConjugateGradient().solve(op, torch.ones(2, 7, dtype=torch.float64))


SOLVERS = {
    "exact": lambda d: ExactHessian(damping=d),
    "cg": lambda d: ConjugateGradient(damping=d, rtol=1e-10),
    "lissa": lambda d: LiSSA(damping=d, scale="auto", depth=5000, rtol=1e-8),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_with_damping_equals_a_refit_at_the_new_damping(hessian_problem, name):
    op, dense, rhs = hessian_problem
    fitted = SOLVERS[name](0.01).fit(op)
    fitted.solve(rhs)  # the first fit's work is done; re-damping must not redo it
    before = op.num_matvecs
    moved = fitted.with_damping(0.5)
    if name != "cg":  # CG's fit is free; exact and LiSSA(auto) keep their spectra
        assert op.num_matvecs == before
    assert moved.damping == 0.5
    assert moved.solver == SOLVERS[name](0.5)
    eye = torch.eye(dense.shape[0], dtype=torch.float64)
    expected = torch.linalg.solve(dense + 0.5 * eye, rhs.T).T
    refit = SOLVERS[name](0.5).fit(op).solve(rhs).value
    got = moved.solve(rhs).value
    torch.testing.assert_close(got, refit, rtol=1e-6, atol=1e-9)
    assert rel_err(got, expected) < 1e-6


@pytest.mark.parametrize("name", list(SOLVERS))
def test_info_names_the_solver_and_damping_and_reaches_results(hessian_problem, name):
    op, _, rhs = hessian_problem
    fitted = SOLVERS[name](0.2).fit(op)
    assert fitted.info["solver"] == type(fitted.solver).__name__
    assert fitted.info["damping"] == 0.2
    result = fitted.solve(rhs)
    assert result.info.items() >= fitted.info.items()


def test_with_damping_rejects_a_negative_damping(hessian_problem):
    op, _, _ = hessian_problem
    with pytest.raises(InputError, match="damping"):
        ExactHessian().fit(op).with_damping(-1.0)
