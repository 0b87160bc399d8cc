"""Arnoldi (Lanczos eigenpairs, low-rank inverse): planted spectra, the exact limit, a real
Hessian, negative eigenvalues, damping at solve time and bad input."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from infl import (
    Arnoldi,
    ExactHessian,
    HessianOperator,
    IndexedData,
    InflWarning,
    InputError,
    ModelWrapper,
    NotPositiveDefiniteError,
    Objective,
)
from infl.operators import DenseOperator
from infl.spectral.lanczos import lanczos
from reference import rel_err


def planted(eigenvalues: torch.Tensor, seed: int = 0) -> tuple[DenseOperator, torch.Tensor]:
    """``Q diag(mu) Q^T`` with a random orthogonal ``Q`` (columns = eigenvectors)."""
    gen = torch.Generator().manual_seed(seed)
    p = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    return DenseOperator((q * eigenvalues) @ q.T), q


@functools.cache
def mlp_hessian() -> torch.Tensor:
    """The dense Hessian of a briefly trained 4-8-3 tanh MLP (p = 67, float64, indefinite)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(80, 4, generator=gen, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=1e-3)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    wrapper = ModelWrapper(model, Objective("cross_entropy", 1e-3))
    return HessianOperator(wrapper, IndexedData((x, y))).to_dense()


# ---------------------------------------------------------------- the Lanczos it builds on


def test_lanczos_returns_ritz_vectors_only_when_asked():
    mu = torch.logspace(2, -2, 24, dtype=torch.float64)
    op, q = planted(mu)
    plain = lanczos(op, k=3, which="both", tol=1e-10)
    assert plain.largest_vectors is None
    assert plain.smallest_vectors is None
    res = lanczos(op, k=3, which="both", tol=1e-10, return_vectors=True)
    torch.testing.assert_close(res.largest, plain.largest)  # the same run
    for values, vectors in [
        (res.largest, res.largest_vectors),
        (res.smallest, res.smallest_vectors),
    ]:
        assert vectors is not None
        assert vectors.shape == (3, 24)
        torch.testing.assert_close(vectors @ vectors.T, torch.eye(3, dtype=torch.float64))
        residual = op.matmat(vectors) - values[:, None] * vectors
        assert float(residual.norm(dim=1).max()) < 1e-8
    # the top Ritz vector is the top eigenvector up to sign
    assert abs(float(res.largest_vectors[0] @ q[:, 0])) == pytest.approx(1.0, abs=1e-10)


# ---------------------------------------------------------------- accuracy


def test_recovers_the_top_eigenvalues_of_a_planted_spectrum():
    mu = torch.logspace(2, -3, 60, dtype=torch.float64)
    op, q = planted(mu)
    fitted = Arnoldi(rank=8).fit(op)
    torch.testing.assert_close(fitted.eigenvalues, mu[:8], rtol=1e-8, atol=0)
    # the basis spans the top-8 eigenvectors
    overlap = fitted.basis @ q[:, :8]
    torch.testing.assert_close(overlap.abs().max(dim=1).values, torch.ones(8).double())
    info = fitted.info
    assert info["rank"] == 8
    assert info["krylov_dim"] == 28 == info["lanczos_iterations"] == info["num_hvps"]
    assert info["num_negative_dropped"] == 0
    assert info["max_eigenvalue"] == pytest.approx(100.0)
    assert info["ritz_residual_rel_max"] < 1e-8


def test_full_rank_is_the_exact_inverse():
    mu = torch.linspace(0.1, 5.0, 30, dtype=torch.float64)
    op, _ = planted(mu, seed=3)
    rhs = torch.randn(4, 30, dtype=torch.float64)
    fitted = Arnoldi(rank=30, krylov_dim=30, damping=0.05).fit(op)
    exact = torch.linalg.solve(op.matrix + 0.05 * torch.eye(30, dtype=torch.float64), rhs.T).T
    result = fitted.solve(rhs)
    assert result.converged
    assert result.iterations == 0
    assert rel_err(result.value, exact) < 1e-8
    assert fitted.low_rank() is not None


