"""The engine-free MLP cross-entropy gradient (infl.studies.mlp_gradient) equals autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from infl.studies import fragility, training
from infl.studies.mlp_gradient import MlpCrossEntropyGradient
from infl.studies.models import mlp


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (50,), generator=gen)
    return x, y


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_gradient_is_autograds_bit_for_bit(data, activation, depth):
    x, y = data
    model = mlp(4, 3, 6, depth, activation, seed=depth).double()
    params = list(model.parameters())
    fast = MlpCrossEntropyGradient(model, params)
    assert fast.applicable
    reference = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
    mine = fast(x, y)
    assert len(mine) == len(params)
    for a, b in zip(mine, reference, strict=True):
        assert torch.equal(a, b)
    assert fast.check(x, y, reference)
    wrong = [g.clone() for g in reference]
    wrong[0][0, 0] += 1e-15 * (1 + abs(float(wrong[0][0, 0])))
    assert not fast.check(x, y, wrong)  # one bit off is a mismatch


class _Scaled(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(4, 3, bias=False)),
        nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)),
        nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.ReLU(), nn.Linear(5, 3)),
        nn.Sequential(nn.Linear(4, 5), nn.ReLU()),
        _Scaled(nn.Linear(4, 3)),
        nn.Linear(4, 3),
    ],
    ids=["no-bias", "sigmoid", "two-activations", "ends-in-activation", "subclass", "bare"],
)
def test_other_models_are_not_applicable(model):
    model = model.double()
    fast = MlpCrossEntropyGradient(model, list(model.parameters()))
    assert not fast.applicable
    assert not fast.check(torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2).long(), [])


def test_frozen_parameters_are_not_applicable():
    model = mlp(4, 3, 5, 1, "relu", seed=0).double()
    model[0].weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    assert not MlpCrossEntropyGradient(model, params).applicable


@pytest.mark.parametrize("model", ["tanh-deep", "sigmoid"])
def test_full_batch_training_stays_torch_sgd_bit_for_bit(data, model):
    """Through the engine-free gradient (tanh MLP) and through autograd (sigmoid: not
    applicable), train_full_batch is torch.optim.SGD."""
    x, y = data

    def build():
        if model == "tanh-deep":
            return mlp(4, 3, 5, 3, "tanh", seed=3).double()
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)).double()

    ours, reference = build(), build()
    fragility.train_full_batch(ours, (x, y), 1e-3, 25, 0.1, 0.9)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(25):
        opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.step()
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_loss_seed_follows_new_and_modified_targets(data):
    """The constant nll_loss_backward is recomputed for other targets, and for the same
    tensor changed in place: every call still equals autograd bit for bit."""
    x, y = data
    model = mlp(4, 3, 6, 2, "relu", seed=1).double()
    params = list(model.parameters())
    fast = MlpCrossEntropyGradient(model, params)
    targets = y.clone()
    for change in ("first", "same", "other tensor", "in place", "fewer examples"):
        if change == "other tensor":
            targets = (targets + 1) % 3
        elif change == "in place":
            targets[:10] = (targets[:10] + 1) % 3
        inputs = x
        if change == "fewer examples":
            inputs, targets = x[:20], targets[:20]
        reference = torch.autograd.grad(nn.functional.cross_entropy(model(inputs), targets), params)
        for a, b in zip(fast(inputs, targets), reference, strict=True):
            assert torch.equal(a, b), change


def _sgd_reference(model, x, y, steps, weight_decay, momentum, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("flat", [True, False], ids=["flat-update", "per-tensor-update"])
@pytest.mark.parametrize(("weight_decay", "momentum"), [(1e-3, 0.9), (0.0, 0.9), (1e-3, 0.0)])
def test_both_update_forms_are_torch_sgd_bit_for_bit(data, monkeypatch, flat, weight_decay,
                                                     momentum):  # fmt: skip
    """The flat update (parameters as views of one buffer, one call per operation) and the
    per-tensor one (used when the first step's comparison fails) each give torch.optim.SGD's
    parameters bit for bit; the flat one is really taken on this build, and afterwards every
    parameter has its own storage again."""
    x, y = data
    used = []
    step = training._HeavyBall.step

    def spy(self, grads):
        used.append(self.use_flat)
        return step(self, grads)

    monkeypatch.setattr(training._HeavyBall, "step", spy)
    if not flat:
        monkeypatch.setattr(training._HeavyBall, "flat_matches", lambda self, grads: False)
    ours = mlp(4, 3, 5, 3, "tanh", seed=4).double()
    reference = mlp(4, 3, 5, 3, "tanh", seed=4).double()
    training.train_full_batch(ours, (x, y), weight_decay, 30, 0.05, momentum)
    _sgd_reference(reference, x, y, 30, weight_decay, momentum)
    assert used == [flat] * 30
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    storages = {p.untyped_storage().data_ptr() for p in ours.parameters()}
    assert len(storages) == len(list(ours.parameters()))


def test_the_flat_update_is_refused_when_a_first_step_differs(data):
    """flat_matches compares the two forms of a step bit for bit: a gradient list whose
    flat buffer was tampered with (one ulp) is refused."""
    x, y = data
    model = mlp(4, 3, 5, 1, "relu", seed=0).double()
    params = list(model.parameters())
    flat = training._share_one_buffer(params)
    assert flat is not None
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in params)
    grads = list(torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params))
    sgd = training._HeavyBall(params, flat, 1e-3, 0.05, 0.9)
    assert sgd.flat_matches(grads)
    untouched = [p.detach().clone() for p in params]
    with torch.no_grad():
        flat[0] = torch.nextafter(flat[0], torch.tensor(2.0, dtype=flat.dtype))
    shadow = training._HeavyBall(untouched, flat, 1e-3, 0.05, 0.9)
    assert not shadow.flat_matches(grads)
