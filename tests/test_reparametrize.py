"""ModuleCall: the module at given tensors, as torch.func.functional_call computes it."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parametrize

import infl
from infl.reparametrize import ModuleCall


def _others(module: nn.Module) -> dict[str, torch.Tensor]:
    """A different tensor for every parameter and buffer (named as the module names them)."""
    gen = torch.Generator().manual_seed(1)
    out = {n: torch.randn(t.shape, generator=gen) for n, t in module.named_parameters()}
    for n, t in module.named_buffers():  # positive: running variances
        out[n] = torch.rand(t.shape, generator=gen) + 0.5 if t.is_floating_point() else t + 1
    return out


def _own(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*module.named_parameters(), *module.named_buffers()]}


def _same_tensors(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """The module holds its own Parameters again, with their values unchanged."""
    for name, param in module.named_parameters():
        assert isinstance(param, nn.Parameter), name
        assert torch.equal(param, before[name]), name
    for name, buf in module.named_buffers():
        assert torch.equal(buf, before[name]), name


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4, bias=False)
        self.head = nn.Linear(4, 3, bias=True)
        self.back = nn.Linear(4, 3, bias=False)
        self.back.weight = self.head.weight  # tied: named_parameters() names it once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        return self.head(h) + self.back(h)


class Shared(nn.Module):
    """One submodule called twice and registered under two names (one dict, two paths)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(3, 3)
        self.again = self.block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.again(torch.relu(self.block(x)))


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2))
    bn.eval()
    return {
        "mlp": nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)),
        "conv+batchnorm buffers": bn,
        "tied": Tied(),
        "shared submodule": Shared(),
        "lstm (own __setattr__)": nn.LSTM(3, 4, batch_first=True),
    }


def _inputs(name: str) -> torch.Tensor:
    torch.manual_seed(2)
    if name.startswith("conv"):
        return torch.randn(4, 2, 4, 4)
    if name.startswith("lstm"):
        return torch.randn(4, 5, 3)
    return torch.randn(4, 3)


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[index,return-value]


@pytest.mark.parametrize("name", list(_models()))
def test_equals_functional_call_and_restores_the_module(name: str) -> None:
    module = _models()[name]
    x = _inputs(name)
    tensors = _others(module)
    names = list(tensors)
    before = _own(module)
    own = _first(module(x))
    # on a copy: functional_call leaves a submodule registered twice holding the given tensors
    expected = _first(functional_call(copy.deepcopy(module), tensors, (x,)))
    call = ModuleCall(module, names)
    got = _first(call(tensors, (x,)))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, own)  # the given tensors were used
    _same_tensors(module, before)
    torch.testing.assert_close(_first(module(x)), own, rtol=0, atol=0)
    assert call.direct == (not name.startswith("lstm"))


def test_tied_alias_follows_the_given_name() -> None:
    module = Tied()
    tensors = _others(module)
    assert "back.weight" not in tensors  # named once, as named_parameters() names it
    call = ModuleCall(module, list(tensors))
    x = _inputs("tied")
    h = torch.tanh(x @ tensors["embed.weight"].T)
    by_hand = h @ tensors["head.weight"].T + tensors["head.bias"] + h @ tensors["head.weight"].T
    torch.testing.assert_close(call(tensors, (x,)), by_hand)
    assert module.back.weight is module.head.weight


