"""Conjugate gradient: non-convergence is reported, negative curvature is refused; PCG."""

from __future__ import annotations

import pytest
import torch
from test_arnoldi import mlp_hessian  # the dense Hessian of a small trained MLP

from infl import (
    Arnoldi,
    ConjugateGradient,
    DenseOperator,
    ExactHessian,
    InflWarning,
    InputError,
    LiSSA,
    NotPositiveDefiniteError,
)
from reference import rel_err


def test_cg_not_converged_warns_and_reports(hessian_problem):
    op, _, rhs = hessian_problem
    with pytest.warns(InflWarning, match="max_iter=1"):
        result = ConjugateGradient(max_iter=1, rtol=1e-12).solve(op, rhs)
    assert not result.converged
    assert result.iterations == 1
    assert result.trace.shape == (2, rhs.shape[0])


def test_cg_on_indefinite_operator_raises():
    op = DenseOperator(torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=torch.float64)))
    match = r"negative curvature.*UPPER bound on lambda_min.*LOWER bound on the damping needed"
    with pytest.raises(NotPositiveDefiniteError, match=match):
        ConjugateGradient().solve(op, torch.ones(3, dtype=torch.float64))
    # enough damping fixes it
    result = ConjugateGradient(damping=1.0).solve(op, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(result.value[0], 1 / torch.tensor([3.0, 2.0, 0.5]).double())


# ---------------------------------------------------------------- preconditioned CG


def test_pcg_with_arnoldi_takes_fewer_iterations_on_an_ill_conditioned_mlp_hessian():
    dense = mlp_hessian()
    evals = torch.linalg.eigvalsh(dense)
    damping = -float(evals[0]) + 1e-4 * float(evals[-1])
    kappa = float((evals[-1] + damping) / (evals[0] + damping))
    assert kappa >= 1e4
    op = DenseOperator(dense)
    rhs = torch.randn(3, op.size, dtype=torch.float64)
    exact = torch.linalg.solve(dense + damping * torch.eye(op.size).double(), rhs.T).T
    plain = ConjugateGradient(damping=damping, rtol=1e-10, max_iter=2000).solve(op, rhs)
    pcg_solver = ConjugateGradient(
        damping=damping, rtol=1e-10, max_iter=2000, preconditioner=Arnoldi(rank=20)
    )
    pcg = pcg_solver.solve(op, rhs)
    assert plain.converged
    assert pcg.converged
    assert float(pcg.residual_norms.max()) <= 1e-10  # the same tolerance, on the true residual
    assert pcg.iterations < 0.75 * plain.iterations, (pcg.iterations, plain.iterations)
    assert rel_err(pcg.value, exact) < 1e-7
    assert rel_err(plain.value, exact) < 1e-7
    assert pcg.info["iterations"] == pcg.iterations
    assert pcg.info["preconditioner"] == "Arnoldi"
    assert pcg.info["preconditioner_rank"] == 20
    assert pcg.info["preconditioner_complement"] is True  # switched on: M^-1 must be SPD
    assert plain.info["preconditioner"] is None


def test_pcg_with_the_exact_inverse_as_preconditioner_converges_in_one_iteration(hessian_problem):
    op, dense, rhs = hessian_problem
    result = ConjugateGradient(damping=0.1, rtol=1e-10, preconditioner=ExactHessian()).solve(
        op, rhs
    )
    expected = torch.linalg.solve(dense + 0.1 * torch.eye(5).double(), rhs.T).T
    assert result.iterations == 1
    assert rel_err(result.value, expected) < 1e-10


def test_pcg_with_damping_redamps_the_preconditioner_without_hvps(hessian_problem):
    op, dense, rhs = hessian_problem
    fitted = ConjugateGradient(damping=0.1, rtol=1e-10, preconditioner=Arnoldi(rank=2)).fit(op)
    assert fitted.preconditioner.info["num_hvps"] == 5  # krylov_dim capped at p = 5
    before = op.num_matvecs
    moved = fitted.with_damping(0.5)
    assert op.num_matvecs == before
    assert moved.preconditioner.damping == 0.5
    assert moved.preconditioner.basis is fitted.preconditioner.basis
    expected = torch.linalg.solve(dense + 0.5 * torch.eye(5).double(), rhs.T).T
    assert rel_err(moved.solve(rhs).value, expected) < 1e-8
    with pytest.raises(InputError, match="damping > 0"):
        fitted.with_damping(0.0)


@pytest.mark.parametrize(
    ("preconditioner", "match"),
    [
        (torch.eye(3), r"preconditioner must be an unfitted infl solver such as Arnoldi.*Tensor"),
        ("arnoldi", r"unfitted infl solver.*got str"),
        (ConjugateGradient(), r"iterative, not a fixed linear map.*Arnoldi\(rank=20\)"),
        (LiSSA(), r"iterative, not a fixed linear map"),
    ],
)
def test_pcg_refuses_a_preconditioner_that_is_not_a_direct_solver(preconditioner, match):
    with pytest.raises(InputError, match=match):
        ConjugateGradient(damping=0.1, preconditioner=preconditioner)


def test_pcg_refuses_a_fitted_solver_as_preconditioner(hessian_problem):
    op, _, _ = hessian_problem
    with pytest.raises(InputError, match=r"unfitted infl solver.*FittedArnoldi"):
        ConjugateGradient(damping=0.1, preconditioner=Arnoldi(rank=2).fit(op))


def test_pcg_with_arnoldi_needs_damping():
    with pytest.raises(InputError, match=r"Arnoldi preconditioner needs damping > 0.*Set damping"):
        ConjugateGradient(preconditioner=Arnoldi(rank=2))
