"""Solver advice from the spectrum: damping, LiSSA scale/depth, and the solvers' messages."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from infl import ExactHessian, LiSSA, Objective
from infl.data import IndexedData
from infl.diagnostics import advise, hessian_spectrum, lissa_contraction, lissa_depth
from infl.errors import InflWarning, InputError, NotPositiveDefiniteError, SolverDivergedError
from infl.model import ModelWrapper
from infl.operators import HessianOperator
from problems import planted

F64 = torch.float64


def rhs(p: int, k: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=F64)


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((torch.linalg.vector_norm(x - ref, dim=1) / ref.norm(dim=1)).max())


INDEFINITE = torch.cat(
    [torch.tensor([-0.7, -0.2], dtype=F64), torch.linspace(0.05, 8.0, 38, dtype=F64)]
)


def test_min_damping_is_the_smallest_that_makes_h_positive_definite():
    op = planted(INDEFINITE)
    adv = advise(op)
    assert adv.exact
    assert adv.min_damping == pytest.approx(0.7, rel=1e-10)
    assert adv.suggested_damping == pytest.approx(0.7 + 1e-3 * 8.0, rel=1e-10)
    assert adv.damping == adv.suggested_damping  # the advice is for the suggested damping
    b = rhs(40)
    ExactHessian(damping=adv.suggested_damping).solve(op, b)  # positive definite: no error
    with pytest.raises(NotPositiveDefiniteError):
        ExactHessian(damping=0.99 * adv.min_damping).fit(op)


def test_positive_definite_hessian_needs_no_damping():
    adv = advise(planted(torch.linspace(0.5, 4.0, 10, dtype=F64)))
    assert adv.min_damping == 0.0
    assert adv.suggested_damping == 0.0
    assert adv.condition_number == pytest.approx(8.0)
    assert adv.cg_iterations is not None


@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_lissa_with_advised_scale_and_depth_meets_tol_against_linalg_solve(tol):
    op = planted(INDEFINITE)
    adv = advise(op, damping=1.0, tol=tol)
    assert adv.scale == pytest.approx(1.2 * adv.mu_max)
    assert adv.depth is not None
    b = rhs(40)
    a = op.to_dense() + torch.eye(40, dtype=F64)
    exact = torch.linalg.solve(a, b.T).T
    # With early stopping on the residual (rtol = tol), the residual meets tol and the error
    # meets kappa * tol (||e||/||x|| <= kappa ||r||/||b||).
    result = LiSSA.advised(adv).solve(op, b)
    assert result.converged
    residual = torch.linalg.vector_norm(b - result.value @ a, dim=1) / b.norm(dim=1)
    assert float(residual.max()) <= tol
    assert rel_error(result.value, exact) <= adv.condition_number * tol
    # Run to the full advised depth, the error itself meets tol: rho^depth <= tol.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InflWarning)  # rtol=1e-300 never "converges"
        full = LiSSA.advised(adv, rtol=1e-300).solve(op, b)
    assert full.iterations == adv.depth
    assert rel_error(full.value, exact) <= tol
    # The advised depth is the bound for the slowest eigendirection, not a loose guess:
    # a third of it leaves an error far above tol, and the warning quotes the depth needed.
    shallow = LiSSA(damping=1.0, scale=adv.scale, depth=adv.depth // 3, rtol=tol)
    with pytest.warns(InflWarning, match="needs depth >="):
        short = shallow.solve(op, b)
    assert rel_error(short.value, exact) > 10 * tol


def test_depth_formula_matches_the_small_ratio_approximation():
    depth = lissa_depth(0.01, 10.0, 12.0, 1e-4)
    assert depth is not None
    approx = (12.0 / 0.01) * math.log(1e4)
    assert depth == pytest.approx(approx, rel=1e-3)
    assert lissa_contraction(0.01, 10.0, 4.0) == pytest.approx(1.5)
    assert lissa_depth(0.01, 10.0, 4.0, 1e-4) is None  # scale < lambda_max / 2
    assert lissa_depth(-0.1, 10.0, 12.0, 1e-4) is None  # indefinite


def test_half_the_advised_scale_does_not_converge():
    op = planted(torch.linspace(0.5, 10.0, 30, dtype=F64))
    b = rhs(30)
    # scale_margin=1 advises scale = lambda_max: half of it sits exactly on the divergence
    # boundary lambda_max/2, where the top eigendirection never shrinks.
    adv = advise(op, scale_margin=1.0, tol=1e-6)
    assert adv.scale == pytest.approx(10.0)
    half = LiSSA(scale=adv.scale / 2, depth=adv.depth, rtol=1e-6)
    with pytest.warns(InflWarning):
        result = half.solve(op, b)
    assert not result.converged
    # Any scale below the advised lower bound lambda_max/2 diverges, and the error says why.
    with pytest.raises(SolverDivergedError, match=r"increase `scale` above the top eigenvalue"):
        LiSSA(scale=0.9 * adv.scale_lower_bound, depth=adv.depth).solve(op, b)
    # The default advice (1.2 lambda_max) halved still diverges below the bound for margin < 1.
    adv12 = advise(op)
    with pytest.raises(SolverDivergedError, match=r"~= 10\b"):
        LiSSA(scale=0.45 * adv12.scale / 1.2, depth=500).solve(op, b)


def test_lissa_divergence_message_quotes_the_damping_for_an_indefinite_hessian():
    op = planted(INDEFINITE)
    with pytest.raises(SolverDivergedError, match=r"increase damping above 0\.7"):
        LiSSA(scale=10.0, depth=5000).solve(op, rhs(40))


def test_auto_scale_refuses_a_negative_definite_operator():
    op = planted(-torch.linspace(1.0, 2.0, 10, dtype=F64))
    with pytest.raises(NotPositiveDefiniteError, match="damping > 2"):
        LiSSA(scale="auto").fit(op)


def test_auto_scale_agrees_with_advice():
    op = planted(torch.linspace(0.5, 10.0, 30, dtype=F64))
    fitted = LiSSA(scale="auto").fit(op)
    assert fitted.scale == pytest.approx(advise(op).scale, rel=1e-6)


def test_advice_for_an_indefinite_damping_has_no_depth():
    adv = advise(planted(INDEFINITE), damping=0.1)
    assert not adv.positive_definite
    assert adv.depth is None
    assert math.isinf(adv.condition_number)
    assert "indefinite" in adv.summary()
    with pytest.raises(InputError, match=r"damping > 0\.7"):
        LiSSA.advised(adv)


def test_advice_from_a_damped_spectrum_recovers_h():
    op = planted(INDEFINITE)
    spec = hessian_spectrum(op, damping=2.0)
    adv = advise(spec)
    assert adv.hessian_min == pytest.approx(-0.7)
    assert adv.min_damping == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"tol": 0.0}, "tol"), ({"scale_margin": 0.5}, "scale_margin"), ({"damping": -1.0}, "damp")],
)
def test_advise_rejects_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        advise(planted(torch.ones(3, dtype=F64)), **kwargs)


def test_advice_on_a_trained_mlp_hessian_meets_tol():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64).eval()
    x, y = torch.randn(30, 3, dtype=F64), torch.randint(0, 2, (30,))
    op = HessianOperator(ModelWrapper(model, Objective("cross_entropy")), IndexedData((x, y)))
    adv = advise(op, tol=1e-3, damping=0.5)  # a random net is indefinite: damp it
    assert adv.positive_definite
    assert adv.depth is not None
    b = rhs(op.size, k=2)
    dense = op.to_dense() + adv.damping * torch.eye(op.size, dtype=F64)
    exact = torch.linalg.solve(dense, b.T).T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InflWarning)
        full = LiSSA.advised(adv, rtol=1e-300).solve(op, b)
    assert rel_error(full.value, exact) <= 1e-3
