"""LiSSA: convergence both ways (enough depth passes, a tiny scale diverges), minibatches."""

from __future__ import annotations

import pytest
import torch

from infl import (
    InflWarning,
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
