"""Hessian-vector products of a small CNN run by hand (``infl.chain_hvp`` with
``infl.spatial_layers``): convolutions, max-poolings and flattens in the chain.

Every product is compared in float64 with ``torch.autograd.functional.hessian`` of the
training objective (``chain_cases.autograd_hessian``) or the Gauss-Newton matrix from
per-example autograd Jacobians (``reference_ggn``); where the test must know which route ran,
the other route is made to fail.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chain_cases as cc
from infl import IndexedData, ModelWrapper, Objective
from infl import chain_hvp as ch
from infl import model as model_module
from infl import spatial_layers as sl
from infl.operators import GaussNewtonOperator, HessianOperator
from infl.sequential_chain import chain_factors, chain_layers, primal_pass
from reference import rel_err
from reference_ggn import REFERENCE_LOSSES, reference_ggn

N = 12


def _case(name: str) -> tuple[nn.Module, str]:
    """``(model on [N, 2, 6, 6] images, loss)``."""
    torch.manual_seed(0)
    if name == "relu, pooled twice":
        modules: list[nn.Module] = [
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(4, 3),
        ]  # fmt: skip
    elif name == "smooth, strided, no bias":
        modules = [
            nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False), nn.Tanh(),
            nn.Conv2d(3, 4, 2), nn.Softplus(),
            nn.Flatten(), nn.Linear(16, 3),
        ]  # fmt: skip
    elif name == "overlapping pooling, dilation":
        modules = [
            nn.Conv2d(2, 3, 3, padding=1), nn.Sigmoid(),
            nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
            nn.Conv2d(3, 3, 2, dilation=2, padding=(1, 0)), nn.GELU(),
            nn.Flatten(), nn.Linear(24, 3),
        ]  # fmt: skip
    elif name == "mse, linear layers after":
        modules = [
            nn.Conv2d(2, 2, 3), nn.ELU(), nn.Conv2d(2, 3, 3), nn.Flatten(),
            nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3),
        ]  # fmt: skip
        return nn.Sequential(*modules).double().eval(), "mse"
    else:
        raise KeyError(name)
    return nn.Sequential(*modules).double().eval(), "cross_entropy"


CASES = [
    "relu, pooled twice",
    "smooth, strided, no bias",
    "overlapping pooling, dilation",
    "mse, linear layers after",
]


def _data(loss: str, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, 6, 6, generator=gen, dtype=torch.float64)
    return x, cc.targets(loss, n, 3, gen)


def _wrapper(model: nn.Module, loss: str, second_order: str = "auto") -> ModelWrapper:
    objective = Objective(loss, weight_decay=cc.WD)  # type: ignore[arg-type]
    return ModelWrapper(model, objective, second_order=second_order)  # type: ignore[arg-type]


def _vectors(p: int, k: int) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _refuse(what: str) -> Callable[..., torch.Tensor]:
    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError(f"{what} ran")

    return refuse


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", CASES)
def test_the_products_of_a_cnn_run_by_hand_are_the_hessian_times_the_vectors(
    case: str, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, loss = _case(case)
    x, y = _data(loss)
    hessian = cc.autograd_hessian(model, x, y, loss)
    monkeypatch.setattr(model_module, "hvp_double_backward", _refuse("double backward"))
    vectors = _vectors(hessian.shape[0], k)
    got = _wrapper(model, loss).hvp(IndexedData((x, y)), vectors, 5)
    assert rel_err(got, vectors @ hessian) < 1e-13


@pytest.mark.parametrize("case", CASES)
def test_the_gauss_newton_products_of_a_cnn_run_by_hand(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, loss = _case(case)
    x, y = _data(loss)
    ggn = reference_ggn(model, x, y, REFERENCE_LOSSES[loss], cc.WD)
    monkeypatch.setattr(ModelWrapper, "_ggn_chunk", _refuse("the torch.func route"))
    vectors = _vectors(ggn.shape[0], 2)
    got = _wrapper(model, loss).ggn_vp(IndexedData((x, y)), vectors, 5)
    assert rel_err(got, vectors @ ggn) < 1e-13


def test_frozen_convolutions_before_and_at_the_first_trainable_tensor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
        nn.Conv2d(3, 3, 3), nn.Flatten(), nn.Linear(3, 3),
    ).double().eval()  # fmt: skip
    model[0].requires_grad_(False)  # before every trainable tensor: no tangent through it
    model[3].weight.requires_grad_(False)  # the first trainable tensor is its bias
    x, y = _data("cross_entropy")
    hessian = cc.autograd_hessian(model, x, y, "cross_entropy")
    monkeypatch.setattr(model_module, "hvp_double_backward", _refuse("double backward"))
    vectors = _vectors(hessian.shape[0], 2)
    wrapper = _wrapper(model, "cross_entropy")
    assert rel_err(wrapper.hvp(IndexedData((x, y)), vectors, 5), vectors @ hessian) < 1e-13
    layers = chain_layers(wrapper, wrapper.objective.per_example_loss, spatial=True)
    assert layers is not None
    tensors = {**wrapper.fixed, **wrapper.params}
    loss = wrapper.objective.per_example_loss
    primal = primal_pass(layers, tensors, loss, wrapper.prepare((x, y)), curves=True)  # type: ignore[arg-type]
    assert primal is not None
    conv0, conv3, conv5 = primal.convs[0], primal.convs[3], primal.convs[5]
    assert conv0 is not None
    assert conv3 is not None
    assert conv5 is not None
    assert conv0.dense is None
    assert conv3.dense is None
    assert conv5.dense is not None
    assert conv5.gradient_patches is not None


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_a_cnn_operator_keeps_its_primal_pass_and_buffers(curvature: str) -> None:
    model, loss = _case("relu, pooled twice")
    x, y = _data(loss)
    wrapper = _wrapper(model, loss)
    if curvature == "hessian":
        expected = cc.autograd_hessian(model, x, y, loss)
        op: HessianOperator | GaussNewtonOperator = HessianOperator(
            wrapper, IndexedData((x, y)), 5, dense=False
        )
    else:
        expected = reference_ggn(model, x, y, REFERENCE_LOSSES[loss], cc.WD)
        op = GaussNewtonOperator(wrapper, IndexedData((x, y)), 5, dense=False)
    vectors = _vectors(op.size, 3)
    for _ in range(3):
        assert rel_err(op.matmat(vectors), vectors @ expected) < 1e-13
    graphs = op._graphs
    assert graphs is not None
    assert list(graphs.primals) == [ch.WHOLE]  # all the data at once
    assert graphs.buffers  # the tangents' memory is kept
    primal = graphs.primals[ch.WHOLE]
    assert primal.nbytes > sum(c.nbytes for c in primal.convs if c is not None) > 0


def test_chunk_by_chunk_products_of_a_cnn(monkeypatch: pytest.MonkeyPatch) -> None:
    model, loss = _case("overlapping pooling, dilation")
    x, y = _data(loss)
    hessian = cc.autograd_hessian(model, x, y, loss)
    monkeypatch.setattr(model_module, "whole_data_products", lambda *a, **kw: None)
    monkeypatch.setattr(model_module, "hvp_double_backward", _refuse("double backward"))
    op = HessianOperator(_wrapper(model, loss), IndexedData((x, y)), 5, dense=False)
    vectors = _vectors(op.size, 2)
    for _ in range(3):
        assert rel_err(op.matmat(vectors), vectors @ hessian) < 1e-13
    assert op._graphs is not None
    assert sorted(op._graphs.primals) == [0, 1, 2]


def test_float32_cnn_products_match_the_float64_hessian_to_float32_round_off() -> None:
    model, loss = _case("smooth, strided, no bias")
    x, y = _data(loss)
    hessian = cc.autograd_hessian(model, x, y, loss)
    vectors = _vectors(hessian.shape[0], 2)
    got = _wrapper(model.float(), loss).hvp(IndexedData((x.float(), y)), vectors.float(), 5)
    assert got.dtype == torch.float32
    assert rel_err(got.double(), vectors @ hessian) < 1e-5


def _declined() -> dict[str, nn.Module]:
    torch.manual_seed(0)

    def cnn(first: nn.Module, *rest: nn.Module) -> nn.Module:
        tail = rest or (nn.Flatten(), nn.LazyLinear(3))
        model = nn.Sequential(first, nn.Tanh(), *tail).double().eval()
        model(torch.zeros(1, 2, 6, 6, dtype=torch.float64))  # sizes the lazy layer
        return model

    return {
        "groups": cnn(nn.Conv2d(2, 4, 3, groups=2)),
        "same padding": cnn(nn.Conv2d(2, 3, 3, padding="same")),
        "reflect padding": cnn(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")),
        "average pooling": cnn(nn.Conv2d(2, 3, 3), nn.AvgPool2d(2), nn.Flatten(), nn.LazyLinear(3)),
        "partial flatten": cnn(nn.Conv2d(2, 3, 3), nn.Flatten(2), nn.Flatten(), nn.LazyLinear(3)),
    }


@pytest.mark.parametrize("case", list(_declined()))
def test_other_layers_leave_a_cnn_to_autograd(case: str) -> None:
    model = _declined()[case]
    x, y = _data("cross_entropy")
    wrapper = _wrapper(model, "cross_entropy")
    vectors = _vectors(wrapper.num_params, 2)
    assert ch.chain_hvp(wrapper, wrapper.prepare((x, y)), vectors) is None
    data = IndexedData((x, y))
    rr = _wrapper(model, "cross_entropy", "reverse-over-reverse")
    assert rel_err(wrapper.hvp(data, vectors, 5), rr.hvp(data, vectors, 5)) < 1e-13


def test_a_convolution_whose_dense_matrix_is_too_large_is_left_to_autograd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, loss = _case("relu, pooled twice")
    x, y = _data(loss)
    wrapper = _wrapper(model, loss)
    vectors = _vectors(wrapper.num_params, 2)
    batch = wrapper.prepare((x, y))
    # the second convolution's matrix: O L x C H W = (4 * 9) x (3 * 9) = 972 entries
    monkeypatch.setattr(sl, "DENSE_ENTRIES", 971)
    assert ch.chain_hvp(wrapper, batch, vectors) is None
    monkeypatch.setattr(sl, "DENSE_ENTRIES", 972)
    assert ch.chain_hvp(wrapper, batch, vectors) is not None


def test_a_cnn_gets_no_per_example_gradient_factors_from_the_chain() -> None:
    model, loss = _case("relu, pooled twice")
    x, y = _data(loss)
    wrapper = _wrapper(model, loss)
    fn = wrapper.objective.per_example_loss
    assert chain_layers(wrapper, fn) is None
    assert chain_layers(wrapper, fn, spatial=True) is not None
    assert chain_factors(wrapper, fn, wrapper.prepare((x, y))) is None


@pytest.mark.parametrize(
    "geometry",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 2, "stride": 2},
        {"kernel_size": (3, 2), "dilation": (1, 2), "padding": (2, 1), "stride": (2, 1)},
    ],
)
def test_the_unfold_matrix_and_the_dense_matrix_are_the_convolution(
    geometry: dict[str, object],
) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **geometry).double()  # type: ignore[arg-type]
    x = torch.randn(5, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    s = sl.unfold_matrix(conv, (7, 6), x.dtype, x.device)
    plane = x.detach()
    patches = F.unfold(plane, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    by_matrix = torch.einsum("bch,hql->bcql", plane.reshape(5, 3, -1), s).reshape(patches.shape)
    assert rel_err(by_matrix, patches) < 1e-15
    weight, bias = conv.weight.detach(), conv.bias.detach()
    ran = sl.conv_forward(conv, weight, bias, plane, dense=True)
    assert ran is not None
    out, primal = ran
    expected = conv(x)
    assert rel_err(out, expected.detach()) < 1e-14
    assert primal.dense is not None
    flat = plane.reshape(5, -1) @ primal.dense.T  # the dense matrix without the bias
    with_bias = flat.view_as(out) + bias.view(1, -1, 1, 1)
    assert rel_err(with_bias, expected.detach()) < 1e-14
    e = torch.randn_like(expected)
    (grad,) = torch.autograd.grad(expected, x, e)
    back = sl.conv_input_gradient(conv, weight, primal, e, x.shape)
    assert rel_err(back, grad) < 1e-14
    plain = sl.ConvPrimal(primal.columns)  # no dense matrix: by conv2d_input
    assert rel_err(sl.conv_input_gradient(conv, weight, plain, e, x.shape), grad) < 1e-14


def test_overlapping_max_pooling_gathers_and_scatters_as_autograd() -> None:
    pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
    x = torch.randn(4, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    out, index = sl.pool_forward(pool, x.detach())
    expected = pool(x)
    assert torch.equal(out, expected)
    e = torch.randn_like(expected)
    (grad,) = torch.autograd.grad(expected, x, e)
    into = torch.empty(4, 2, 49, dtype=torch.float64)
    assert rel_err(sl.pool_input_gradient(index, e, (7, 7), into), grad) < 1e-15
    t = torch.randn(3, *x.shape, dtype=torch.float64)  # three tangents
    into = torch.empty(3, *index.shape, dtype=torch.float64)
    gathered = sl.pool_tangent(index, t, expected.shape[2:], into)
    for j in range(3):
        (_, jvp) = torch.func.jvp(pool, (x.detach(),), (t[j],))
        assert torch.equal(gathered[j], jvp)
