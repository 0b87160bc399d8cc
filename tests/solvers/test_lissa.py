"""LiSSA: convergence both ways (enough depth passes, a tiny scale diverges), minibatches."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from infl import (
    InflWarning,
    InputError,
    LiSSA,
    SolverDivergedError,
)
from infl.operators import LinearOperator
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
    # with the control variate only stability is needed: the minibatch top at half weight
    cv = LiSSA(damping=0.05, batch_size=10, depth=5, seed=3, snapshot_every=6).fit(op)
    top = float(torch.linalg.eigvalsh(dense)[-1])
    assert cv.info["minibatch_max_eigenvalue"] == pytest.approx(max(tops), rel=1e-6)
    expected = SCALE_MARGIN * max(top + 0.05, (max(tops) + 0.05) / 2)
    assert cv.scale == pytest.approx(expected, rel=1e-3)  # Lanczos estimate of the full top


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


# ---------------------------------------------------------------- the loop: windows, dense form


@pytest.mark.filterwarnings("ignore::infl.InflWarning")
def test_dense_form_gives_the_matrix_free_recursion_to_round_off(hessian_problem):
    op, dense, rhs = hessian_problem
    top = float(torch.linalg.eigvalsh(dense)[-1])
    settings = {"damping": 0.01, "scale": 1.2 * top, "depth": 25, "batch_size": None}
    free = LiSSA(**settings, dense=False, rtol=1e-30).fit(op)
    matrix = LiSSA(**settings, dense=True, rtol=1e-30).fit(op)
    a, b = free.solve(rhs), matrix.solve(rhs)
    assert (a.info["dense_matrix"], b.info["dense_matrix"]) == (False, True)
    torch.testing.assert_close(b.value, a.value, rtol=1e-10, atol=0)
    torch.testing.assert_close(b.trace, a.trace, rtol=1e-8, atol=1e-15)
    torch.testing.assert_close(b.residual_norms, a.residual_norms, rtol=1e-6, atol=1e-15)
    assert a.iterations == b.iterations == 25


def test_dense_auto_assembles_the_matrix_only_when_it_costs_fewer_products(hessian_problem):
    op, dense, rhs = hessian_problem  # p = 5
    top = float(torch.linalg.eigvalsh(dense)[-1])
    shallow = LiSSA(scale=1.2 * top, depth=2, batch_size=None).fit(op)  # depth * k = 2 < p
    assert not shallow.uses_dense(1)
    deep = LiSSA(scale=3 * top, depth=200, batch_size=None).fit(op)
    assert deep.uses_dense(1)
    before = op.num_matvecs
    deep.solve(rhs)
    assert op.num_matvecs - before == 5  # the p products that assembled the matrix, no more
    deep.with_damping(0.5).solve(rhs)  # the matrix is shared across dampings
    assert op.num_matvecs - before == 5
    minibatch = LiSSA(scale=1.2 * top, depth=200, batch_size=10).fit(op)
    assert not minibatch.uses_dense(4)


def test_dense_true_with_minibatches_is_refused():
    with pytest.raises(InputError, match="dense=True needs full-data steps"):
        LiSSA(dense=True, batch_size=16)
    with pytest.raises(InputError, match="dense must be True, False or 'auto'"):
        LiSSA(dense="yes")


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.filterwarnings("ignore::infl.InflWarning")
@pytest.mark.parametrize("batch_size", [None, 4])
def test_window_checks_change_nothing_but_how_often_the_host_reads(batch_size):
    op, rhs = _heterogeneous_examples()
    kw = {"damping": 0.05, "scale": 10.0, "depth": 70, "batch_size": batch_size, "dense": False}
    every = LiSSA(**kw, check_every=1, rtol=1e-30).solve(op, rhs)
    window = LiSSA(**kw, check_every=32, rtol=1e-30).solve(op, rhs)
    torch.testing.assert_close(window.value, every.value, rtol=0, atol=0)
    torch.testing.assert_close(window.trace, every.trace, rtol=0, atol=0)
    assert window.trace.shape == (70, 2)


def test_divergence_is_reported_at_the_same_step_whatever_the_window():
    op, rhs = _heterogeneous_examples()
    top = float(torch.linalg.eigvalsh(op.mean)[-1])
    steps = []
    for every in (1, 8, 64):
        with pytest.raises(SolverDivergedError) as err:
            LiSSA(scale=top / 10, depth=500, check_every=every, dense=False).solve(op, rhs)
        steps.append(int(str(err.value).split("diverged at step ")[1].split()[0]))
    assert steps[0] == steps[1] == steps[2] > 1


def test_early_stop_happens_in_the_window_where_rtol_is_met():
    op, rhs = _heterogeneous_examples()
    kw = {"damping": 0.1, "scale": 4.0, "depth": 5000, "batch_size": None, "rtol": 1e-8}
    one = LiSSA(**kw, check_every=1, dense=False).solve(op, rhs)
    window = LiSSA(**kw, check_every=16, dense=False).solve(op, rhs)
    assert one.converged
    assert window.converged
    assert 16 < one.iterations <= window.iterations < one.iterations + 16
    torch.testing.assert_close(window.trace[: one.iterations], one.trace)
    assert float(window.residual_norms.max()) <= float(one.residual_norms.max())


@pytest.mark.filterwarnings("ignore::infl.InflWarning")
def test_full_data_repeats_are_run_once():
    op, rhs = _heterogeneous_examples()
    kw = {"damping": 0.1, "scale": 4.0, "depth": 40, "batch_size": None, "rtol": 1e-30}
    once = LiSSA(**kw).solve(op, rhs)
    thrice = LiSSA(**kw, repeats=3).solve(op, rhs)
    torch.testing.assert_close(thrice.value, once.value, rtol=0, atol=0)
    assert thrice.iterations == 40
    assert thrice.info["repeats_run"] == 1


def test_block_draws_are_the_single_draw_stream_uniform_and_reproducible(hessian_problem):
    op, _, _ = hessian_problem  # n = 60
    subs = op.damped(0.1).subsample_many(12, 400, _gen())
    again = op.damped(0.1).subsample_many(12, 400, _gen())
    gen = _gen()
    singles = [op.damped(0.1).subsample(12, gen) for _ in range(400)]
    assert all(
        torch.equal(s.base.data[0], t.base.data[0]) for s, t in zip(subs, singles, strict=True)
    )
    idx = torch.stack([s.base.data[0] for s in subs])  # the selected inputs identify examples
    assert all(
        torch.equal(s.base.data[0], t.base.data[0]) for s, t in zip(subs, again, strict=False)
    )
    x = op.data.select(torch.arange(60))[0]
    which = (idx[:, :, None, :] == x[None, None]).all(-1).float().argmax(-1)  # [400, 12]
    assert all(row.unique().numel() == 12 for row in which)  # without replacement
    counts = torch.bincount(which.flatten(), minlength=60).double()
    assert counts.min() > 0.5 * counts.mean()
    assert counts.max() < 1.5 * counts.mean()
    assert all(s.damping == 0.1 for s in subs)


# ---------------------------------------------------------------- minibatch convergence


class _MeanOfExamples(LinearOperator):
    """:math:`A = \\frac1n\\sum_i A_i` from per-example PSD matrices ``[n, p, p]``: minibatch
    operators are exact means over subsets, cheap enough for thousands of steps."""

    def __init__(self, mats: torch.Tensor) -> None:
        super().__init__(mats.shape[1], mats.dtype, mats.device)
        self.mats = mats
        self.mean = mats.mean(dim=0)

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors @ self.mean

    @property
    def supports_subsample(self) -> bool:
        return True

    def subsample(self, batch_size: int, generator: torch.Generator) -> LinearOperator:
        idx = torch.randperm(self.mats.shape[0], generator=generator)[:batch_size]
        return _MeanOfExamples(self.mats[idx])


def _heterogeneous_examples(n: int = 40, p: int = 6) -> tuple[LinearOperator, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(n, p, generator=gen, dtype=torch.float64) * torch.linspace(0.3, 2.0, p)
    mats = g[:, :, None] * g[:, None, :] + 0.05 * torch.eye(p, dtype=torch.float64)
    rhs = torch.randn(2, p, generator=gen, dtype=torch.float64)
    return _MeanOfExamples(mats), rhs


def control_variate_errors(
    op: LinearOperator,
    rhs: torch.Tensor,
    exact: torch.Tensor,
    depths: tuple[int, ...],
    every: int,
    **kw: Any,
) -> tuple[list[float], float]:
    """Relative errors of LiSSA with ``snapshot_every=every`` at each depth, and of plain
    minibatch LiSSA at the last depth, all at the minibatch-aware automatic scale."""
    scale = LiSSA(**kw, depth=1).fit(op).scale
    errors = [
        rel_err(LiSSA(**kw, scale=scale, depth=d, snapshot_every=every).solve(op, rhs).value, exact)
        for d in depths
    ]
    plain = rel_err(LiSSA(**kw, scale=scale, depth=depths[-1]).solve(op, rhs).value, exact)
    return errors, plain


@pytest.mark.filterwarnings("ignore::infl.InflWarning")
def test_the_control_variate_converges_to_the_exact_inverse_as_depth_grows():
    op, rhs = _heterogeneous_examples()
    exact = torch.linalg.solve(op.mean + 0.1 * torch.eye(6, dtype=torch.float64), rhs.T).T
    kw = {"damping": 0.1, "batch_size": 4, "rtol": 1e-30, "seed": 1}
    errors, plain = control_variate_errors(op, rhs, exact, (150, 600, 2400), 10, **kw)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-8  # to round-off, where plain minibatch LiSSA stays at its noise
    assert plain > 1e-3


def test_the_control_variate_stops_at_an_anchor_whose_exact_residual_meets_rtol():
    op, rhs = _heterogeneous_examples()
    solver = LiSSA(damping=0.1, batch_size=4, depth=5000, snapshot_every=10, rtol=1e-6)
    result = solver.solve(op, rhs)
    assert result.converged
    assert float(result.residual_norms.max()) <= 1e-6
    assert result.iterations < 5000
    assert result.iterations % 10 == 0
    assert result.info["snapshot_every"] == 10


def test_snapshot_every_auto_is_one_pass_of_minibatches_and_ignored_on_full_data(
    hessian_problem,
):
    op, _, _ = hessian_problem  # n = 60
    auto = LiSSA(scale=10.0, depth=5, batch_size=7, snapshot_every="auto").fit(op)
    assert auto.snapshot_every == 35  # ceil(4 * 60 / 7)
    full = LiSSA(scale=10.0, depth=5, batch_size=None, snapshot_every="auto").fit(op)
    assert full.snapshot_every is None
    with pytest.raises(InputError, match="snapshot_every must be"):
        LiSSA(snapshot_every="sometimes")
    with pytest.raises(InputError, match="snapshot_every must be a positive integer"):
        LiSSA(snapshot_every=0)


@pytest.mark.filterwarnings("ignore::infl.InflWarning")
def test_tail_averaging_shrinks_the_minibatch_noise_as_depth_grows():
    op, rhs = _heterogeneous_examples()
    exact = torch.linalg.solve(op.mean + 0.1 * torch.eye(6, dtype=torch.float64), rhs.T).T
    kw = {"damping": 0.1, "batch_size": 4, "rtol": 1e-30, "seed": 0, "scale": 5.0}
    averaged = [
        rel_err(LiSSA(**kw, depth=d, average=True).solve(op, rhs).value, exact) for d in (300, 1200)
    ]
    last = rel_err(LiSSA(**kw, depth=1200).solve(op, rhs).value, exact)
    assert averaged[1] < averaged[0] / 2
    assert averaged[1] < last / 3  # the last iterate keeps its minibatch noise
    full = {"damping": 0.1, "scale": 5.0, "depth": 50, "batch_size": None, "rtol": 1e-30}
    torch.testing.assert_close(  # deterministic full-data steps: averaging is not applied
        LiSSA(**full, average=True).solve(op, rhs).value, LiSSA(**full).solve(op, rhs).value
    )
