"""Many SGD retrains at once on the batched engine (infl.retrain.batched / grouped)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from infl import IndexedData, Objective
from infl.errors import InflWarning
from infl.retrain import RetrainConfig, retrain_ground_truth, single
from infl.retrain.batched import BatchedSGD


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is far faster (and immune to a loaded machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def mlp_problem():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    return model, Objective("cross_entropy", weight_decay=0.01), (X, y), (X[:5], y[:5])


def _count_sequential(monkeypatch):
    """Record the removals that go through the one-at-a-time path (RetrainJob.run)."""
    calls = []
    run = single.RetrainJob.run

    def counting(self, removal):
        calls.append(removal)
        return run(self, removal)

    monkeypatch.setattr(single.RetrainJob, "run", counting)
    return calls


_GROUPS = [0, 1, [2, 3], 5, [7, 9], 11]  # + control: 7 runs, 3 groups of parallel_runs=3


@pytest.mark.parametrize("grad_tol", [None, 1e-2])
def test_batched_sgd_equals_sequential(mlp_problem, monkeypatch, grad_tol):
    kw = {
        "config": RetrainConfig(
            optimizer="sgd", lr=0.2, momentum=0.9, max_steps=150, grad_tol=grad_tol
        ),
        "progress": False,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InflWarning)  # some runs stop at max_steps
        alone = retrain_ground_truth(*mlp_problem, _GROUPS, parallel_runs=1, **kw)
        calls = _count_sequential(monkeypatch)
        batched = retrain_ground_truth(*mlp_problem, _GROUPS, parallel_runs=3, **kw)
    assert calls == []  # really batched
    for name in ("raw_change", "control_change", "param_change_norm", "grad_norm"):
        torch.testing.assert_close(
            getattr(batched, name), getattr(alone, name), atol=1e-12, rtol=1e-10
        )
    assert batched.steps.tolist() == alone.steps.tolist()
    assert batched.control_grad_norm == pytest.approx(alone.control_grad_norm, rel=1e-10)
    assert batched.control_param_change_norm == pytest.approx(
        alone.control_param_change_norm, rel=1e-10
    )
    assert float(alone.param_change_norm.min()) > 1e-3  # the retrains really moved
    if grad_tol is not None:  # some runs stopped early, others ran to max_steps
        assert 0 < int(alone.steps.min()) < 150 == int(alone.steps.max())


def test_batched_sgd_store_and_resume(mlp_problem, monkeypatch, tmp_path):
    cfg = RetrainConfig(optimizer="sgd", lr=0.2, max_steps=20, grad_tol=None)
    kw = {"config": cfg, "progress": False, "store": tmp_path / "s"}
    calls = _count_sequential(monkeypatch)
    first = retrain_ground_truth(*mlp_problem, [0, 1, 2], parallel_runs=3, **kw)
    assert len(list((tmp_path / "s").glob("retrain-*.pt"))) == 4
    again = retrain_ground_truth(*mlp_problem, [2, 0, 1, 5], parallel_runs=3, **kw)
    assert calls == []
    assert (again.num_loaded, again.num_computed) == (4, 1)
    torch.testing.assert_close(again.raw_change[:, :3], first.raw_change[:, [2, 0, 1]])


class _NoVmap(nn.Module):
    """Scales its output by a Python float taken from a weight: .item() fails under vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * (1.0 + 0.0 * self.lin.weight.sum().item())


def test_model_that_cannot_be_vmapped_falls_back(mlp_problem, monkeypatch):
    _, objective, train, test = mlp_problem
    torch.manual_seed(0)
    model = _NoVmap().double().eval()
    kw = {
        "config": RetrainConfig(optimizer="sgd", lr=0.2, momentum=0.5, max_steps=20, grad_tol=None)
    }
    alone = retrain_ground_truth(
        model, objective, train, test, [0, [1, 2]], parallel_runs=1, progress=False, **kw
    )
    calls = _count_sequential(monkeypatch)
    fallback = retrain_ground_truth(
        model, objective, train, test, [0, [1, 2]], parallel_runs=4, progress=False, **kw
    )
    assert sorted(calls) == [(), (0,), (1, 2)]
    torch.testing.assert_close(fallback.raw_change, alone.raw_change, atol=0, rtol=0)


def test_engine_steps_are_sgd_with_momentum_on_weighted_objectives(mlp_problem):
    """Two runs, one step each by hand: the engine's gradient and heavy-ball update."""
    model, objective, (X, y), _ = mlp_problem
    n, lr, mu = len(y), 0.3, 0.9
    engine = BatchedSGD(
        model,
        objective.per_example_loss,
        0.01,
        IndexedData((X, y)),
        lr=lr,
        momentum=mu,
        chunk_size=7,
    )
    weights = torch.ones(2, n, dtype=torch.float64)
    weights[1] *= n / (n - 2)
    weights[1, [3, 5]] = 0.0
    engine.begin(weights)

    def plain_grad(theta, keep, index=None):
        net = engine.module(theta)
        net.zero_grad()
        idx = torch.arange(n) if index is None else index
        w = weights[keep, idx]
        loss = (w * objective.per_example_loss(net, (X[idx], y[idx]))).sum() / len(idx)
        loss = loss + 0.005 * sum((p * p).sum() for p in net.parameters())
        loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in net.parameters()])

    start = engine.start.clone()
    g, value, norm = engine.gradient()
    for r in range(2):
        torch.testing.assert_close(g[r], plain_grad(start, r), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(g, dim=1))
    assert value.shape == (2,)
    engine.step(g)
    theta1 = engine.theta.clone()
    torch.testing.assert_close(theta1, start - lr * g)  # first step: buffer = gradient
    index = torch.tensor([0, 3, 7, 9])
    g2, _, _ = engine.gradient(index)
    for r in range(2):
        torch.testing.assert_close(g2[r], plain_grad(theta1[r], r, index), atol=1e-12, rtol=1e-10)
    engine.step(g2, active=torch.tensor([True, False]))
    torch.testing.assert_close(engine.theta[0], theta1[0] - lr * (mu * g[0] + g2[0]))
    torch.testing.assert_close(engine.theta[1], theta1[1])  # frozen
    measured = engine.measure(objective.per_example_loss, IndexedData((X, y)))
    assert measured.shape == (2, n)
    for p, q in zip(model.parameters(), engine.module(start).parameters(), strict=True):
        assert torch.equal(p, q)  # the user's module is untouched
