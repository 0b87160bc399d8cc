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


def test_exact_refuses_half_precision_naming_double_and_cg():
    for dtype in (torch.bfloat16, torch.float16):
        op = DenseOperator(torch.eye(3, dtype=dtype))
        with pytest.raises(ValueError, match=r"float32 or float64.*model\.double\(\).*Conjugate"):
            ExactHessian().fit(op)


def test_round_off_eigenvalues_are_not_counted_as_negative():
    from infl.diagnostics.spectrum import zero_threshold

    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    evals = torch.tensor([-3.7e-13, 0.0, 0.5, 1.0, 2.0, 400.0], dtype=torch.float64)
    op = DenseOperator(q @ torch.diag(evals) @ q.T)
    fitted = ExactHessian(damping=0.1).fit(op)
    assert fitted.info["num_negative"] == 0
    assert fitted.info["num_near_zero"] == 2
    # the threshold is the spectrum's own, shared, not a copy
    eigs = torch.linalg.eigvalsh(op.to_dense())
    assert fitted.info["zero_threshold"] == zero_threshold(eigs, torch.float64, 6)
    # undamped, the refusal says singular, not negative
    with pytest.raises(NotPositiveDefiniteError, match=r"none negative: 2 of 6 are zero") as err:
        ExactHessian().fit(DenseOperator(torch.diag(evals)))
    assert "negative)" not in str(err.value)
    # a real negative eigenvalue is still counted
    real = DenseOperator(torch.diag(torch.tensor([-1e-3, 1.0], dtype=torch.float64)))
    assert ExactHessian(damping=0.01).fit(real).info["num_negative"] == 1


def test_auto_damping_uses_the_exact_smallest_eigenvalue():
    mu = torch.tensor([-0.5, 0.2, 1.0, 10.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)).double())
    op = DenseOperator((q * mu) @ q.T)
    fitted = ExactHessian(damping="auto").fit(op)
    assert fitted.damping == pytest.approx(0.5 + 1e-3 * 10.0, rel=1e-12)  # -lambda_min + eps*max
    info = fitted.info
    assert info["damping_auto"]
    assert info["damping_eigenvalues_exact"]
    assert info["damping_margin"] == 0.0
    assert "exact spectrum" in info["damping_rule"]
    assert info["damping_min_eigenvalue"] == pytest.approx(-0.5)
    rhs = torch.randn(2, 4, dtype=torch.float64)
    expected = torch.linalg.solve(op.matrix + fitted.damping * torch.eye(4).double(), rhs.T).T
    torch.testing.assert_close(fitted.solve(rhs).value, expected)
    explicit = fitted.with_damping(1.0)  # no refit; an explicit damping from now on
    assert explicit.damping == 1.0
    assert explicit.info["damping_auto"] is False


def test_auto_damping_is_zero_on_a_well_conditioned_positive_definite_hessian():
    op = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)))
    assert ExactHessian(damping="auto").fit(op).damping == 0.0
