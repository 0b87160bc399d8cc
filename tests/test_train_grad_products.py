"""Products and moments of the training gradients without forming ``[b, p]`` for nn.Linear
models: ``V g_i`` (what scoring uses) and the sums the minimum check needs, each equal to what
the formed gradients give."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from infl import (
    KFAC,
    Arnoldi,
    ExactHessian,
    InfluenceCalculator,
    ModelWrapper,
    Objective,
    calculator_setup,
)
from infl.errors import InflWarning, NonFiniteError
from infl.linear_grads import LinearPerExampleGradients
from infl.streaming import SOLVER_WORK_VECTORS
from problems import BatchCentred

DECAY = 0.1


def _mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    """p = 295; the weights in the space have output widths 12 + 3, so products of up to
    295 / (2 * 15) = 9 vectors are taken directly."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)
    )  # fmt: skip
    model[2].weight.requires_grad_(False)  # a frozen weight: its bias stays in the space
    return model.to(dtype).eval()


DIRECT = 9


def _data(n: int, dtype: torch.dtype = torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=gen, dtype=dtype)
    return x, torch.randint(0, 3, (n,), generator=gen)


def _formed(wrapper: ModelWrapper) -> list[int]:
    """Count the calls that form ``[b, p]`` training gradients."""
    calls = [0]
    original = wrapper.train_grads

    def counted(batch, **kwargs):
        calls[0] += 1
        return original(batch, **kwargs)

    wrapper.train_grads = counted  # type: ignore[method-assign]
    return calls


