"""Many SGD retrains at once on the batched engine (infl.retrain.batched / grouped)."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

from infl import IndexedData, Objective
from infl.errors import InflWarning, NonFiniteError
from infl.retrain import RetrainConfig, retrain_ground_truth, single
from infl.retrain.batched import BatchedSGD
from infl.retrain.grouped import CHECK_EVERY
from infl.retrain.stacked_linear import StackedSequential


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


# -- the stacked path (infl.retrain.stacked_linear) -------------------------------------------
def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).sum(dim=1)


def _stacked_cases():
    """(name, model, loss, data, closed-form cross-entropy expected)."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=gen)
    X3 = torch.randn(30, 2, 3, generator=gen, dtype=torch.float64)
    Y2 = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    ce = Objective("cross_entropy").per_example_loss
    torch.manual_seed(1)
    relu = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    linear = nn.Sequential(nn.Linear(4, 3))  # the head is layer 0
    nested = nn.Sequential(
        nn.Flatten(),
        nn.Linear(6, 5),
        nn.LeakyReLU(0.1),
        nn.Sequential(nn.Linear(5, 4, bias=False), nn.SiLU()),
        nn.Linear(4, 3),
        nn.Identity(),
    )
    frozen = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.GELU(), nn.Linear(5, 2))
    frozen[0].weight.requires_grad_(False)  # shared by every run, not trained
    return [
        ("relu-tanh, closed-form CE", relu, ce, (X, y), True),
        ("one linear layer, closed-form CE", linear, ce, (X, y), True),
        ("flatten/nested/leaky/silu, CE by autograd", nested, ce, (X3, y), False),
        ("frozen weight, sigmoid/gelu, MSE", frozen, _mse, (X, Y2), False),
    ]


_CASES = _stacked_cases()