class SharedLSTM(nn.Module):
    """A module with its own ``__setattr__`` (the fallback) and a head registered twice."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)
        self.again = self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.again(self.rnn(x)[0][:, -1])


def test_the_fallback_restores_what_functional_call_leaves_behind() -> None:
    module = SharedLSTM()
    own = dict(module.named_parameters(remove_duplicate=False))
    names = [n for n, _ in module.named_parameters()]
    tensors = {n: t + 1.0 for n, t in _others(module).items()}
    call = ModuleCall(module, names)
    assert not call.direct
    x = _inputs("lstm")
    expected = functional_call(copy.deepcopy(module), tensors, (x,))
    torch.testing.assert_close(call(tensors, (x,)), expected, rtol=0, atol=0)
    now = dict(module.named_parameters(remove_duplicate=False))
    assert list(now) == list(own)  # the same names in the same order
    assert all(now[n] is own[n] for n in own)  # the module's own Parameter objects
    flat = module.rnn._flat_weights
    names_ = module.rnn._flat_weights_names
    assert all(w is getattr(module.rnn, n) for w, n in zip(flat, names_, strict=True))


def test_two_names_for_one_tied_tensor_fall_back() -> None:
    module = Tied()
    names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
    assert not ModuleCall(module, names).direct


def test_unknown_name_falls_back() -> None:
    module = nn.Linear(2, 2)
    assert not ModuleCall(module, ["weight", "bias", "nope"]).direct


def test_parametrized_module_falls_back_and_agrees() -> None:
    class Symmetric(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w.triu() + w.triu(1).T

    module = nn.Linear(3, 3)
    parametrize.register_parametrization(module, "weight", Symmetric())
    tensors = _others(module)
    call = ModuleCall(module, list(tensors))
    assert not call.direct
    x = _inputs("mlp")
    torch.testing.assert_close(call(tensors, (x,)), functional_call(module, tensors, (x,)))


def test_keywords_reach_the_forward() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
            return scale * self.lin(x)

    module = Scaled()
    tensors = _others(module)
    x = _inputs("mlp")
    got = ModuleCall(module, list(tensors))(tensors, (x,), {"scale": 3.0})
    torch.testing.assert_close(got, functional_call(module, tensors, (x,), {"scale": 3.0}))


def test_an_error_in_forward_restores_the_module() -> None:
    module = nn.Sequential(nn.Linear(3, 5), nn.Linear(4, 2))  # 5 -> 4: a shape error
    before = _own(module)
    tensors = _others(module)
    call = ModuleCall(module, list(tensors))
    with pytest.raises(RuntimeError):
        call(tensors, (_inputs("mlp"),))
    _same_tensors(module, before)
    with pytest.raises(KeyError):  # a missing tensor: nothing left half swapped
        call({"0.weight": tensors["0.weight"]}, (_inputs("mlp"),))
    _same_tensors(module, before)


def test_gradients_and_vmap_through_the_call() -> None:
    module = _models()["mlp"]
    tensors = _others(module)
    call = ModuleCall(module, list(tensors))
    x = _inputs("mlp")

    def loss(params: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return call(params, (xi[None],)).square().sum()

    def reference(params: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(module, params, (xi[None],)).square().sum()

    got = vmap(grad(loss), in_dims=(None, 0))(tensors, x)
    expected = vmap(grad(reference), in_dims=(None, 0))(tensors, x)
    for n in tensors:
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=0)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copy_calls_its_own_module(how: str) -> None:
    module = _models()["mlp"]
    tensors = _others(module)
    call = ModuleCall(module, list(tensors))
    twin = pickle.loads(pickle.dumps(call)) if how == "pickle" else copy.deepcopy(call)
    assert twin.module is not module
    assert twin.direct
    x = _inputs("mlp")
    torch.testing.assert_close(twin(tensors, (x,)), call(tensors, (x,)), rtol=0, atol=0)
    twin.module[0].weight.data.zero_()  # the copy's slots are the copy's module
    assert not torch.equal(module[0].weight, twin.module[0].weight)
    torch.testing.assert_close(twin(tensors, (x,)), call(tensors, (x,)), rtol=0, atol=0)


@pytest.mark.parametrize("solver", [infl.EKFAC(damping=0.1), infl.ExactHessian(damping=10.0)])
def test_calculator_never_leaves_its_tensors_in_the_module(solver: infl.Solver) -> None:
    # the shared submodule: torch.func.functional_call would leave it holding infl's copies
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    model.add_module("again", model[0])
    x, y = torch.randn(20, 3), torch.randint(0, 3, (20,))
    before = _own(model)
    calc = infl.InfluenceCalculator(
        model, infl.Objective("cross_entropy"), (x, y), solver, progress=False, check_minimum=False
    )
    calc.influence((x[:2], y[:2]))
    calc.self_influence()
    _same_tensors(model, before)
    assert calc.wrapper.module_call.direct