class _Wrapped(nn.Module):
    """The same layers behind a custom module: the shortcut applies but is not row-wise by
    construction (``rowwise_by_construction`` knows only ``nn.Sequential``), so it is checked."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("k", [1, 3, DIRECT])
@pytest.mark.parametrize("wrapped", [False, True], ids=["sequential", "custom"])
def test_products_equal_the_formed_gradients_times_the_vectors(k, wrapped):
    model = _Wrapped(_mlp()) if wrapped else _mlp()
    wrapper = ModelWrapper(model, Objective("cross_entropy", weight_decay=DECAY))
    x, y = _data(12)
    vectors = torch.randn(k, wrapper.num_params, dtype=torch.float64)
    formed = _formed(wrapper)
    first = wrapper.train_grad_products((x[:5], y[:5]), vectors)  # checks the shortcut
    second = wrapper.train_grad_products((x[5:], y[5:]), vectors)
    # a custom module: the first batch only (the check), then products directly; a plain
    # nn.Sequential needs no check
    assert formed[0] == (1 if wrapped else 0)
    assert wrapper.multiplies_directly(k)
    expected = vectors @ wrapper.train_grads((x, y)).T  # weight decay included
    torch.testing.assert_close(torch.cat([first, second], 1), expected, rtol=1e-12, atol=1e-13)


def test_more_vectors_than_pay_form_the_gradients():
    wrapper = ModelWrapper(_mlp(), Objective("cross_entropy", weight_decay=DECAY))
    x, y = _data(12)
    vectors = torch.randn(DIRECT + 1, wrapper.num_params, dtype=torch.float64)
    formed = _formed(wrapper)
    got = [wrapper.train_grad_products((x[i : i + 4], y[i : i + 4]), vectors) for i in (0, 4, 8)]
    assert formed[0] == 3
    assert wrapper.has_linear_shortcut
    assert not wrapper.multiplies_directly(DIRECT + 1)
    expected = vectors @ wrapper.train_grads((x, y)).T
    torch.testing.assert_close(torch.cat(got, 1), expected, rtol=1e-12, atol=1e-13)


def test_linear_products_in_row_blocks_equal_the_formed_products():
    model = _mlp()
    names = [n for n, q in model.named_parameters() if q.requires_grad]
    shortcut = LinearPerExampleGradients(model, names)
    params = {n: q.detach() for n, q in model.named_parameters() if q.requires_grad}
    x, y = _data(7)

    def evaluate(leaves):
        out = torch.func.functional_call(model, leaves, (x,))
        return nn.functional.cross_entropy(out, y, reduction="none")

    p = sum(q.numel() for q in params.values())
    vectors = torch.randn(25, p, dtype=torch.float64)  # more rows than any layer has inputs
    got = shortcut.products(evaluate, params, 7, vectors)
    torch.testing.assert_close(got, vectors @ shortcut(evaluate, params, 7).T)


def test_products_are_in_the_vectors_dtype():
    wrapper = ModelWrapper(_mlp(torch.float32), Objective("cross_entropy", weight_decay=DECAY))
    x, y = _data(7, torch.float32)
    vectors = torch.randn(2, wrapper.num_params, dtype=torch.float64)
    wrapper.train_grad_products((x, y), vectors)
    got = wrapper.train_grad_products((x, y), vectors)
    assert got.dtype == torch.float64
    expected = vectors @ wrapper.train_grads((x, y)).double().T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_model_that_mixes_the_batch_forms_its_gradients():
    wrapper = ModelWrapper(BatchCentred(in_features=20).double().eval(), Objective())
    x, y = _data(6)
    y = y % 2  # two classes
    vectors = torch.randn(2, wrapper.num_params, dtype=torch.float64)
    assert wrapper.has_linear_shortcut  # not yet checked
    got = wrapper.train_grad_products((x, y), vectors)
    assert not wrapper.has_linear_shortcut  # the check refused the shortcut
    torch.testing.assert_close(got, vectors @ wrapper.train_grads((x, y)).T)


def test_a_non_finite_gradient_is_named_by_its_example():
    wrapper = ModelWrapper(_mlp(), Objective())
    x, y = _data(6)
    vectors = torch.randn(1, wrapper.num_params, dtype=torch.float64)
    wrapper.train_grad_products((x, y), vectors)
    x[3, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="example 3"):
        wrapper.train_grad_products((x, y), vectors)


def _calculators(solver, chunk_size: int = 16, **options):
    """The same calculator twice: products formed directly, and through ``[n, p]``."""
    x, y = _data(40, seed=1)
    objective = Objective("cross_entropy", weight_decay=DECAY)
    out = []
    for direct in (True, False):
        calc = InfluenceCalculator(
            _mlp(), objective, (x, y), solver, chunk_size=chunk_size, progress=False,
            check_minimum=False, **options,
        )  # fmt: skip
        calc.wrapper._linear_grads.applicable = direct
        out.append(calc)
    return out, _data(3, seed=2)


@pytest.mark.parametrize("solver", [ExactHessian(damping=1.0), Arnoldi(rank=8, damping=1.0)])
def test_influence_from_products_equals_influence_from_formed_gradients(solver):
    (direct, formed), test = _calculators(solver)
    got = direct.influence(test)
    torch.testing.assert_close(got, formed.influence(test), rtol=1e-10, atol=1e-12)
    assert direct._grad_cache.value is None  # [n, p] was never formed nor kept


def test_tiles_under_a_memory_budget_equal_the_formed_gradients(tmp_path):
    p = sum(q.numel() for q in _mlp().parameters() if q.requires_grad)
    budget = 2 * (SOLVER_WORK_VECTORS * p + 16) * 8  # one test row per block: three blocks
    (direct, formed), test = _calculators(
        ExactHessian(damping=1.0), chunk_size=4, memory_budget=budget
    )
    store = direct.influence(test, out=tmp_path / "scores.npy")
    assert store.row_blocks == 3
    torch.testing.assert_close(store.scores(), formed.influence(test), rtol=1e-10, atol=1e-12)


def test_moments_equal_those_of_the_formed_gradients():
    wrapper = ModelWrapper(_mlp(), Objective("cross_entropy", weight_decay=DECAY))
    x, y = _data(12)
    formed = _formed(wrapper)
    first = wrapper.train_grad_moments((x[:5], y[:5]))  # checks the shortcut on two rows
    assert wrapper._linear_verified[wrapper.objective.per_example_loss] is True
    second = wrapper.train_grad_moments((x[5:], y[5:]))
    assert formed[0] == 0  # the check's rows come from the layers' factors, not [b, p]
    grads = wrapper.train_grads((x, y))  # weight decay included
    torch.testing.assert_close(first[0] + second[0], grads.sum(0), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(first[1] + second[1], (grads * grads).sum().reshape(1))


def test_a_non_finite_moment_is_named_by_its_example():
    wrapper = ModelWrapper(_mlp(), Objective())
    x, y = _data(6)
    wrapper.train_grad_moments((x, y))
    x[4, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="example 4"):
        wrapper.train_grad_moments((x, y))


def test_the_minimum_check_of_a_linear_model_forms_no_gradients():
    x, y = _data(40, seed=1)
    objective = Objective("cross_entropy", weight_decay=DECAY)
    found = []
    for direct in (True, False):
        calc = InfluenceCalculator(
            _mlp(), objective, (x, y), ExactHessian(damping=1.0), chunk_size=16,
            progress=False, check_minimum=False,
        )  # fmt: skip
        calc.wrapper._linear_grads.applicable = direct
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InflWarning)  # an untrained model: not a minimum
            found.append(calculator_setup.check_minimum(calc))
        assert (calc._grad_cache.value is None) is direct  # formed and cached without it
    (direct, formed) = (dataclasses.asdict(s) for s in found)
    assert direct.keys() == formed.keys()
    for key, value in direct.items():
        if isinstance(value, float):
            assert value == pytest.approx(formed[key], rel=1e-10, abs=1e-14), key


# ------------------------------------------------------------------ convolutional models
def _cnn() -> nn.Module:
    """Convolutions (one wide enough for the per-example kernel), a GroupNorm and a linear
    head: the models of :class:`~infl.layer_grads.LayerPerExampleGradients`."""
    torch.manual_seed(3)
    return (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.GroupNorm(2, 4),
            nn.Tanh(),
            nn.Conv2d(4, 40, 3, stride=2, padding=1),  # 360 inputs per filter: per example
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(40 * 16, 3),
        )
        .double()
        .eval()
    )


def _images(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize("slice_bytes", [1, 3 * 40 * 360 * 8, 64 << 20])  # 1, 3 or all rows
def test_conv_products_by_slices_equal_the_formed_gradients(monkeypatch, slice_bytes):
    """A convolutional model's products come from its gradients formed a few examples at a
    time (``SLICE_BYTES``; the widest layer has 14,400 weights): once the shortcut is
    checked, no ``[b, p]`` is formed, and the products equal the formed gradients' with the
    weight-decay term."""
    from infl import layer_grads

    monkeypatch.setattr(layer_grads, "SLICE_BYTES", slice_bytes)
    wrapper = ModelWrapper(_cnn(), Objective("cross_entropy", weight_decay=DECAY))
    x, y = _images(9)
    vectors = torch.randn(4, wrapper.num_params, dtype=torch.float64)
    formed = _formed(wrapper)
    first = wrapper.train_grad_products((x[:4], y[:4]), vectors)  # checks the shortcut
    second = wrapper.train_grad_products((x[4:], y[4:]), vectors)
    assert formed[0] == 1
    expected = vectors @ wrapper.train_grads((x, y)).T
    torch.testing.assert_close(torch.cat([first, second], 1), expected, rtol=1e-12, atol=1e-13)


def test_conv_products_name_a_non_finite_example():
    wrapper = ModelWrapper(_cnn(), Objective())
    x, y = _images(5)
    vectors = torch.randn(2, wrapper.num_params, dtype=torch.float64)
    wrapper.train_grad_products((x, y), vectors)
    x[2, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="example 2"):
        wrapper.train_grad_products((x, y), vectors)


def test_conv_influence_without_the_cache_forms_no_gradients():
    """Scoring a convolutional model whose ``[n, p]`` does not fit in ``cache_bytes`` takes
    the products chunk by chunk, forming no ``[b, p]``: the scores equal those through the
    filled cache."""
    x, y = _images(20, seed=1)
    test = _images(3, seed=2)
    found = []
    for cache_bytes in (0, 1 << 30):
        calc = InfluenceCalculator(
            _cnn(), Objective("cross_entropy", weight_decay=DECAY), (x, y),
            KFAC(damping=0.1, unsupported="diagonal"), chunk_size=8, progress=False,
            check_minimum=False,
            cache_bytes=cache_bytes,
        )  # fmt: skip
        formed = _formed(calc.wrapper)
        found.append(calc.influence(test))
        assert (calc._grad_cache.value is None) is (cache_bytes == 0)
        # the test gradients checked the shortcut first: none formed, or all three chunks
        assert formed[0] == (0 if cache_bytes == 0 else 3)
    torch.testing.assert_close(found[0], found[1], rtol=1e-10, atol=1e-12)