def test_error_falls_as_rank_grows_on_a_real_hessian():
    dense = mlp_hessian()
    op = DenseOperator(dense)  # the HVPs themselves are tested elsewhere; this saves time
    p = op.size
    damping = 0.05 + max(0.0, -float(torch.linalg.eigvalsh(dense)[0]))
    rhs = torch.randn(3, p, dtype=torch.float64)
    exact = torch.linalg.solve(dense + damping * torch.eye(p).double(), rhs.T).T
    errors = []
    for rank in (2, 8, 20, 40):
        fitted = Arnoldi(rank=rank, damping=damping, complement=True).fit(op)
        errors.append(rel_err(fitted.solve(rhs).value, exact))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.6 * errors[0], errors
    # without the complement the dropped directions count in full, but the trend is the same
    plain = [
        rel_err(Arnoldi(rank=r, damping=damping).fit(op).solve(rhs).value, exact) for r in (2, 20)
    ]
    assert plain[1] < plain[0], plain


def test_matches_its_formula_with_and_without_complement(hessian_problem):
    op, dense, rhs = hessian_problem
    lam = 0.2
    plain = Arnoldi(rank=2, damping=lam).fit(op)
    comp = Arnoldi(rank=2, damping=lam, complement=True).fit(op)
    u, mu = plain.basis, plain.eigenvalues
    low = ((rhs @ u.T) / (mu + lam)) @ u
    torch.testing.assert_close(plain.solve(rhs).value, low)
    torch.testing.assert_close(comp.solve(rhs).value, low + (rhs - (rhs @ u.T) @ u) / lam)
    # the kept pairs are H's top two (p = 5, Krylov space = everything)
    torch.testing.assert_close(mu, torch.linalg.eigvalsh(dense).flip(0)[:2])
    # low_rank() is exactly what solve applies; the complement is not low-rank
    basis, weights = plain.low_rank()
    assert basis is u
    torch.testing.assert_close(weights, 1 / (mu + lam))
    assert comp.low_rank() is None
    assert ExactHessian().fit(op).low_rank() is None
    # residuals cost HVPs, so they are only measured on request
    assert torch.isnan(plain.solve(rhs).residual_norms).all()
    checked = Arnoldi(rank=2, damping=lam, check_residuals=True).fit(op).solve(rhs)
    expected = (low @ (dense + lam * torch.eye(5).double()) - rhs).norm(dim=1) / rhs.norm(dim=1)
    torch.testing.assert_close(checked.residual_norms, expected)


