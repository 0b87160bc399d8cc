"""Spectrum (dense and Lanczos), solver agreement and traces, against float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.func import functional_call

from infl import ConjugateGradient, ExactHessian, LiSSA, Objective
from infl.data import IndexedData
from infl.diagnostics import (
    compare_inverse_hvps,
    eigsh_extremes,
    hessian_spectrum,
    lanczos,
    lissa_trace,
    residual_trace,
    solver_agreement,
    spearman_rows,
)
from infl.errors import InflWarning, InputError
from infl.model import ModelWrapper
from infl.operators import DenseOperator, HessianOperator
from problems import planted

F64 = torch.float64


def tiny_mlp_problem(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], float]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64).eval()
    x = torch.randn(40, 4, dtype=F64)
    y = torch.randint(0, 3, (40,))
    return model, (x, y), 1e-3


def reference_hessian(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], wd: float):
    """Dense Hessian of mean CE + wd/2 ||theta||^2, by torch.func.hessian (independent path)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    x, y = data

    def objective(theta: torch.Tensor) -> torch.Tensor:
        params = {
            n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes, strict=True)
        }
        out = functional_call(model, params, (x,))
        return nn.functional.cross_entropy(out, y) + 0.5 * wd * (theta @ theta)

    return torch.func.hessian(objective)(flat)


@pytest.fixture(scope="module")
def mlp_hessian():
    model, data, wd = tiny_mlp_problem()
    op = HessianOperator(ModelWrapper(model, Objective("cross_entropy", wd)), IndexedData(data))
    dense = reference_hessian(model, data, wd)
    return op, dense


# ---------------------------------------------------------------- dense spectrum


def test_dense_spectrum_matches_eigvalsh_on_mlp_hessian(mlp_hessian):
    op, dense = mlp_hessian
    ref = torch.linalg.eigvalsh(dense)
    s = hessian_spectrum(op, method="dense")
    assert s.full
    assert s.method == "dense"
    assert s.size == op.size == ref.numel()
    scale = float(ref.abs().max())
    torch.testing.assert_close(s.eigenvalues, ref, rtol=1e-6, atol=1e-6 * scale)
    assert s.lambda_max == pytest.approx(float(ref[-1]), rel=1e-6)
    assert op.assembly is not None
    assert op.assembly.method == "closed-form"  # a plain nn.Sequential MLP: no product
    assert s.num_matvecs == 0


def test_damping_shifts_every_eigenvalue(mlp_hessian):
    op, dense = mlp_hessian
    ref = torch.linalg.eigvalsh(dense)
    s = hessian_spectrum(op, damping=0.25, method="dense")
    scale = float(ref.abs().max())
    torch.testing.assert_close(s.eigenvalues, ref + 0.25, rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close(s.hessian_eigenvalues, ref, rtol=1e-6, atol=1e-6 * scale)
    assert s.damping == 0.25


def test_counts_mass_and_condition_number_on_a_planted_spectrum():
    ev = torch.tensor([-2.0, -0.5, 0.0, 1e-20, 0.25, 1.0, 4.0], dtype=F64)
    s = hessian_spectrum(DenseOperator(torch.diag(ev)))
    assert s.num_negative == 2  # the exact zero and 1e-20 are "zero", not negative
    assert s.num_near_zero == 2
    assert s.negative_mass == pytest.approx(2.5)
    assert s.negative_mass_fraction == pytest.approx(2.5 / 7.75)
    assert math.isinf(s.condition_number)
    pd = hessian_spectrum(DenseOperator(torch.diag(ev)), damping=3.0)
    assert pd.num_negative == 0
    assert pd.condition_number == pytest.approx(7.0 / 1.0)
    assert "lambda_max = 7" in pd.summary()


def test_auto_picks_dense_for_small_and_lanczos_for_large():
    ev = torch.linspace(1.0, 2.0, 30, dtype=F64)
    assert hessian_spectrum(planted(ev)).method == "dense"
    assert hessian_spectrum(planted(ev), k=3, dense_max_params=10).method == "lanczos"


# ---------------------------------------------------------------- Lanczos


def planted_gapped(p: int = 400) -> tuple[torch.Tensor, DenseOperator]:
    top = torch.tensor([100.0, 70.0, 50.0, 40.0, 33.0], dtype=F64)
    bottom = torch.tensor([-6.0, -4.5, -3.0], dtype=F64)
    bulk = torch.linspace(0.0, 10.0, p - 8, dtype=F64)
    ev = torch.cat([top, bottom, bulk])
    return ev.sort().values, planted(ev, seed=1)


def test_lanczos_finds_the_planted_top_k_and_bottom_k():
    ev, op = planted_gapped()
    res = lanczos(op, k=5, which="largest", tol=1e-10)
    assert res.converged
    assert res.iterations < 100  # far fewer than p = 400 products
    torch.testing.assert_close(res.largest, ev[-5:].flip(0), rtol=1e-8, atol=0.0)
    low = lanczos(op, k=3, which="smallest", tol=1e-10)
    torch.testing.assert_close(low.smallest, ev[:3], rtol=1e-8, atol=0.0)
    assert bool((low.smallest_residuals <= 1e-10 * 100).all())


def test_lanczos_counts_its_matvecs_and_is_deterministic():
    _, op = planted_gapped()
    before = op.num_matvecs
    a = lanczos(op, k=2, seed=3)
    assert op.num_matvecs - before == a.iterations
    b = lanczos(op, k=2, seed=3)
    assert torch.equal(a.largest, b.largest)


def test_lanczos_matches_dense_reference_on_mlp_hessian(mlp_hessian):
    op, dense = mlp_hessian
    ref = torch.linalg.eigvalsh(dense)
    s = hessian_spectrum(op, k=3, method="lanczos", max_iter=op.size, tol=1e-10)
    assert not s.full
    assert s.converged
    torch.testing.assert_close(s.largest, ref[-3:].flip(0), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(s.smallest, ref[:3], rtol=0.0, atol=1e-6 * float(ref[-1]))


def test_lanczos_warns_when_max_iter_is_too_small():
    ev = torch.linspace(1.0, 2.0, 200, dtype=F64)  # no gaps: slow convergence
    with pytest.warns(InflWarning, match="max_iter=5"):
        res = lanczos(planted(ev), k=2, max_iter=5)
    assert not res.converged
    # Ritz values always lie inside the spectrum
    assert float(res.largest[0]) <= 2.0 + 1e-12
    assert float(res.smallest[0]) >= 1.0 - 1e-12


def test_lanczos_works_in_float32():
    ev, op = planted_gapped()
    op32 = DenseOperator(op.matrix.float())
    res = lanczos(op32, k=2, which="largest", tol=1e-5)
    torch.testing.assert_close(res.largest, ev[-2:].flip(0), rtol=1e-4, atol=0.0)


def test_eigsh_agrees_with_lanczos():
    ev, op = planted_gapped()
    a = eigsh_extremes(op, k=3, which="both")
    torch.testing.assert_close(a.largest, ev[-3:].flip(0), rtol=1e-8, atol=0.0)
    torch.testing.assert_close(a.smallest, ev[:3], rtol=1e-8, atol=0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be"),
        ({"k": 3, "which": "middle"}, "which must"),
        ({"k": 1, "tol": 0.0}, "tol"),
    ],
)
def test_lanczos_rejects_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        lanczos(planted(torch.ones(5, dtype=F64)), **kwargs)


# ---------------------------------------------------------------- agreement and traces


def test_compare_identical_and_opposite_inverse_hvps():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, generator=gen, dtype=F64)
    g = torch.randn(25, 10, generator=gen, dtype=F64)
    same = compare_inverse_hvps(x, x.clone(), train_grads=g)
    assert same.min_cosine == pytest.approx(1.0)
    assert same.max_relative_error == pytest.approx(0.0, abs=1e-12)
    assert same.mean_spearman == pytest.approx(1.0)
    opposite = compare_inverse_hvps(-x, x, train_grads=g)
    assert opposite.min_cosine == pytest.approx(-1.0)
    assert opposite.max_relative_error == pytest.approx(2.0)
    assert opposite.mean_spearman == pytest.approx(-1.0)


