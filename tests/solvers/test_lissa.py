"""LiSSA: convergence both ways (enough depth passes, a tiny scale diverges), minibatches."""

from __future__ import annotations

import pytest
import torch

from infl import (
    InflWarning,
    InputError,
    LiSSA,
    SolverDivergedError,
)
from reference import rel_err


def test_lissa_fixed_scale_with_enough_depth_is_accurate(hessian_problem):
    op, dense, rhs = hessian_problem
    top = float(torch.linalg.eigvalsh(dense)[-1])
    result = LiSSA(scale=top, depth=20000, rtol=1e-8).solve(op, rhs)
    assert rel_err(result.value, torch.linalg.solve(dense, rhs.T).T) < 1e-3


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
    assert 1e-6 < rel_err(a.value, expected) < 0.3


# ---------------------------------------------------------------- defaults from the advice


def test_default_depth_meets_rtol_on_the_hessian_problem(hessian_problem):
    op, dense, rhs = hessian_problem
    fitted = LiSSA(rtol=1e-6).fit(op)
    assert fitted.info["depth_auto"]
    assert fitted.depth == fitted.info["depth_advised"]
    result = fitted.solve(rhs)
    assert result.converged
    assert float(result.residual_norms.max()) <= 1e-6
    expected = torch.linalg.solve(dense, rhs.T).T
    assert float(((result.value - expected).norm(dim=1) / expected.norm(dim=1)).max()) < 1e-4


def test_a_depth_above_max_depth_is_capped_with_the_cost_stated(hessian_problem):
    op, _, _rhs = hessian_problem
    with pytest.warns(InflWarning, match=r"needs depth ~\d+.*capped at max_depth=3.*HVPs"):
        fitted = LiSSA(rtol=1e-10, max_depth=3).fit(op)
    assert fitted.depth == 3
    assert fitted.info["depth_advised"] > 3


def test_explicit_depth_and_batch_size_are_kept(hessian_problem):
    op, _, _ = hessian_problem
    fitted = LiSSA(scale=50.0, depth=7, batch_size=None).fit(op)
    assert (fitted.depth, fitted.batch_size, fitted.scale) == (7, None, 50.0)
    assert fitted.info["depth_auto"] is False
    assert fitted.info["depth_advised"] is None


def test_minibatch_auto_scale_covers_the_minibatch_curvature(hessian_problem):
    from infl.solvers.lissa import SCALE_MARGIN

    op, dense, _ = hessian_problem
    fitted = LiSSA(damping=0.05, batch_size=10, depth=5, seed=3).fit(op)
    gen = torch.Generator(device="cpu").manual_seed(3 + 7919)  # the draws the fit made
    tops = [float(torch.linalg.eigvalsh(op.subsample(10, gen).to_dense())[-1]) for _ in range(4)]
    assert max(tops) > float(torch.linalg.eigvalsh(dense)[-1])  # minibatches are sharper
    assert fitted.info["minibatch_max_eigenvalue"] == pytest.approx(max(tops), rel=1e-6)
    assert fitted.scale >= SCALE_MARGIN * (max(tops) + 0.05) * (1 - 1e-9)
    # with_damping keeps the minibatch estimate (no new Lanczos run)
    assert fitted.with_damping(1.0).scale == pytest.approx(SCALE_MARGIN * (max(tops) + 1.0))


def test_auto_batch_size_is_full_data_for_small_and_minibatches_for_large_data(logistic):
    from infl import HessianOperator, IndexedData, ModelWrapper, Objective
    from infl.solvers.lissa import resolve_batch_size

    wrapper = ModelWrapper(logistic.model, Objective("bce_with_logits", logistic.wd))
    small = HessianOperator(wrapper, IndexedData((logistic.x, logistic.y)))
    big_x, big_y = logistic.x.repeat(100, 1), logistic.y.repeat(100)
    big = HessianOperator(wrapper, IndexedData((big_x, big_y)))
    assert resolve_batch_size("auto", small) is None
    assert resolve_batch_size("auto", big) == 256
    assert resolve_batch_size("auto", big.damped(0.1)) == 256
    assert resolve_batch_size(None, big) is None
    assert resolve_batch_size(32, small) == 32


def test_auto_damping_with_lissa_uses_one_lanczos_run_for_damping_and_scale():
    from infl import DenseOperator

    mu = torch.tensor([-0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    op = DenseOperator(torch.diag(mu))
    fitted = LiSSA(damping="auto", rtol=1e-3).fit(op)
    assert fitted.damping == pytest.approx(0.5 + 1e-3 * 4.0)  # p = 4: Lanczos is exact
    assert fitted.info["damping_auto"]
    assert fitted.info["damping_eigenvalues_exact"]
    assert fitted.scale == pytest.approx(1.2 * (4.0 + fitted.damping))
    # lambda_min(H + damping*I) = 0.004: condition number ~1100, the advised depth ~9300
    result = fitted.solve(torch.ones(4, dtype=torch.float64))
    assert result.converged
    assert float(result.residual_norms.max()) <= 1e-3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": "big"}, r"batch_size must be .* or 'auto', got 'big'"),
        ({"depth": 0}, r"depth must be a positive integer"),
        ({"max_depth": 2.5}, r"max_depth must be a positive integer"),
        ({"damping": "automatic"}, r"got 'automatic'.*damping='auto'"),
    ],
)
def test_bad_default_settings_are_refused(kwargs, match):
    with pytest.raises(InputError, match=match):
        LiSSA(**kwargs)
