"""ExactHessian: refusals that name the fix, the pseudo-inverse, cheap re-damping."""

from __future__ import annotations

import pytest
import torch

from infl import (
    DenseOperator,
    ExactHessian,
    NotPositiveDefiniteError,
)


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