def test_complement_is_exact_in_the_limit_of_a_negligible_discarded_spectrum():
    # ten large eigenvalues and 190 of size delta << lambda: the top ten are found to
    # round-off, and the complement's only error is 1/lambda in place of 1/(delta + lambda)
    lam = 0.1
    rhs = torch.randn(3, 200, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    errors = {}
    for delta in (1e-3, 1e-5):
        mu = torch.cat([torch.logspace(1, 0, 10, dtype=torch.float64), torch.full((190,), delta)])
        op, _ = planted(mu.double())
        exact = torch.linalg.solve(op.matrix + lam * torch.eye(200).double(), rhs.T).T
        plain = Arnoldi(rank=10, krylov_dim=40, damping=lam).fit(op).solve(rhs).value
        comp = Arnoldi(rank=10, krylov_dim=40, damping=lam, complement=True).fit(op)
        errors[delta] = rel_err(comp.solve(rhs).value, exact)
        assert rel_err(plain, exact) > 0.9  # most of b lies outside the top ten
        assert errors[delta] <= 1.1 * delta / lam, errors  # |1/lam - 1/(delta+lam)| * lam
    assert errors[1e-5] < 0.02 * errors[1e-3]


def test_large_damping_with_complement_tends_to_v_over_lambda(hessian_problem):
    op, _, rhs = hessian_problem
    value = Arnoldi(rank=2, damping=1e6, complement=True).fit(op).solve(rhs).value
    torch.testing.assert_close(value * 1e6, rhs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- negatives and damping


def test_negative_eigenvalues_are_dropped_and_counted():
    mu = torch.tensor([10.0, 8.0, -6.0, 5.0, -4.0, 3.0, 1.0, 0.5], dtype=torch.float64)
    op, _ = planted(mu)
    fitted = Arnoldi(rank=3, damping=0.1).fit(op)
    torch.testing.assert_close(fitted.eigenvalues, torch.tensor([10.0, 8.0, 5.0]).double())
    assert fitted.info["num_negative_dropped"] == 1  # -6 is among the 3 largest |mu|
    assert fitted.info["num_negative_ritz"] == 2
    magnitude = Arnoldi(rank=3, damping=0.1, keep="magnitude").fit(op)
    torch.testing.assert_close(magnitude.eigenvalues, torch.tensor([10.0, 8.0, -6.0]).double())
    assert magnitude.info["num_negative_dropped"] == 0
    # asking for more positive pairs than exist keeps what there is, and says so
    with pytest.warns(InflWarning, match=r"kept 6 eigenpairs instead of rank=7.*not positive"):
        fewer = Arnoldi(rank=7, damping=0.1).fit(op)
    assert fewer.info["rank"] == 6


def test_damping_that_cancels_a_kept_eigenvalue_is_refused():
    op, _ = planted(torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64))
    with pytest.raises(NotPositiveDefiniteError, match="damping"):
        Arnoldi(rank=3, damping=1.0, keep="magnitude").fit(op)


def test_with_damping_equals_a_refit_and_costs_no_hvp(hessian_problem):
    op, _, rhs = hessian_problem
    fitted = Arnoldi(rank=3, damping=0.1).fit(op)
    before = op.num_matvecs
    moved = fitted.with_damping(0.7)
    after = op.num_matvecs
    value = moved.solve(rhs).value
    assert op.num_matvecs == after == before  # neither re-damping nor solving takes an HVP
    refit = Arnoldi(rank=3, damping=0.7).fit(op)
    torch.testing.assert_close(value, refit.solve(rhs).value, rtol=1e-12, atol=1e-14)
    assert moved.damping == 0.7
    assert moved.basis is fitted.basis
    comp = Arnoldi(rank=3, damping=0.1, complement=True).fit(op)
    with pytest.raises(InputError, match=r"complement=True.*damping > 0"):
        comp.with_damping(0.0)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: Arnoldi(rank=0), "rank must be a positive integer"),
        (lambda: Arnoldi(rank=-3), "rank must be a positive integer"),
        (lambda: Arnoldi(rank=2.5), "rank must be a positive integer"),
        (lambda: Arnoldi(rank=10, krylov_dim=5), r"krylov_dim=5 is smaller than rank=10.*>= rank"),
        (lambda: Arnoldi(rank=2, complement=True), r"needs damping > 0.*Set damping > 0"),
        (lambda: Arnoldi(rank=2, keep="largest"), "keep must be 'positive' or 'magnitude'"),
        (lambda: Arnoldi(rank=2, damping=-1.0), "damping"),
    ],
)
def test_bad_hyperparameters_are_refused_at_construction(factory, match):
    with pytest.raises(InputError, match=match):
        factory()


def test_rank_above_p_is_refused_at_fit(hessian_problem):
    op, _, _ = hessian_problem
    with pytest.raises(InputError, match=r"rank=6 exceeds the number of parameters p=5.*<= 5"):
        Arnoldi(rank=6).fit(op)


def test_a_negative_definite_operator_has_nothing_positive_to_keep():
    op, _ = planted(-torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    with pytest.raises(NotPositiveDefiniteError, match="keep='magnitude'"):
        Arnoldi(rank=2).fit(op)


def test_auto_damping_reads_the_fit_s_own_ritz_values_at_no_extra_hvp():
    mu = torch.cat([torch.tensor([-0.8]), torch.linspace(0.1, 10.0, 79)]).double()
    op, _ = planted(mu)
    fitted = Arnoldi(rank=5, krylov_dim=60, damping="auto").fit(op)
    assert fitted.info["num_hvps"] == 60  # the one Lanczos run of the fit
    assert fitted.damping > 0.8  # above -lambda_min(H): H + damping*I positive definite
    info = fitted.info
    assert info["damping_auto"]
    assert info["damping_min_eigenvalue"] >= float(mu.min()) - 1e-8
    assert info["damping_max_eigenvalue"] == pytest.approx(10.0, rel=1e-6)
    b = torch.randn(3, 80, dtype=torch.float64)
    coeffs = b @ fitted.basis.T
    torch.testing.assert_close(
        fitted.solve(b).value, (coeffs / (fitted.eigenvalues + fitted.damping)) @ fitted.basis
    )


def test_auto_damping_with_complement_is_positive_on_a_positive_definite_hessian():
    op, _ = planted(torch.linspace(1.0, 2.0, 30).double())
    fitted = Arnoldi(rank=3, damping="auto", complement=True).fit(op)
    assert fitted.damping == pytest.approx(1e-3 * 2.0, rel=1e-6)  # the floor: complement needs > 0
