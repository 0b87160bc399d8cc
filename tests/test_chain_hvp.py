"""Hessian-vector products of an ``nn.Sequential`` MLP run by hand (``infl.chain_hvp``).

Every product is compared in float64 with ``torch.autograd.functional.hessian`` of the
training objective (``chain_cases.autograd_hessian``) times the vectors; where the test must
know which route ran, the double-backward route is made to fail.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chain_cases as cc
from infl import IndexedData, ModelWrapper, Objective
from infl import chain_hvp as ch
from infl import model as model_module
from infl.objective import supervised_loss
from infl.operators import GaussNewtonOperator, HessianOperator
from reference import rel_err
from reference_ggn import REFERENCE_LOSSES, reference_ggn


def _no_double_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("the double-backward route ran")

    monkeypatch.setattr(model_module, "hvp_double_backward", refuse)


def _chunk_by_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the products chunk by chunk (not all the data at once)."""
    monkeypatch.setattr(model_module, "whole_data_products", lambda *args, **kwargs: None)


def _counted_primal_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets one entry per primal pass the hand-run chain computes from now on."""
    passes: list[int] = []
    primal_pass = ch.primal_pass
    monkeypatch.setattr(
        ch, "primal_pass", lambda *a, **kw: passes.append(1) or primal_pass(*a, **kw)
    )
    return passes


def _wrapper(model: nn.Module, loss: str, second_order: str = "auto") -> ModelWrapper:
    objective = Objective(cc.objective_loss(loss), weight_decay=cc.WD)
    return ModelWrapper(model, objective, second_order=second_order)  # type: ignore[arg-type]


def _cross_entropy_case(
    *modules: nn.Module,
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(model, x, y, its Hessian by autograd)`` on the cross-entropy data."""
    model = cc.mlp(*modules)
    x, y = cc.data("cross_entropy")
    return model, x, y, cc.autograd_hessian(model, x, y, "cross_entropy")


def _vectors(p: int, k: int) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("case", list(cc.CASES))
def test_the_hand_run_products_are_the_hessian_times_the_vectors(
    case: str, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    modules, loss = cc.CASES[case]
    model = cc.mlp(*modules)
    x, y = cc.data(loss)
    hessian = cc.autograd_hessian(model, x, y, loss)
    _no_double_backward(monkeypatch)
    vectors = _vectors(hessian.shape[0], k)
    got = _wrapper(model, loss).hvp(IndexedData((x, y)), vectors, 7)
    assert rel_err(got, vectors @ hessian) < 1e-13


def test_frozen_tensors_a_reused_layer_and_ignored_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    shared = nn.Linear(5, 5)
    model = nn.Sequential(
        nn.Tanh(), nn.Linear(4, 5), nn.GELU(), shared, nn.ReLU(), shared, nn.Linear(5, 3)
    ).double()
    model[1].weight.requires_grad_(False)  # its bias stays in the space
    model[6].bias.requires_grad_(False)
    x, y = cc.data("cross_entropy")
    y[::4] = -100
    hessian = cc.autograd_hessian(model, x, y, "cross_entropy")
    _no_double_backward(monkeypatch)
    for k in (1, 3):
        vectors = _vectors(hessian.shape[0], k)
        got = _wrapper(model, "cross_entropy").hvp(IndexedData((x, y)), vectors, 11)
        assert rel_err(got, vectors @ hessian) < 1e-13


def test_only_a_bias_trainable_before_the_first_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    model = cc.mlp(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3))
    model[0].weight.requires_grad_(False)
    x, y = cc.data("mse")
    hessian = cc.autograd_hessian(model, x, y, "mse")
    _no_double_backward(monkeypatch)
    vectors = _vectors(hessian.shape[0], 2)
    got = _wrapper(model, "mse").hvp(IndexedData((x, y)), vectors, 30)
    assert rel_err(got, vectors @ hessian) < 1e-13


