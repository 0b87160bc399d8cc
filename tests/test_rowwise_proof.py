"""The check of a per-example-gradient shortcut against autograd is skipped only where the
model's structure proves it (``model_checks.rowwise_by_construction``): an ``nn.Sequential``
of exactly ``nn.Linear`` and element-wise activations, no hooks, the objective's built-in
loss. Anything else keeps the numerical check, which a model that mixes examples fails."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

from infl import ModelWrapper, Objective, model_checks
from infl.objective import LogitMeasurement


class _Subclassed(nn.Linear):
    pass


class _OwnSequential(nn.Sequential):
    pass


def _mlp(first: type[nn.Linear] = nn.Linear) -> nn.Sequential:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(6, 5), nn.ReLU())
    return nn.Sequential(first(3, 6), nn.Tanh(), inner, nn.Linear(5, 2)).double().eval()


def _data(n: int = 7):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randint(
        0, 2, (n,), generator=gen
    )


def _alone(wrapper: ModelWrapper, batch) -> torch.Tensor:
    """Each example's loss gradient on its own (``vmap(grad)``), ``[b, p]``."""
    loss = wrapper.objective.per_example_loss

    def single(params, x, y):
        return loss(lambda inp: torch.func.functional_call(wrapper.model, params, (inp,)),
                    (x[None], y[None])).sum()  # fmt: skip

    grads = vmap(grad(single), in_dims=(None, 0, 0))(wrapper.params, *batch)
    return wrapper.flatten(grads, batch_dims=1)


def _no_reference(monkeypatch) -> None:
    def refuse(*args):
        raise AssertionError("the numerical check ran")

    monkeypatch.setattr(model_checks, "single_example_grads", refuse)


def test_a_plain_linear_sequential_is_proved_and_not_checked(monkeypatch):
    wrapper = ModelWrapper(_mlp(), Objective("cross_entropy"))
    _no_reference(monkeypatch)
    batch = _data()
    grads = wrapper.per_example_grads(wrapper.objective.per_example_loss, batch)
    assert wrapper._linear_verified[wrapper.objective.per_example_loss] is True
    torch.testing.assert_close(grads, _alone(wrapper, batch), rtol=1e-12, atol=1e-14)


def test_a_hook_that_mixes_the_examples_is_caught_by_the_check():
    model = _mlp()
    model[0].register_forward_hook(lambda _m, _a, out: out - out.mean(dim=0, keepdim=True))
    wrapper = ModelWrapper(model, Objective("cross_entropy"))
    assert not model_checks.rowwise_by_construction(wrapper, wrapper.objective.per_example_loss)
    batch = _data()
    grads = wrapper.per_example_grads(wrapper.objective.per_example_loss, batch)
    assert wrapper._linear_verified[wrapper.objective.per_example_loss] is False
    torch.testing.assert_close(grads, _alone(wrapper, batch), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "case", ["subclass", "dropout", "custom loss", "measurement", "global hook", "not sequential"]
)
def test_anything_else_keeps_the_numerical_check(case):
    model = _mlp(_Subclassed if case == "subclass" else nn.Linear)
    if case == "dropout":
        model.append(nn.Dropout(0.1)).eval()
    if case == "not sequential":
        model = _OwnSequential(*model)  # a subclass may override forward
    objective = Objective(
        (lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none"))
        if case == "custom loss"
        else "cross_entropy"
    )
    wrapper = ModelWrapper(model, objective)
    fn = LogitMeasurement(0) if case == "measurement" else wrapper.objective.per_example_loss
    handle = None
    if case == "global hook":
        handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not model_checks.rowwise_by_construction(wrapper, fn)
    finally:
        if handle is not None:
            handle.remove()
