"""The training gradients of nn.Linear models kept as factors (``infl.factor_cache``): filled
by the minimum check, by a K-FAC / EK-FAC fit with the empirical Fisher or by the first scoring
pass, all or nothing within ``cache_bytes``; a pass from them reads neither the data nor the
model, and scores what a pass that computes the gradients scores."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from infl import (
    EKFAC,
    KFAC,
    ConjugateGradient,
    ExactHessian,
    InfluenceCalculator,
    Objective,
    train_gradients,
)
from infl.factor_cache import FactorCache, factors_nbytes
from problems import BatchCentred, count_factor_reads

N, CHUNK, F = 37, 8, 10  # five chunks, the last of five examples


def _mlp() -> nn.Module:
    """p = 199; weights of output widths 16 + 3 in the space: products of up to 199 / 38 = 5
    vectors are taken from the factors (``multiplies_directly``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(F, 16), nn.Tanh(), nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 3))
    model[2].weight.requires_grad_(False)  # a frozen weight: its bias stays in the space
    return model.double().eval()


def _data(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, F, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=gen
    )


def _calc(solver=None, model=None, **options) -> InfluenceCalculator:
    options.setdefault("check_minimum", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model is not at a minimum
        return InfluenceCalculator(
            model if model is not None else _mlp(),
            Objective("cross_entropy", weight_decay=0.01),
            _data(N),
            solver if solver is not None else ExactHessian(damping=1.0),
            progress=False,
            chunk_size=CHUNK,
            **options,
        )


def _reference(solver=None) -> InfluenceCalculator:
    """The same calculator with nothing kept (``cache_bytes=0``)."""
    return _calc(solver, cache_bytes=0)


TEST = _data(3, seed=1)


def _fake(b: int, width: int = 2) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"0": (torch.zeros(b, width), torch.zeros(b, width))}


def test_the_cache_keeps_a_whole_pass_or_nothing():
    cache = FactorCache()
    size = factors_nbytes(_fake(4))  # 64 bytes a chunk
    for start in (0, 4, 8):
        cache.add(start, _fake(4), 4, 3, budget=3 * size)
    assert cache.complete
    assert cache.nbytes == 3 * size
    assert cache.get(4, 4) is not None
    assert cache.get(4, 8) is None  # another chunking
    cache.add(0, _fake(4), 4, 3, budget=3 * size)  # a complete cache takes nothing more
    assert cache.nbytes == 3 * size

    cache.clear()
    cache.add(0, _fake(4), 4, 3, budget=3 * size - 1)  # 3 chunks like the first cannot fit
    assert not cache.chunks
    assert not cache.complete
    cache.add(4, _fake(4), 4, 3, budget=3 * size)  # nor does the rest of that pass start over
    assert not cache.chunks

    cache.add(0, _fake(4), 4, 3, budget=3 * size)
    cache.add(4, _fake(4, width=5), 4, 3, budget=3 * size)  # the running total overflows
    assert not cache.chunks
    assert not cache.complete

    cache.add(0, _fake(4), 4, 3, budget=3 * size)
    cache.add(8, _fake(4), 4, 3, budget=3 * size)  # out of order (a resumed pass): refused
    assert list(cache.chunks) == [0]
    assert cache.get(0, 4) is None  # incomplete: nothing is read


def test_the_minimum_check_keeps_the_factors_and_scoring_reads_no_data(monkeypatch):
    calc = _calc(check_minimum=True)
    cache = calc._grad_cache.factors
    assert cache.complete
    assert sorted(cache.chunks) == list(range(0, N, CHUNK))
    reads = count_factor_reads(monkeypatch)
    assert calc.wrapper.multiplies_directly(len(TEST[1]))
    scores = calc.influence(TEST)
    assert reads[0] == 0
    torch.testing.assert_close(scores, _reference().influence(TEST), rtol=1e-12, atol=1e-14)