def _removal_weights(runs, n):
    w = torch.ones(runs, n, dtype=torch.float64)
    for r in range(1, runs):
        w[r] *= n / (n - 2)
        w[r, [r, (3 * r) % n]] = 0.0
    return w


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_stacked_evaluation_is_each_runs_own_autograd_gradient(case):
    """StackedSequential against R separate plain-autograd evaluations, in float64."""
    _, model, loss, (X, y), closed_form = case
    model = model.double()
    params = [p for p in model.parameters() if p.requires_grad]
    stacked = StackedSequential(model, params)
    assert stacked.applicable
    runs, n = 4, len(X)
    gen = torch.Generator().manual_seed(2)
    start = torch.cat([p.detach().reshape(-1) for p in params])
    theta = start + 0.3 * torch.randn(runs, start.numel(), generator=gen, dtype=torch.float64)
    w = _removal_weights(runs, n)
    prepared = stacked.prepare(loss, (X, y), runs)
    assert (prepared.inputs is not None) == closed_form
    grad, value = stacked(loss, theta, w, prepared)
    for r in range(runs):
        net = copy.deepcopy(model)
        mine = [p for p in net.parameters() if p.requires_grad]
        torch.nn.utils.vector_to_parameters(theta[r], mine)
        v = (w[r] * loss(net, (X, y))).sum()
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, mine)])
        torch.testing.assert_close(grad[r], expected, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(value[r], v.detach(), atol=1e-12, rtol=1e-12)
    if closed_form:  # the generic loss path gives the same numbers
        generic = dataclasses.replace(prepared, inputs=None)
        g2, v2 = stacked(loss, theta, w, generic)
        torch.testing.assert_close(g2, grad, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(v2, value, atol=1e-12, rtol=1e-12)


def _engine_pair(model, loss, data, decays, chunk_size):
    kw = {"lr": 0.1, "momentum": 0.9, "chunk_size": chunk_size}
    fast = BatchedSGD(model, loss, decays, IndexedData(data), **kw)
    slow = BatchedSGD(model, loss, decays, IndexedData(data), **kw)
    slow._stacked = None  # vmap only
    return fast, slow


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_engine_stacked_path_equals_vmap_path_over_steps(case):
    """Full-batch (several chunks) and minibatch steps with removals, momentum and per-tensor
    weight decay: the stacked engine tracks the vmapped one to round-off."""
    _, model, loss, data, _ = case
    model = model.double()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    decays = [0.01 * (k % 3) for k in range(len(names))]  # groups, some without decay
    fast, slow = _engine_pair(model, loss, data, decays, chunk_size=12)
    assert fast._stacked is not None
    weights = _removal_weights(5, len(data[0]))
    fast.begin(weights)
    slow.begin(weights)
    index = torch.tensor([0, 4, 9, 17, 25])
    for step in range(8):
        batch = index if step % 4 == 3 else None
        g_fast, v_fast, n_fast = fast.gradient(batch)
        g_slow, v_slow, n_slow = slow.gradient(batch)
        torch.testing.assert_close(g_fast, g_slow, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(v_fast, v_slow, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(n_fast, n_slow, atol=1e-12, rtol=1e-10)
        fast.step(g_fast)
        slow.step(g_slow)
    assert fast._stacked is not None  # really the stacked path
    assert fast._stacked_verified
    torch.testing.assert_close(fast.theta, slow.theta, atol=1e-12, rtol=1e-10)
    assert float((fast.theta - fast.start).norm(dim=1).min()) > 1e-3  # the runs moved


def _mixing_loss(model, batch):
    """Per-example cross-entropy scaled by the batch mean: it mixes the examples."""
    x, y = batch
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    return losses * losses.mean()


def test_a_loss_that_mixes_examples_fails_the_check_and_keeps_vmap(mlp_problem):
    model, _, (X, y), _ = mlp_problem
    fast, slow = _engine_pair(model, _mixing_loss, (X, y), 0.01, chunk_size=40)
    assert fast._stacked is not None  # the model qualifies ...
    weights = _removal_weights(3, len(y))
    fast.begin(weights)
    slow.begin(weights)
    for _ in range(3):
        g_fast, _, _ = fast.gradient()
        g_slow, _, _ = slow.gradient()
        torch.testing.assert_close(g_fast, g_slow, atol=0, rtol=0)
        fast.step(g_fast)
        slow.step(g_slow)
    assert fast._stacked is None  # ... but the loss does not: vmap from the first step on


class _SequentialSubclass(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


@pytest.mark.parametrize(
    "model",
    [
        _SequentialSubclass(nn.Linear(3, 3)),
        nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0), nn.Linear(3, 3)),
        nn.Sequential(nn.Flatten(start_dim=0), nn.Linear(3, 3)),
        nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)),
        _NoVmap(),
    ],
    ids=["subclass", "dropout", "flatten-batch", "layernorm", "custom-module"],
)
def test_models_outside_the_stacked_form_keep_vmap(mlp_problem, model):
    _, objective, (X, y), _ = mlp_problem
    model = model.double()
    params = [p for p in model.parameters() if p.requires_grad]
    assert not StackedSequential(model, params).applicable
    engine = BatchedSGD(model, objective.per_example_loss, 0.0, IndexedData((X, y)), lr=0.1)
    assert engine._stacked is None


def test_a_model_at_an_exact_minimum_still_takes_the_batched_path(monkeypatch):
    """Every ReLU dead and the output bias at the log class frequencies: the gradient is zero
    up to round-off, which the engine's check must not compare with round-off."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    y = torch.arange(40) % 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    with torch.no_grad():
        model[0].weight.mul_(0.1)
        model[0].bias.fill_(-5.0)
        model[2].weight.zero_()
        model[2].bias.copy_((torch.bincount(y, minlength=3).double() / 40).log())
    objective = Objective("cross_entropy")
    loss = nn.functional.cross_entropy(model(X), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert max(float(g.abs().max()) for g in grads) < 1e-15
    problem = (model, objective, (X, y), (X[:5], y[:5]))
    kw = {
        "config": RetrainConfig(optimizer="sgd", lr=0.2, momentum=0.9, max_steps=30, grad_tol=None),
        "progress": False,
    }
    alone = retrain_ground_truth(*problem, [0, 1, [2, 3]], parallel_runs=1, **kw)
    calls = _count_sequential(monkeypatch)
    batched = retrain_ground_truth(*problem, [0, 1, [2, 3]], parallel_runs=3, **kw)
    assert calls == []
    torch.testing.assert_close(batched.raw_change, alone.raw_change, atol=1e-12, rtol=1e-10)
    assert float(alone.param_change_norm.min()) > 1e-4  # the output bias moved


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_gradient_only_and_in_place_steps_keep_every_bit(case):
    """``gradient_only`` is ``gradient``'s first output, and the in-place update gives the
    bits of the out-of-place heavy ball (b = mu b + g, theta = theta - lr b), step by step,
    full-batch and minibatch, without overwriting the caller's gradient."""
    _, model, loss, data, _ = case
    model = model.double()
    lr, mu = 0.1, 0.9
    engine = BatchedSGD(model, loss, 0.01, IndexedData(data), lr=lr, momentum=mu, chunk_size=12)
    weights = _removal_weights(5, len(data[0]))
    engine.begin(weights)
    engine.gradient()  # the first evaluation verifies the stacked path against vmap
    engine.begin(weights)
    theta, buf = engine.theta.clone(), None
    for step in range(6):
        batch = torch.tensor([0, 4, 9, 17]) if step == 3 else None
        g, _, _ = engine.gradient(batch)
        only = engine.gradient_only(batch)
        assert torch.equal(only, g)
        engine.step(only)
        assert torch.equal(only, g)  # not the buffer, not modified
        buf = g if buf is None else mu * buf + g
        theta = theta - lr * buf
        assert torch.equal(engine.theta, theta)
    assert float((engine.theta - engine.start).norm(dim=1).min()) > 1e-3  # the runs moved


def test_a_diverging_fixed_length_group_is_stopped_at_a_check(mlp_problem, monkeypatch):
    """Fixed step counts check the objective every CHECK_EVERY steps (and after the last):
    a run that blows up is still a NonFiniteError, naming the step of the check."""
    model, objective, (X, y), test = mlp_problem
    calls = _count_sequential(monkeypatch)
    cfg = RetrainConfig(optimizer="sgd", lr=1e5, max_steps=300, grad_tol=None)
    with pytest.raises(NonFiniteError, match="non-finite") as info:
        retrain_ground_truth(
            model, objective, (X, y), test, [0, 1, 2], config=cfg, parallel_runs=4,
            progress=False,
        )  # fmt: skip
    assert calls == []  # the batched engine ran the group
    step = int(str(info.value).split("stopped at step ")[1].split(":")[0])
    assert step in {*range(CHECK_EVERY, cfg.max_steps, CHECK_EVERY), cfg.max_steps}
