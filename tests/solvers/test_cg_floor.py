"""CG stops a system at the round-off floor of its products: where the residual it updates goes
on falling but the true one has stalled (infl.solvers.cg_floor)."""

from __future__ import annotations

import math

import pytest
import torch

from infl import ConjugateGradient
from infl.errors import InflWarning
from infl.operators import DenseOperator
from infl.solvers import cg_floor
from infl.solvers.base import SolveResult
from infl.solvers.cg_floor import RoundoffFloor
from problems import (
    log_spectrum_spd,
    random_rhs,
    residual_rounding,
    true_relative_residual,
)


def solve_float32(block: bool) -> tuple[DenseOperator, torch.Tensor, SolveResult]:
    op = log_spectrum_spd(80, 1e4, torch.float32)
    b = random_rhs(4, 80, torch.float32)
    with pytest.warns(InflWarning, match="cannot reach rtol=1e-10 with float32"):
        result = ConjugateGradient(rtol=1e-10, max_iter=1000, block=block).solve(op, b)
    return op, b, result


@pytest.mark.parametrize("block", [False, True])
def test_float32_stops_at_the_floor_sooner_and_no_less_accurate(block, monkeypatch):
    op, b, floored = solve_float32(block)
    products = op.num_matvecs
    assert not floored.converged
    assert floored.info["roundoff_floor_stops"] == 4
    # the reported residuals are the true ones, up to the float32 round-off of forming b - A x
    exact = true_relative_residual(op, floored.value, b)
    rounding = residual_rounding(op, floored.value, b)
    assert bool(((floored.residual_norms.double() - exact).abs() <= rounding).all())
    # the same solve without stopping at the floor (a stall never counts): it runs until the
    # updated residual meets 1e-10, many iterations later, and is no more accurate
    monkeypatch.setattr(cg_floor, "FLOOR_GAP", math.inf)
    op.num_matvecs = 0
    with pytest.warns(InflWarning, match="cannot reach"):
        full = ConjugateGradient(rtol=1e-10, max_iter=1000, block=block).solve(op, b)
    assert full.info["roundoff_floor_stops"] == 0
    assert floored.iterations < full.iterations
    assert products < op.num_matvecs
    assert bool((exact <= 2 * true_relative_residual(op, full.value, b)).all())


def _floor(op: DenseOperator, b: torch.Tensor, threshold: float) -> RoundoffFloor:
    floor = RoundoffFloor(op, b, torch.full((b.shape[0],), threshold, dtype=b.dtype))
    floor.add(torch.arange(b.shape[0]), torch.full((b.shape[0],), 1e15, dtype=b.dtype))
    return floor  # every system's tau (0.2) is above its residual: each is due at once


def test_review_stops_converged_and_stalled_systems_and_rechecks_the_rest():
    op = log_spectrum_spd(10, 10.0, torch.float64)
    b = random_rhs(3, 10, torch.float64)
    exact = torch.linalg.solve(op.matrix, b.T).T
    direction = random_rhs(1, 10, torch.float64, seed=5)[0]
    # system 0 solved; system 1 off by a true residual of 1e-3; system 2 likewise
    x = torch.stack([exact[0], exact[1] + 1e-3 * direction, exact[2] + 1e-3 * direction])
    true = torch.linalg.vector_norm(b - x @ op.matrix, dim=1)
    # updated residuals: 0 claims 1e-9 (true ~0), 1 claims a tenth of its true one (stalled),
    # 2 claims its true one (on track)
    rr = torch.stack([torch.tensor(1e-9), true[1] / 10, true[2]]).square()
    active = torch.ones(3, dtype=torch.bool)
    floor = _floor(op, b, threshold=1e-8)
    floor.review(x, rr, active)
    assert active.tolist() == [False, False, True]
    assert floor.verified.tolist() == [True, True, False]
    assert floor.stalled.tolist() == [False, True, False]
    torch.testing.assert_close(torch.sqrt(rr[:2]), true[:2])  # the true residuals replace them
    assert float(floor.next_check[2]) == pytest.approx(cg_floor.FLOOR_RECHECK * float(true[2]))
    assert op.num_matvecs == 3
    assert floor.checks == 1
    # system 2 is not measured again until its updated residual falls by FLOOR_RECHECK
    rr[2] = (0.5 * true[2]) ** 2
    floor.review(x, rr, active)
    assert floor.checks == 1
    assert op.num_matvecs == 3


def test_review_waits_for_the_updated_residual_to_pass_tau():
    op = log_spectrum_spd(10, 10.0, torch.float64)
    b = random_rhs(2, 10, torch.float64)
    floor = RoundoffFloor(op, b, torch.full((2,), 1e-14, dtype=torch.float64))
    floor.add(torch.arange(2), torch.ones(2, dtype=torch.float64))  # tau = eps64
    rr = torch.full((2,), 1e-20, dtype=torch.float64)  # updated residual 1e-10 > tau
    active = torch.ones(2, dtype=torch.bool)
    floor.review(torch.zeros_like(b), rr, active)
    assert floor.checks == 0
    assert op.num_matvecs == 0
    assert active.all()