def test_spearman_rows_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 30)), rng.normal(size=(2, 30))
    got = spearman_rows(a, b)
    for j in range(2):
        assert float(got[j]) == pytest.approx(stats.spearmanr(a[j], b[j]).statistic)
    assert math.isnan(float(spearman_rows(np.ones((1, 5)), a[:1, :5])[0]))


def test_solver_agreement_exact_cg_and_lissa():
    ev = torch.linspace(0.5, 10.0, 30, dtype=F64)
    op = planted(ev)
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(4, 30, generator=gen, dtype=F64)
    g = torch.randn(50, 30, generator=gen, dtype=F64)
    rep = solver_agreement(
        op,
        b,
        {
            "exact": ExactHessian(),
            "cg": ConjugateGradient(rtol=1e-10),
            "lissa": LiSSA(scale=12.0, depth=2000, rtol=1e-8),
        },
        train_grads=g,
    )
    assert rep.reference == "exact"
    assert rep.comparisons["cg"].max_relative_error < 1e-8
    assert rep.comparisons["lissa"].min_cosine > 1 - 1e-10
    assert rep.comparisons["lissa"].mean_spearman == pytest.approx(1.0)
    assert "lissa" in rep.table()
    assert "(reference)" in rep.table()
    cg_trace = residual_trace(rep.results["cg"])
    assert cg_trace.shape[1] == 4
    assert cg_trace[0, 0] == pytest.approx(1.0)
    assert cg_trace[-1].max() <= 1e-10


def test_agreement_detects_a_shallow_lissa():
    ev = torch.linspace(0.01, 10.0, 30, dtype=F64)
    op = planted(ev)
    b = torch.randn(2, 30, generator=torch.Generator().manual_seed(1), dtype=F64)
    with pytest.warns(InflWarning):
        rep = solver_agreement(
            op, b, {"exact": ExactHessian(), "lissa": LiSSA(scale=12.0, depth=20)}
        )
    assert rep.comparisons["lissa"].max_relative_error > 0.1


def test_lissa_trace_converges_and_diverges():
    ev = torch.linspace(0.5, 10.0, 20, dtype=F64)
    op = planted(ev)
    b = torch.randn(2, 20, generator=torch.Generator().manual_seed(2), dtype=F64)
    exact = torch.linalg.solve(op.matrix, b.T).T
    good = lissa_trace(op, b, scale=12.0, depth=400)
    assert not good.diverged
    assert good.steps == 400
    assert good.residuals[-1].max() < 1e-6
    np.testing.assert_allclose(good.estimate_norms[-1], exact.norm(dim=1).numpy(), rtol=1e-6)
    bad = lissa_trace(op, b, scale=4.0, depth=400)  # scale < lambda_max / 2 = 5
    assert bad.diverged
    assert bad.steps < 400
    assert bad.estimate_norms[-1].min() > 1e6 * bad.estimate_norms[0].max()


def test_lissa_auto_scale_uses_lanczos_top_eigenvalue():
    _ev, op = planted_gapped()
    damped = op.damped(7.0)  # make it positive definite
    fitted = LiSSA(scale="auto").fit(damped)
    assert fitted.scale == pytest.approx(1.2 * (100.0 + 7.0), rel=1e-6)
    assert damped.num_matvecs <= 30
