"""The engine-free MLP cross-entropy gradient (infl.studies.mlp_gradient) equals autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from infl.studies import fragility
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