def test_vectors_taken_in_groups_give_the_same_products(monkeypatch: pytest.MonkeyPatch) -> None:
    # wide inputs, narrow layers: the primal pass (which holds the inputs) outweighs a
    # vector's tangents
    model = cc.mlp(nn.Linear(40, 2), nn.Tanh(), nn.Linear(2, 3))
    x, y = cc.data("cross_entropy", width=40)
    data = IndexedData((x, y))
    vectors = _vectors(sum(q.numel() for q in model.parameters()), 5)
    whole = _wrapper(model, "cross_entropy").hvp(data, vectors, 30)
    monkeypatch.setattr(ch, "GROUP_BYTES", 1)  # as few vectors at a time as the rule allows
    sizes: list[int] = []
    products = ch._products
    monkeypatch.setattr(ch, "_products", lambda *a: sizes.append(a[5].shape[0]) or products(*a))
    wrapper = _wrapper(model, "cross_entropy")
    grouped = wrapper.hvp(data, vectors, 30)
    assert rel_err(grouped, whole) < 1e-14
    # a group holds as many bytes of tangents as the primal pass it reads whole
    layers = ch.chain_layers(wrapper, wrapper.objective.per_example_loss)
    assert layers is not None
    tensors = {**wrapper.fixed, **wrapper.params}
    loss = wrapper.objective.per_example_loss
    primal = ch.primal_pass(layers, tensors, loss, wrapper.prepare((x, y)), curves=True)  # type: ignore[arg-type]
    assert primal is not None
    group = max(1, primal.nbytes // ch._per_vector(ch._widths(layers, primal), len(data), 8))
    assert 1 < group < 5
    assert sizes == [group] * (5 // group) + ([5 % group] if 5 % group else [])


def test_the_operator_keeps_each_chunks_primal_pass_within_its_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _chunk_by_chunk(monkeypatch)
    model, x, y, expected = _cross_entropy_case(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    passes = _counted_primal_passes(monkeypatch)
    op = HessianOperator(_wrapper(model, "cross_entropy"), IndexedData((x, y)), 8, dense=False)
    vectors = _vectors(op.size, 2)
    counts = []
    first_chunk = 0
    for _ in range(4):
        assert rel_err(op.matmat(vectors), vectors @ expected) < 1e-13
        counts.append(len(passes))
        if op._graphs is not None and 0 in op._graphs.primals:
            first_chunk = op._graphs.primals[0].nbytes
    assert counts == [4, 8, 8, 8]  # four chunks: kept from the second product on
    graphs = op._graphs
    assert graphs is not None
    assert sorted(graphs.primals) == [0, 1, 2, 3]
    kept = sum(p.nbytes for p in graphs.primals.values())
    assert graphs.used_bytes == kept + sum(b.nbytes for b in graphs.buffers.values())
    assert kept > 0

    tight = HessianOperator(_wrapper(model, "cross_entropy"), IndexedData((x, y)), 8, dense=False)
    tight.graph_budget = first_chunk  # room for the first chunk only
    passes.clear()
    for _ in range(3):
        assert rel_err(tight.matmat(vectors), vectors @ expected) < 1e-13
    assert tight._graphs is not None
    assert list(tight._graphs.primals) == [0]
    assert tight._graphs.full
    assert len(passes) == 4 + 4 + 3


@pytest.mark.parametrize("announced", [1, 2, 5])
def test_products_announced_by_a_solver_keep_the_state_from_the_first_product_on(
    announced: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    _chunk_by_chunk(monkeypatch)
    model, x, y, expected = _cross_entropy_case(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    passes = _counted_primal_passes(monkeypatch)
    op = HessianOperator(_wrapper(model, "cross_entropy"), IndexedData((x, y)), 8, dense=False)
    assert not op.expect_products(announced)  # dense=False: products stay matrix-free
    vectors = _vectors(op.size, 2)
    counts, buffers = [], []
    for _ in range(3):
        assert rel_err(op.matmat(vectors), vectors @ expected) < 1e-13
        counts.append(len(passes))
        assert op._graphs is not None
        buffers.append(dict(op._graphs.buffers))
    if announced >= 2:  # more than one call coming: kept from the first
        assert counts == [4, 4, 4]
        assert buffers[0]
        assert all(b is buffers[0][name] for name, b in buffers[2].items())
    else:  # a single product announced: as without announcement, from the second on
        assert counts == [4, 8, 8]
        assert not buffers[0]
        assert buffers[1]


def _not_a_chain() -> dict[str, tuple[nn.Module, object, tuple[int, ...]]]:
    class Subclass(nn.Sequential):
        pass

    def own_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction="none")

    hooked = cc.mlp(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    hooked[1].register_forward_hook(lambda m, a, o: o * 2)
    return {
        "subclass": (Subclass(nn.Linear(4, 3)).double(), "cross_entropy", (4,)),
        "custom-loss": (cc.mlp(nn.Linear(4, 3)), supervised_loss(own_ce), (4,)),
        "hook": (hooked, "cross_entropy", (4,)),
        "softmax": (cc.mlp(nn.Linear(4, 3), nn.Softmax(dim=1)), "cross_entropy", (4,)),
        "3-d inputs": (cc.mlp(nn.Linear(4, 3)), "mse", (2, 4)),
    }


@pytest.mark.parametrize("case", list(_not_a_chain()))
def test_other_models_and_losses_are_left_to_autograd(case: str) -> None:
    model, loss, shape = _not_a_chain()[case]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(cc.N, *shape, generator=gen, dtype=torch.float64)
    if loss == "mse":
        y = torch.randn(cc.N, *shape[:-1], 3, generator=gen, dtype=torch.float64)
    else:
        y = torch.randint(0, 3, (cc.N, *shape[:-1]), generator=gen)
    wrapper = ModelWrapper(model, Objective(loss, weight_decay=cc.WD))  # type: ignore[arg-type]
    vectors = _vectors(wrapper.num_params, 2)
    assert ch.chain_hvp(wrapper, wrapper.prepare((x, y)), vectors) is None
    rr = ModelWrapper(
        model, Objective(loss, weight_decay=cc.WD), second_order="reverse-over-reverse"
    )  # type: ignore[arg-type]
    data = IndexedData((x, y))
    assert rel_err(wrapper.hvp(data, vectors, 7), rr.hvp(data, vectors, 7)) < 1e-13


def test_a_mode_asked_for_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the chain ran")

    monkeypatch.setattr(ch, "_products", refuse)
    model, x, y, expected = _cross_entropy_case(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    ggn = reference_ggn(model, x, y, REFERENCE_LOSSES["cross_entropy"], cc.WD)
    vectors = _vectors(expected.shape[0], 2)
    data = IndexedData((x, y))
    for mode in ("reverse-over-reverse", "forward-over-reverse"):
        wrapper = _wrapper(model, "cross_entropy", mode)
        assert rel_err(wrapper.hvp(data, vectors, 7), vectors @ expected) < 1e-12
        assert rel_err(wrapper.ggn_vp(data, vectors, 7), vectors @ ggn) < 1e-12


def test_float32_products_match_the_float64_hessian_to_float32_round_off() -> None:
    model, x, y, expected = _cross_entropy_case(
        nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    vectors = _vectors(expected.shape[0], 3)
    low = _wrapper(model.float(), "cross_entropy")
    got = low.hvp(IndexedData((x.float(), y)), vectors.float(), 7)
    assert got.dtype == torch.float32
    assert rel_err(got.double(), vectors @ expected) < 1e-5


def test_strided_vectors_give_the_products_of_contiguous_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, x, y, expected = _cross_entropy_case(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))
    p = expected.shape[0]
    _no_double_backward(monkeypatch)
    wrapper = _wrapper(model, "cross_entropy")
    gen = torch.Generator().manual_seed(4)
    for vectors in (
        torch.randn(p, 3, generator=gen, dtype=torch.float64).T,  # column-major
        torch.randn(3, 2 * p, generator=gen, dtype=torch.float64)[:, ::2],  # every other entry
        torch.randn(1, 2 * p, generator=gen, dtype=torch.float64)[:, 1::2],
    ):
        got = wrapper.hvp(IndexedData((x, y)), vectors, 7)
        assert rel_err(got, vectors @ expected) < 1e-13


@pytest.mark.parametrize("case", list(cc.CASES))
def test_the_hand_run_gauss_newton_products(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    modules, loss = cc.CASES[case]
    model = cc.mlp(*modules)
    x, y = cc.data(loss)
    ggn = reference_ggn(model, x, y, REFERENCE_LOSSES[cc.objective_loss(loss)], cc.WD)

    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("the torch.func route ran")

    monkeypatch.setattr(ModelWrapper, "_ggn_chunk", refuse)
    vectors = _vectors(ggn.shape[0], 3)
    got = _wrapper(model, loss).ggn_vp(IndexedData((x, y)), vectors, 7)
    assert rel_err(got, vectors @ ggn) < 1e-13


def test_the_gauss_newton_operator_keeps_its_primal_passes() -> None:
    model = cc.mlp(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = cc.data("cross_entropy")
    ggn = reference_ggn(model, x, y, REFERENCE_LOSSES["cross_entropy"], cc.WD)
    op = GaussNewtonOperator(_wrapper(model, "cross_entropy"), IndexedData((x, y)), 8, dense=False)
    vectors = _vectors(op.size, 2)
    for _ in range(3):
        assert rel_err(op.matmat(vectors), vectors @ ggn) < 1e-13
    assert op._graphs is not None
    assert list(op._graphs.primals) == [ch.WHOLE]  # all the data at once
    assert all(c is None for p in op._graphs.primals.values() for c in p.curves)  # not needed
    autograd = _wrapper(model, "cross_entropy", "reverse-over-reverse")
    assert rel_err(autograd.ggn_vp(IndexedData((x, y)), vectors, 8), vectors @ ggn) < 1e-13


def _operator(
    curvature: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[HessianOperator | GaussNewtonOperator, torch.Tensor]:
    """``(operator with chunks of 8, its matrix)`` for ``curvature``."""
    wrapper = _wrapper(model, "cross_entropy")
    if curvature == "hessian":
        expected = cc.autograd_hessian(model, x, y, "cross_entropy")
        return HessianOperator(wrapper, IndexedData((x, y)), 8, dense=False), expected
    expected = reference_ggn(model, x, y, REFERENCE_LOSSES["cross_entropy"], cc.WD)
    return GaussNewtonOperator(wrapper, IndexedData((x, y)), 8, dense=False), expected


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_the_operators_products_reuse_their_kept_tangent_buffers(
    curvature: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # two smooth activations (their input tangents kept beside their outputs), four chunks
    # (taken chunk by chunk here): from the second product on all write into the same buffers
    _chunk_by_chunk(monkeypatch)
    model = cc.mlp(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3))
    operator, expected = _operator(curvature, model, *cc.data("cross_entropy"))

    def addresses() -> dict[str, int]:
        assert operator._graphs is not None
        return {name: b.data_ptr() for name, b in operator._graphs.buffers.items()}

    seen = []
    for k in (3, 3, 3, 3, 2, 4, 4):  # fewer vectors: views of the kept buffers; more: regrown
        vectors = _vectors(operator.size, k)
        assert rel_err(operator.matmat(vectors), vectors @ expected) < 1e-13
        seen.append(addresses())
    assert seen[0] == {}  # nothing kept from the first product
    assert seen[1]
    assert seen[1] == seen[2] == seen[3] == seen[4]
    assert seen[5] != seen[4]
    assert seen[5] == seen[6]
    graphs = operator._graphs
    assert graphs is not None
    kept = sum(p.nbytes for p in graphs.primals.values())
    assert graphs.used_bytes == kept + sum(b.nbytes for b in graphs.buffers.values())


def test_the_products_are_added_into_a_given_tensor() -> None:
    model, x, y, expected = _cross_entropy_case(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    wrapper = _wrapper(model, "cross_entropy")
    batch = wrapper.prepare((x, y))
    vectors = _vectors(expected.shape[0], 2)
    alone = ch.chain_hvp(wrapper, batch, vectors)
    assert alone is not None
    start = _vectors(expected.shape[0], 2) * 3
    into = start.clone()
    added = ch.chain_hvp(wrapper, batch, vectors, into=into)
    assert added is into
    assert rel_err(into, start + alone) < 1e-15


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_an_operators_products_run_over_all_its_data_at_once(
    curvature: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # four chunks of 8 (the last shorter), all taken as one batch: one call per product, the
    # primal pass over every example kept from the second product on, and the same sums
    # bit for bit from the first product to the last (a saved fit reproduces its scores)
    model = cc.mlp(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = cc.data("cross_entropy")
    y[:5] = -100
    operator, expected = _operator(curvature, model, x, y)
    calls = []
    summed = ch._summed
    monkeypatch.setattr(ch, "_summed", lambda *a, **kw: calls.append(a[4].shape) or summed(*a))
    vectors = _vectors(operator.size, 3)
    products = []
    for product in range(4):
        calls.clear()
        products.append(operator.matmat(vectors))
        assert rel_err(products[-1], vectors @ expected) < 1e-13
        assert len(calls) == 1
        graphs = operator._graphs
        assert graphs is not None
        assert list(graphs.primals) == ([ch.WHOLE] if product else [])
    assert all(torch.equal(p, products[0]) for p in products)
    whole = graphs.primals[ch.WHOLE]
    assert whole.outputs.shape[0] == whole.targets.shape[0] == x.shape[0]
    assert graphs.used_bytes == whole.nbytes + sum(b.nbytes for b in graphs.buffers.values())


def test_chunks_whose_tangents_would_not_fit_the_work_memory_stay_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, x, y, expected = _cross_entropy_case(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    op = HessianOperator(_wrapper(model, "cross_entropy"), IndexedData((x, y)), 8, dense=False)
    # one vector's tangents over 8 examples fit, over all of them not
    layers = ch.chain_layers(op.wrapper, op.wrapper.objective.per_example_loss)
    assert layers is not None
    monkeypatch.setattr(ch, "WORK_BYTES", ch._per_vector(ch._widths(layers, None), 8, 8))
    vectors = _vectors(op.size, 2)
    for _ in range(4):
        assert rel_err(op.matmat(vectors), vectors @ expected) < 1e-13
    assert op._graphs is not None
    assert sorted(op._graphs.primals) == [0, 1, 2, 3]