def test_a_second_query_is_scored_from_the_factors_of_the_first(monkeypatch):
    solver = ConjugateGradient(damping=1.0, rtol=1e-13, max_iter=400)  # its fit hands none over
    calc = _calc(solver)
    reads = count_factor_reads(monkeypatch)
    first = calc.influence(TEST)
    assert reads[0] == -(-N // CHUNK)  # one pass, which kept its factors
    other = _data(2, seed=2)
    second = calc.influence(other)
    assert reads[0] == -(-N // CHUNK)
    reference = _reference(solver)
    torch.testing.assert_close(first, reference.influence(TEST), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(second, reference.influence(other), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("solver", [KFAC, EKFAC])
def test_an_empirical_fisher_fit_hands_its_factors_to_scoring(monkeypatch, solver):
    calc = _calc(solver(damping=0.1, fisher="empirical"))
    calc.fitted_solver()
    assert calc._grad_cache.factors.complete
    assert calc.fitted_solver().take_train_factors() is None  # handed over once
    reads = count_factor_reads(monkeypatch)
    scores = calc.influence(TEST)
    assert reads[0] == 0
    expected = _reference(solver(damping=0.1, fisher="empirical")).influence(TEST)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-14)


def test_sampled_labels_are_not_training_gradients():
    calc = _calc(KFAC(damping=0.1))  # fisher="true": the fit's gradients are of sampled labels
    calc.fitted_solver()
    assert not calc._grad_cache.factors.complete


def test_a_fit_in_another_chunking_or_over_the_budget_hands_nothing_over():
    other_chunks = _calc(KFAC(damping=0.1, fisher="empirical", chunk_size=CHUNK + 1))
    other_chunks.fitted_solver()
    assert not other_chunks._grad_cache.factors.complete
    small = _calc(KFAC(damping=0.1, fisher="empirical"), cache_bytes=100)
    scores = small.influence(TEST)
    assert not small._grad_cache.factors.complete
    expected = _reference(KFAC(damping=0.1, fisher="empirical")).influence(TEST)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-14)


def test_a_model_that_mixes_the_examples_keeps_no_factors():
    mixing = BatchCentred(in_features=F).double().eval()  # two classes
    x, y = _data(N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calc = InfluenceCalculator(
            mixing, Objective("cross_entropy", weight_decay=0.01), (x, y % 2),
            ExactHessian(damping=1.0), progress=False, chunk_size=CHUNK,
        )  # fmt: skip
    test = (TEST[0], TEST[1] % 2)
    scores = calc.influence(test)
    assert calc.wrapper._linear_verified[calc.objective.per_example_loss] is False
    assert not calc._grad_cache.factors.chunks
    g_train = calc.wrapper.train_grads((x, y % 2))  # vmap: each example alone
    ihvp = calc.inverse_hvp(test).value
    torch.testing.assert_close(scores, -ihvp @ g_train.T, rtol=1e-10, atol=1e-12)


def test_a_resumed_pass_reads_its_chunks_from_the_factors():
    calc = _calc(check_minimum=True)
    vectors = torch.randn(2, calc.num_params, dtype=torch.float64)
    kept = dict(train_gradients.iter_train_products(calc, vectors, "kept", skip=2))
    assert sorted(kept) == [16, 24, 32]
    fresh = _reference()
    for start, products in train_gradients.iter_train_products(fresh, vectors, "fresh", skip=2):
        torch.testing.assert_close(kept[start], products, rtol=1e-12, atol=1e-14)


def test_non_finite_products_are_what_the_gradients_give():
    calc = _calc(check_minimum=True)
    assert calc._grad_cache.factors.complete
    vectors = torch.zeros(1, calc.num_params, dtype=torch.float64)
    vectors[0, 3] = float("nan")
    kept = torch.cat([v for _, v in train_gradients.iter_train_products(calc, vectors, "kept")], 1)
    fresh = torch.cat(
        [v for _, v in train_gradients.iter_train_products(_reference(), vectors, "fresh")], 1
    )
    torch.testing.assert_close(kept, fresh, rtol=1e-12, atol=1e-14, equal_nan=True)
    assert kept.isnan().any()
