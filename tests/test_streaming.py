"""Streaming: IterableDataset training data, test row blocks under a memory budget, running
top-k, and peak tensor memory that does not grow with n."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from infl import (
    ExactHessian,
    InfluenceCalculator,
    InputError,
    Objective,
    streaming,
)
from infl.streaming import RunningTopK

DAMPING = 1.0


class Stream(IterableDataset):
    """``(x_i, y_i)`` in order; ``stated`` overrides ``__len__`` (``None``: no ``__len__``)."""

    def __init__(self, x, y, stated: int | str | None = "true") -> None:
        self.x, self.y, self.stated = x, y, stated

    def __iter__(self):
        for i in range(len(self.y)):
            yield self.x[i], self.y[i]

    def __len__(self):
        if self.stated is None:
            raise TypeError("no length")
        return len(self.y) if self.stated == "true" else int(self.stated)


def _problem(n: int = 40, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 12, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n + 12,), generator=gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    return model, Objective("cross_entropy", 0.01), (x[:n], y[:n]), (x[n:], y[n:])


def _calc(model, objective, train, **kw):
    kw.setdefault("chunk_size", 8)
    return InfluenceCalculator(
        model,
        objective,
        train,
        ExactHessian(damping=DAMPING),
        progress=False,
        check_minimum=False,
        **kw,
    )


@pytest.mark.parametrize(
    "wrap",
    [lambda x, y: Stream(x, y), lambda x, y: DataLoader(Stream(x, y), batch_size=5)],
    ids=["iterable", "loader-over-iterable"],
)
def test_a_stream_scores_like_tensors(wrap):
    model, objective, (x, y), test = _problem()
    ref = _calc(model, objective, (x, y))
    calc = _calc(model, objective, wrap(x, y))
    torch.testing.assert_close(calc.influence(test), ref.influence(test), rtol=0, atol=1e-12)
    torch.testing.assert_close(calc.self_influence(), ref.self_influence(), rtol=0, atol=1e-12)
    idx, val = calc.top_k(test, 4)
    ref_idx, ref_val = ref.top_k(test, 4)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(val, ref_val, rtol=0, atol=1e-12)


def test_random_access_on_a_stream_is_refused_naming_the_fix():
    model, objective, (x, y), _ = _problem()
    calc = _calc(model, objective, Stream(x, y))
    with pytest.raises(InputError, match="map-style Dataset"):
        calc.self_influence([5, 1])
    with pytest.raises(InputError, match="only be read in order"):
        calc.train.without([0])


def test_a_stream_without_a_length_or_with_a_wrong_one_is_refused():
    model, objective, (x, y), test = _problem()
    with pytest.raises(InputError, match="__len__"):
        _calc(model, objective, Stream(x, y, stated=None))
    calc = _calc(model, objective, Stream(x, y, stated=len(y) + 3))
    with pytest.raises(InputError, match=r"yielded 40 examples, but its __len__ states 43"):
        calc.influence(test)
    calc = _calc(model, objective, Stream(x, y, stated=len(y) - 3))
    with pytest.raises(InputError, match="more than the 37 examples"):
        calc.influence(test)


def test_a_shuffling_loader_is_refused():
    model, objective, (x, y), _ = _problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    with pytest.raises(InputError, match="shuffle=False"):
        _calc(model, objective, loader)


def _budget_for_rows(calc, rows: int) -> int:
    """A memory budget whose row block holds ``rows`` test examples."""
    per_row = (6 * calc.num_params + calc.chunk_size) * 8
    return 2 * per_row * rows + 2 * per_row - 1


def test_a_memory_budget_scores_in_row_blocks_with_the_same_values():
    model, objective, train, test = _problem()
    ref = _calc(model, objective, train)
    budget = _budget_for_rows(ref, 3)
    calc = _calc(model, objective, train, memory_budget=budget)
    assert streaming.row_block_size(calc, 12) == 3
    torch.testing.assert_close(calc.influence(test), ref.influence(test), rtol=0, atol=1e-12)
    full = ref.influence(test)
    for by, key in (("abs", full.abs()), ("helpful", -full), ("harmful", full)):
        idx, val = calc.top_k(test, 5, by=by)
        assert torch.equal(idx, key.topk(5, dim=1).indices)
        torch.testing.assert_close(val, full.gather(1, idx), rtol=0, atol=1e-12)


def test_a_memory_budget_below_one_chunk_is_refused_naming_the_chunk_size():
    model, objective, train, _ = _problem()
    with pytest.raises(InputError, match="lower chunk_size to 2"):
        _calc(model, objective, train, chunk_size=8, memory_budget=2 * 2 * 43 * 8 + 5)
    with pytest.raises(InputError, match="positive number of bytes"):
        _calc(model, objective, train, memory_budget=-1)


def test_running_top_k_over_chunks_equals_top_k_of_the_whole_row():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 37, generator=gen, dtype=torch.float64)
    running = RunningTopK(4, 6, "helpful", scores.dtype, "cpu")
    for start in range(0, 37, 5):
        running.update(start, scores[:, start : start + 5])
    best = (-scores).topk(6, dim=1)
    assert torch.equal(running.indices, best.indices)
    torch.testing.assert_close(running.values, scores.gather(1, best.indices))


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated inside the mode that are alive at once.

    A view shares its base's storage, so view outputs add nothing (a slice of the user's data
    is not an allocation); the live set is swept and the peak updated at each allocation.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        added = False
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and not leaf._is_zerotensor():
                storage = leaf.untyped_storage()
                key = storage.data_ptr()
                known = self.live.get(key)
                if storage.nbytes() and (known is None or known[0].expired()):
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    added = True
        if added:
            self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
            self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


def _peak_bytes(n: int, tmp_path) -> int:
    """Peak live tensor bytes of top_k and of a score store at ``n`` training examples."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    test = (x[:20].clone(), y[:20].clone())
    torch.manual_seed(0)
    calc = InfluenceCalculator(
        nn.Linear(16, 3).double().eval(),
        Objective("cross_entropy", 0.01),
        (x, y),
        ExactHessian(damping=0.1),
        chunk_size=64,
        memory_budget=1 << 19,  # 512 KiB: no [n, p] cache at either n, one row block
        progress=False,
        check_minimum=False,
    )
    calc.fitted_solver()  # the fit's p x p is the same at every n; scoring is measured
    with LiveTensorBytes() as mode:
        calc.top_k(test, 5)
        calc.influence(test, out=tmp_path / f"scores-{n}.npy")
    return mode.peak


@pytest.mark.slow
def test_peak_tensor_memory_does_not_grow_with_n(tmp_path):
    small, large = _peak_bytes(1000, tmp_path), _peak_bytes(8000, tmp_path)
    # one chunk of gradients [64, 51] float64 is 26 KiB; [n, p] at n = 8000 would be 3.2 MB
    # and [m, n] 1.3 MB
    assert small > 20_000
    assert large <= 1.1 * small, (small, large)
