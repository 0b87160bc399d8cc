"""influence_fading: the convex control (no fading), a non-convex run, invariances, bad input."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import infl
import reference
from infl.errors import InputError
from infl.experiments.fading import FadingResult, influence_fading, plot_fading
from problems import LogisticProblem, make_logistic_problem

REMOVALS = list(range(0, 60, 3))  # 20 leave-one-out removals


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny problems: one intra-op thread avoids oversubscription on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def convex() -> tuple[LogisticProblem, FadingResult, float]:
    """Strongly convex L2-logistic regression at its exact minimum, full-batch GD warm start.

    The step is 1/lambda_max(H) < 2/lambda_max, so the removal runs converge monotonically to
    theta_{-i} at rate (1 - lambda_min/lambda_max)^T; the horizons start where that factor is
    below 1e-3, i.e. where every removal run has converged. From there on, a convex model
    must show *no* fading: the runs stay at theta_{-i}, which influence predicts to second
    order, however long training continues.
    """
    pr = make_logistic_problem(n=60, d=4, wd=0.1, seed=3)
    h = reference.hessian(pr.theta, pr.x, pr.y, pr.wd)
    evals = torch.linalg.eigvalsh(h)
    lr = 1.0 / float(evals[-1])
    converged_after = math.log(1e-3) / math.log(1 - float(evals[0]) * lr)
    horizons = tuple(int(converged_after * f) for f in (1, 3, 10))
    res = influence_fading(
        pr.model.eval(),
        infl.Objective("bce_with_logits", pr.wd),
        (pr.x, pr.y),
        (pr.x_test, pr.y_test),
        REMOVALS,
        horizons,
        predicted=infl.ExactHessian(),
        lr=lr,
        parallel_runs=32,
        progress=False,
    )
    return pr, res, lr


@pytest.mark.slow
def test_convex_model_shows_no_fading(convex: tuple[LogisticProblem, FadingResult, float]) -> None:
    _, res, _ = convex
    assert res.actual.shape == (3, 10, len(REMOVALS))
    for h, t in enumerate(res.horizons):
        assert res.pearson[h] >= 0.99, (t, res.table())
        assert res.spearman[h] >= 0.97, (t, res.table())
        # the actual effects have the predicted size (a leave-one-out of 60: within 10%)
        assert 0.9 < res.scale[h] < 1.1, (t, res.table())
    # and do not drift between horizons: converged runs stay where they are
    torch.testing.assert_close(res.actual[2], res.actual[1], rtol=0, atol=1e-8)
    # the control run starts at the exact minimum, so it does not move
    assert float(res.control_drift.max()) < 1e-10


def test_convex_divergence_matches_newton_refit(
    convex: tuple[LogisticProblem, FadingResult, float],
) -> None:
    """||theta_{-i}(T) - theta_c(T)|| equals the exact leave-one-out parameter change."""
    pr, res, _ = convex
    keep = torch.ones(60, dtype=torch.bool)
    exact = []
    for i in REMOVALS:
        keep[:] = True
        keep[i] = False
        theta_i = reference.newton_fit(pr.x[keep], pr.y[keep], pr.wd, theta0=pr.theta)
        exact.append(float(torch.linalg.vector_norm(theta_i - pr.theta)))
    torch.testing.assert_close(
        res.divergence[-1], torch.tensor(exact, dtype=torch.float64), rtol=1e-6, atol=1e-10
    )


def test_short_horizon_has_not_converged(
    convex: tuple[LogisticProblem, FadingResult, float],
) -> None:
    """With a small step, one step of the removal run is far from theta_{-i}: the actual
    effect is a small fraction of the prediction (why short horizons are not the control)."""
    pr, _, lr = convex
    res = influence_fading(
        pr.model.eval(),
        infl.Objective("bce_with_logits", pr.wd),
        (pr.x, pr.y),
        (pr.x_test, pr.y_test),
        REMOVALS[:5],
        (1, 2),
        predicted=infl.ExactHessian(),
        lr=lr / 10,
        progress=False,
    )
    assert 0 < res.scale[0] < 0.15
    assert res.scale[0] < res.scale[1] < 0.3


@functools.cache
def _tanh_mlp_problem() -> tuple[nn.Module, infl.Objective, tuple, tuple]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 2, generator=gen, dtype=torch.float64)
    y = ((x[:, 0] * x[:, 1]) > 0).long()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    obj = infl.Objective("cross_entropy", 1e-3)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss = obj.per_example_loss(net, (x[:40], y[:40])).mean()
        (loss + 0.5e-3 * sum((p**2).sum() for p in net.parameters())).backward()
        opt.step()
    return net.eval(), obj, (x[:40], y[:40]), (x[40:], y[40:])


def test_nonconvex_runs_and_returns_well_formed_curves() -> None:
    net, obj, train, test = _tanh_mlp_problem()
    before = [p.detach().clone() for p in net.parameters()]
    res = influence_fading(
        net,
        obj,
        train,
        test,
        [0, 5, [7, 9], 20],
        (2, 20, 200),
        predicted=infl.ExactHessian(damping=0.05),
        lr=0.2,
        batch_size=8,
        seed=1,
        progress=False,
    )
    assert res.horizons == (2, 20, 200)
    assert res.removals == ((0,), (5,), (7, 9), (20,))
    assert res.predicted.shape == (8, 4)
    assert res.actual.shape == (3, 8, 4)
    assert res.divergence.shape == (3, 4)
    assert res.control_drift.shape == (3,)
    assert torch.isfinite(res.actual).all()
    assert torch.isfinite(res.divergence).all()
    assert (res.divergence > 0).all()
    assert all(-1 <= v <= 1 for v in res.pearson + res.spearman)
    # minibatch SGD (and the unconverged theta*) move the control run away from theta*
    assert (res.control_drift > 0).all()
    rows = res.to_rows()
    assert [r["horizon"] for r in rows] == [2, 20, 200]
    assert set(rows[0]) == {
        "horizon",
        "pearson",
        "spearman",
        "scale",
        "mean_divergence",
        "max_divergence",
        "control_drift",
    }
    assert len(res.table().splitlines()) == 4
    # the user's module is untouched
    for p, q in zip(before, net.parameters(), strict=True):
        assert torch.equal(p, q)


def test_grouping_of_runs_does_not_change_results() -> None:
    """Each group of parallel runs carries its own control run: grouping is invisible."""
    net, obj, train, test = _tanh_mlp_problem()
    kwargs: dict = {
        "predicted": torch.zeros(8, 5, dtype=torch.float64),
        "lr": 0.2,
        "batch_size": 8,
        "progress": False,
    }
    a, b = (
        influence_fading(net, obj, train, test, range(5), (3, 30), parallel_runs=r, **kwargs)
        for r in (2, 8)
    )
    torch.testing.assert_close(a.actual, b.actual, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.divergence, b.divergence, rtol=1e-9, atol=1e-12)


def test_removal_run_drops_exactly_the_removed_example() -> None:
    """Full batch, one step: theta_{-i}(1) - theta_c(1) = -lr * (grad J_{-i} - grad J)."""
    net, obj, train, test = _tanh_mlp_problem()
    x, y = train
    n, lr, i = len(y), 0.1, 4
    res = influence_fading(
        net,
        obj,
        train,
        test,
        [i],
        (1,),
        predicted=torch.zeros(8, 1, dtype=torch.float64),
        lr=lr,
        progress=False,
    )

    def full_grad(keep: torch.Tensor) -> torch.Tensor:
        net.zero_grad()
        obj.per_example_loss(net, (x[keep], y[keep])).mean().backward()
        return torch.cat([p.grad.reshape(-1) for p in net.parameters()])  # type: ignore[union-attr]

    keep = torch.ones(n, dtype=torch.bool)
    g_all = full_grad(keep)
    keep[i] = False
    g_minus = full_grad(keep)
    net.zero_grad()
    expected = float(torch.linalg.vector_norm(lr * (g_minus - g_all)))
    assert res.divergence[0, 0].item() == pytest.approx(expected, rel=1e-9)


def test_plot_fading_returns_a_two_panel_figure(
    convex: tuple[LogisticProblem, FadingResult, float],
) -> None:
    pytest.importorskip("matplotlib")
    fig = plot_fading(convex[1], title="convex control")
    assert len(fig.axes) == 2
    assert fig.axes[0].get_xscale() == "log"


@pytest.mark.parametrize(
    ("horizons", "match"),
    [((), "empty"), ((10, 5), "increasing"), ((0, 5), "positive"), ((1.5,), "positive")],
)
def test_bad_horizons(horizons: tuple, match: str) -> None:
    net, obj, train, test = _tanh_mlp_problem()
    with pytest.raises(InputError, match=match):
        influence_fading(net, obj, train, test, [0], horizons, progress=False)


def test_bad_predicted_shape_and_lr() -> None:
    net, obj, train, test = _tanh_mlp_problem()
    with pytest.raises(InputError, match=r"expected \[m=8, k=2\]"):
        influence_fading(net, obj, train, test, [0, 1], (1,), predicted=torch.zeros(8, 3))
    with pytest.raises(InputError, match="lr"):
        influence_fading(net, obj, train, test, [0], (1,), lr=-1.0)
    with pytest.raises(InputError, match="out of range"):
        influence_fading(net, obj, train, test, [40], (1,))


def test_divergent_training_is_reported() -> None:
    """Least squares with a step far above 2/lambda_max: gradient descent blows up."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(20, 1, generator=gen, dtype=torch.float64)
    net = nn.Linear(3, 1).double().eval()
    with pytest.raises(infl.NonFiniteError, match="lower lr"):
        influence_fading(
            net,
            infl.Objective("mse"),
            (x, y),
            (x[:2], y[:2]),
            [0],
            (400,),
            predicted=torch.zeros(2, 1, dtype=torch.float64),
            lr=100.0,
            progress=False,
        )
