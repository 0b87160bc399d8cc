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


def test_pcg_with_an_ekfac_preconditioner_reaches_the_exact_solution(hessian_problem):
    from infl import EKFAC

    op, dense, rhs = hessian_problem
    fitted = ConjugateGradient(damping=0.1, rtol=1e-10, preconditioner=EKFAC()).fit(op)
    assert fitted.info["preconditioner"] == "EKFAC"
    result = fitted.solve(rhs)
    expected = torch.linalg.solve(dense + 0.1 * torch.eye(5).double(), rhs.T).T
    assert result.converged
    assert rel_err(result.value, expected) < 1e-8


def test_pcg_with_damping_redamps_the_preconditioner_without_hvps(hessian_problem):
    op, dense, rhs = hessian_problem
    fitted = ConjugateGradient(damping=0.1, rtol=1e-10, preconditioner=Arnoldi(rank=2)).fit(op)
    assert op.num_matvecs == 5  # p = 5: the dense assembly (dense="auto") or krylov_dim = p
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


# ---------------------------------------------------------------- damping="auto"


def _indefinite(p: int = 200, lam_min: float = -0.6, seed: int = 0):
    """``Q diag(mu) Q^T`` with mu = [lam_min, -0.3, -0.05, logspace(-2, 1)]: indefinite."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    mu = torch.cat([torch.tensor([lam_min, -0.3, -0.05]), torch.logspace(-2, 1, p - 3)]).double()
    return DenseOperator((q * mu) @ q.T), q, mu


def test_auto_damping_makes_cg_converge_where_a_small_damping_fails():
    op, _, mu = _indefinite()
    rhs = torch.randn(3, op.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(NotPositiveDefiniteError, match="LOWER bound on the damping needed"):
        ConjugateGradient(damping=0.01, max_iter=500).solve(op, rhs)
    fitted = ConjugateGradient(damping="auto", max_iter=500).fit(op)
    lam = fitted.damping
    assert isinstance(lam, float)
    assert lam > -float(mu.min())
    info = fitted.info
    assert info["damping"] == lam
    assert info["damping_auto"] is True
    assert info["damping_min_eigenvalue"] >= float(mu.min()) - 1e-8  # Lanczos: an upper bound
    assert info["damping_margin"] == 0.5
    assert "theta_min" in info["damping_rule"]
    assert info["damping_attempts"] == []
    result = fitted.solve(rhs)
    assert result.converged
    assert result.info["damping"] == lam
    expected = torch.linalg.solve(op.matrix + lam * torch.eye(op.size, dtype=torch.float64), rhs.T)
    assert rel_err(result.value, expected.T) < 1e-5


def test_auto_damping_raises_on_negative_curvature_lanczos_missed_and_keeps_it():
    # the negative eigenvector is orthogonal to Lanczos's start vector, so the estimate misses it
    p = 120
    start = torch.randn(
        p, generator=torch.Generator(device="cpu").manual_seed(0), dtype=torch.float64
    )
    gen = torch.Generator().manual_seed(5)
    basis = torch.cat([start[None] / start.norm(), torch.randn(p - 1, p, generator=gen).double()])
    q, _ = torch.linalg.qr(basis.T)  # column 0 is +-start; column 1 is orthogonal to it
    mu = torch.linspace(0.5, 5.0, p, dtype=torch.float64)
    mu[1] = -1.0
    op = DenseOperator((q * mu) @ q.T)
    fitted = ConjugateGradient(damping="auto", max_iter=400).fit(op)
    assert fitted.damping < 1.0  # the estimate missed lambda_min = -1
    rhs = q[:, 1][None] + 0.1 * q[:, 5][None]
    with pytest.warns(InflWarning, match="met negative curvature.*Raised damping"):
        result = fitted.solve(rhs)
    assert result.converged
    attempts = result.info["damping_attempts"]
    assert 1 <= len(attempts) <= 4
    assert attempts[0]["rayleigh"] <= 0
    assert fitted.damping > 1.0
    assert result.info["damping"] == fitted.damping
    expected = torch.linalg.solve(op.matrix + fitted.damping * torch.eye(p).double(), rhs.T).T
    assert rel_err(result.value, expected) < 1e-5
    again = fitted.solve(rhs)  # later solves stay at the raised damping, no new attempt
    assert len(again.info["damping_attempts"]) == len(attempts)


def test_auto_damping_gives_up_after_the_retries_naming_the_next_step(monkeypatch):
    import infl.solvers.cg as cg_module

    monkeypatch.setattr(cg_module, "AUTO_DAMPING_RETRIES", 0)
    p = 60
    start = torch.randn(
        p, generator=torch.Generator(device="cpu").manual_seed(0), dtype=torch.float64
    )
    basis = torch.cat([start[None] / start.norm(), torch.randn(p - 1, p).double()])
    q, _ = torch.linalg.qr(basis.T)
    mu = torch.linspace(0.5, 5.0, p, dtype=torch.float64)
    mu[1] = -1.0
    fitted = ConjugateGradient(damping="auto").fit(DenseOperator((q * mu) @ q.T))
    match = r"already raised the damping 0 times.*calc\.advise\(\).*at least [0-9.]+"
    with pytest.raises(NotPositiveDefiniteError, match=match):
        fitted.solve(q[:, 1])


def test_negative_curvature_message_says_the_bound_is_one_sided_and_what_to_run():
    op = DenseOperator(torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=torch.float64)))
    with pytest.raises(NotPositiveDefiniteError) as err:
        ConjugateGradient(damping=0.1).solve(op, torch.ones(3, dtype=torch.float64))
    text = str(err.value)
    for words in (
        "only an UPPER bound on lambda_min(H + damping*I)",
        "only a LOWER bound on the damping needed",
        "calc.advise()",
        "infl.diagnostics.advise(operator)",
        "damping='auto'",
    ):
        assert words in text


def test_with_damping_after_auto_sets_an_explicit_damping():
    op, _, _ = _indefinite(p=60)
    fitted = ConjugateGradient(damping="auto").fit(op)
    other = fitted.with_damping(2.0)
    assert other.damping == 2.0
    assert other.info["damping_auto"] is False
    assert other.solver.damping == 2.0


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: ConjugateGradient(damping="automatic"), r"got 'automatic'.*damping='auto'"),
        (lambda: ConjugateGradient(damping=-0.1), r"finite number >= 0 or 'auto', got -0\.1"),
        (lambda: ConjugateGradient(damping=None), r"or 'auto', got NoneType"),
        (lambda: ExactHessian(damping="Auto"), r"got 'Auto'"),
        (lambda: LiSSA(damping=-1.0), r"or 'auto', got -1\.0"),
    ],
)
def test_bad_damping_is_refused_naming_the_fix(factory, match):
    with pytest.raises(InputError, match=match):
        factory()


def test_kfac_refuses_auto_naming_heuristic():
    from infl import KFAC

    with pytest.raises(InputError, match=r"damping='auto' is not available.*'heuristic'"):
        KFAC(damping="auto")
