"""Conjugate gradient: non-convergence is reported, negative curvature is refused."""

from __future__ import annotations

import pytest
import torch

from infl import (
    ConjugateGradient,
    DenseOperator,
    InflWarning,
    NotPositiveDefiniteError,
)


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
