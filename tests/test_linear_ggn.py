"""The dense Gauss-Newton matrix of ``nn.Linear`` models from per-example Kronecker factors.

References are built per example with ``torch.autograd.functional`` (the model's output
Jacobian and the loss's Hessian in the outputs), float64, nothing taken from infl.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import infl.linear_ggn as kron
from infl import IndexedData, ModelWrapper, Objective
from infl.operators import GaussNewtonOperator
from reference_ggn import REFERENCE_LOSSES, reference_ggn

WD = 0.03


def _mlp() -> nn.Module:
    torch.manual_seed(4)
    return (
        nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
        .double()
        .eval()
    )


def _data(loss: str, n: int = 17):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, 3, (n,), generator=gen)
    elif loss == "mse":
        y = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    else:
        y = torch.randint(0, 2, (n, 3), generator=gen).double()
    return x, y


def _reference(model: nn.Module, x, y, loss: str) -> torch.Tensor:
    return reference_ggn(model, x, y, REFERENCE_LOSSES[loss], WD)


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = kron._block

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(kron, "_block", counted)
    return calls


def _no_jacobians(monkeypatch) -> None:
    """Make the per-example Jacobian route fail, so a result must come from the factors."""

    def refuse(*args, **kwargs):
        raise AssertionError("the Jacobian route ran: the Kronecker result was not accepted")

    monkeypatch.setattr(torch.func, "jacrev", refuse)


@pytest.mark.parametrize("loss", list(REFERENCE_LOSSES))
def test_the_kronecker_form_equals_the_per_example_reference(loss, monkeypatch) -> None:
    model = _mlp()
    x, y = _data(loss)
    calls = _counting(monkeypatch)
    _no_jacobians(monkeypatch)
    op = GaussNewtonOperator(ModelWrapper(model, Objective(loss, WD)), IndexedData((x, y)), 5)
    dense = op.to_dense()
    assert calls  # the Kronecker route was taken (4 chunks x 21 parameter pairs)
    assert op.num_matvecs == 0
    torch.testing.assert_close(dense, _reference(model, x, y, loss), rtol=1e-12, atol=1e-14)


def test_a_block_is_that_block_of_the_whole_matrix(monkeypatch) -> None:
    model = _mlp()
    x, y = _data("cross_entropy")
    wrapper = ModelWrapper(model, Objective("cross_entropy", WD))
    data = IndexedData((x, y))
    index = torch.tensor([0, 5, 18, 19, 30, 45, wrapper.num_params - 1])  # weights and biases
    _no_jacobians(monkeypatch)
    whole = wrapper.ggn_matrix(data, 7)
    block = wrapper.ggn_matrix(data, 7, index=index)
    assert whole is not None
    assert block is not None
    torch.testing.assert_close(block, whole[index][:, index], rtol=1e-13, atol=1e-15)


def test_a_wrong_kronecker_result_fails_its_check_and_the_jacobians_are_used(monkeypatch) -> None:
    model = _mlp()
    x, y = _data("cross_entropy")
    original = kron._block
    monkeypatch.setattr(kron, "_block", lambda *args: 1.001 * original(*args))
    wrapper = ModelWrapper(model, Objective("cross_entropy", WD))
    dense = wrapper.ggn_matrix(IndexedData((x, y)), 5)
    assert dense is not None
    expected = _reference(model, x, y, "cross_entropy")
    torch.testing.assert_close(dense, expected, rtol=1e-12, atol=1e-14)


def test_models_with_other_layers_take_the_jacobians(monkeypatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double().eval()
    x, y = _data("cross_entropy")
    calls = _counting(monkeypatch)
    dense = ModelWrapper(model, Objective("cross_entropy", WD)).ggn_matrix(IndexedData((x, y)), 5)
    assert not calls
    assert dense is not None
    torch.testing.assert_close(
        dense, _reference(model, x, y, "cross_entropy"), rtol=1e-12, atol=1e-14
    )
