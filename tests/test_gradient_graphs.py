"""Kept gradient graphs (``GradientGraphs``): the same HVPs as building every graph afresh."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from infl import HessianOperator, IndexedData, ModelWrapper, Objective
from infl.second_order import GradientGraphs


def _problem(n: int = 23, seed: int = 0) -> tuple[ModelWrapper, IndexedData]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    objective = Objective("cross_entropy", weight_decay=1e-2)
    # the double-backward graphs, asked for: by default an MLP chain runs by hand (chain_hvp)
    wrapper = ModelWrapper(model, objective, second_order="reverse-over-reverse")
    return wrapper, IndexedData((x, y))


def test_kept_graphs_give_the_same_products_bit_for_bit() -> None:
    wrapper, data = _problem()
    op = HessianOperator(wrapper, data, chunk_size=5, dense=False)
    v = torch.randn(3, wrapper.num_params, dtype=torch.float64)
    fresh = wrapper.hvp(data, v, 5)
    first = op.matmat(v)
    assert op._graphs is not None
    assert not op._graphs.kept
    second = op.matmat(v)
    assert len(op._graphs.kept) == 5  # 23 examples in chunks of 5
    assert op._graphs.used_bytes > 0
    third = op.matmat(v)  # answered from the kept graphs
    for out in (first, second, third):
        assert torch.equal(out, fresh)
    w = torch.randn(7, wrapper.num_params, dtype=torch.float64)  # other vectors, other k
    assert torch.equal(op.matmat(w), wrapper.hvp(data, w, 5))


def test_the_budget_limits_what_is_kept_and_never_changes_the_products() -> None:
    wrapper, data = _problem()
    v = torch.randn(2, wrapper.num_params, dtype=torch.float64)
    fresh = wrapper.hvp(data, v, 5)
    probe = GradientGraphs()
    for _ in range(2):
        wrapper.hvp(data, v, 5, probe)
    per_chunk = probe.used_bytes // len(probe.kept)
    for budget, kept in ((0, 0), (2 * per_chunk + per_chunk // 2, 2)):
        graphs = GradientGraphs(budget_bytes=budget)
        outs = [wrapper.hvp(data, v, 5, graphs) for _ in range(3)]
        assert len(graphs.kept) == kept
        assert graphs.full
        assert all(torch.equal(out, fresh) for out in outs)


def test_kept_graphs_hold_no_python_saved_tensor_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes are counted by Python hooks on a graph used once; the kept graphs are built
    without them, so products from kept graphs call no Python unpack function."""
    calls = {"pack": 0, "unpack": 0}
    real = torch.autograd.graph.saved_tensors_hooks

    def counting(pack: Any, unpack: Any) -> Any:
        def counted_pack(t: torch.Tensor) -> Any:
            calls["pack"] += 1
            return pack(t)

        def counted_unpack(t: Any) -> torch.Tensor:
            calls["unpack"] += 1
            return unpack(t)

        return real(counted_pack, counted_unpack)

    monkeypatch.setattr(torch.autograd.graph, "saved_tensors_hooks", counting)
    wrapper, data = _problem()
    op = HessianOperator(wrapper, data, chunk_size=5, dense=False)
    v = torch.randn(2, wrapper.num_params, dtype=torch.float64)
    op.matmat(v)  # counts each chunk's bytes on graphs it then drops
    assert calls["pack"] > 0
    assert calls["unpack"] > 0
    assert op._graphs is not None
    assert len(op._graphs.chunk_bytes) == 5
    op.matmat(v)  # builds and keeps the graphs, without hooks
    assert len(op._graphs.kept) == 5
    assert op._graphs.used_bytes == sum(op._graphs.chunk_bytes.values())
    before = dict(calls)
    out = op.matmat(v)  # from the kept graphs only
    assert calls == before
    assert torch.equal(out, wrapper.hvp(data, v, 5))


def test_a_minibatch_operator_used_once_keeps_no_graph() -> None:
    wrapper, data = _problem()
    op = HessianOperator(wrapper, data, chunk_size=5, dense=False)
    sub = op.subsample(8, torch.Generator().manual_seed(0))
    sub.matmat(torch.randn(1, wrapper.num_params, dtype=torch.float64))
    assert sub._graphs is None or not sub._graphs.kept


def test_forward_over_reverse_keeps_no_graph() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    wrapper = ModelWrapper(model, Objective("cross_entropy"), second_order="forward-over-reverse")
    data = IndexedData((torch.randn(11, 4, dtype=torch.float64), torch.randint(0, 3, (11,))))
    op = HessianOperator(wrapper, data, chunk_size=4, dense=False)
    v = torch.randn(2, wrapper.num_params, dtype=torch.float64)
    reverse = ModelWrapper(model, Objective("cross_entropy")).hvp(data, v, 4)
    for _ in range(3):
        assert torch.allclose(op.matmat(v), reverse, rtol=1e-12, atol=1e-14)
    assert op._graphs is not None
    assert not op._graphs.kept


def test_a_refusal_closes_the_budget_unless_told_not_to() -> None:
    graphs = GradientGraphs(budget_bytes=100)
    assert graphs.admit(60)
    assert not graphs.admit(50, close=False)  # a buffer that does not fit: room stays open
    assert not graphs.full
    assert graphs.used_bytes == 60
    assert graphs.admit(40)
    assert not graphs.admit(1)
    assert graphs.full
    assert graphs.used_bytes == 100
