"""CG's tolerance is on the true residual: measured at the end when the recursive one can drift
from it (tolerance below sqrt(eps) of the product dtype; see also test_cg_floor)."""

from __future__ import annotations

import warnings

import pytest
import torch

from infl import ConjugateGradient
from infl.errors import InflWarning
from problems import (
    log_spectrum_spd,
    random_rhs,
    residual_rounding,
    true_relative_residual,
)


@pytest.mark.parametrize("block", [False, True])
def test_float32_below_attainable_accuracy_is_reported_not_converged(block):
    op = log_spectrum_spd(40, 1e3, torch.float32)
    b = random_rhs(3, 40, torch.float32)
    with pytest.warns(InflWarning, match="true relative residual"):
        result = ConjugateGradient(rtol=1e-10, max_iter=500, block=block).solve(op, b)
    assert result.info["true_residual_checked"]
    assert not result.converged
    # the reported residuals are the true ones, up to the float32 round-off of forming b - A x
    exact = true_relative_residual(op, result.value, b)
    rounding = residual_rounding(op, result.value, b)
    assert bool(((result.residual_norms.double() - exact).abs() <= rounding).all())
    assert float(result.residual_norms.max()) > 1e-10
    # each system either stopped at the round-off floor (infl.solvers.cg_floor) or had its
    # recursive residual claim the tolerance (its trace ends below it)
    claimed = int((result.trace[-1] <= 1e-10).sum())
    assert result.info["roundoff_floor_stops"] + claimed == 3


def test_float32_tolerance_it_can_reach_costs_no_extra_product():
    op = log_spectrum_spd(80, 1e2, torch.float32)
    b = random_rhs(3, 80, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = ConjugateGradient(rtol=1e-3, max_iter=500).solve(op, b)
    assert result.converged
    assert not result.info["true_residual_checked"]  # 1e-3 > sqrt(eps32)
    assert op.num_matvecs <= 3 * result.iterations
    assert float(true_relative_residual(op, result.value, b).max()) <= 1e-3


def test_float64_tight_tolerance_is_checked_and_met():
    op = log_spectrum_spd(80, 1e4, torch.float64)
    b = random_rhs(3, 80, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = ConjugateGradient(rtol=1e-10, max_iter=500).solve(op, b)
    assert result.converged
    assert result.info["true_residual_checked"]
    # products: one per system still active at each iteration, plus the one extra product
    active = (result.trace[: result.iterations] > 1e-10).sum()
    assert op.num_matvecs == int(active) + 3
    exact = true_relative_residual(op, result.value, b)
    rounding = residual_rounding(op, result.value, b)
    assert bool(((result.residual_norms - exact).abs() <= rounding).all())
    assert float(result.residual_norms.max()) <= 1e-10
