"""Low-rank (Arnoldi) scoring chooses, query by query, between the ``[n, r]`` projections and a
pass that multiplies the training gradients by the queries' inverse-HVPs
(``train_gradients.projects``): the scores are the same either way, and the choice follows the
ski-rental rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from infl import Arnoldi, InfluenceCalculator, Objective, train_gradients
from infl.train_gradients import PASS_COST
from problems import WithLayerNorm

RANK = 10
BUDGET = RANK + PASS_COST  # what projecting costs, in units of 2 n p flops


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()  # p = 83


def _data(n: int, features: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=gen
    )


def _calc(
    model: nn.Module | None = None, features: int = 6, rank: int = RANK, **options
) -> InfluenceCalculator:
    return InfluenceCalculator(
        model if model is not None else _mlp(),
        Objective("cross_entropy", weight_decay=0.01),
        _data(40, features),
        Arnoldi(rank=rank, damping=0.1),
        progress=False,
        check_minimum=False,
        **options,
    )


def _expected(calc: InfluenceCalculator, test) -> torch.Tensor:
    """``-T U^T diag(w) U G^T`` from gradients formed outside the calculator's cache."""
    basis, weights = calc.fitted_solver().low_rank()
    g_train = calc.wrapper.train_grads(calc.train.select(range(calc.num_train)))
    g_test = calc.test_grads(test)
    return -(g_test @ basis.T * weights) @ (g_train @ basis.T).T


def _passes(calc: InfluenceCalculator, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the training-data chunks multiplied by vectors (either route, and from the
    gradients' factors kept by an earlier pass, directly or through the gradients formed from
    them)."""
    calls = [0]
    original = calc.wrapper.train_grad_products
    from_factors = train_gradients.products_from_factors

    def counted(batch, vectors, **options):
        calls[0] += 1
        return original(batch, vectors, **options)

    def counted_kept(*args):
        calls[0] += 1
        return from_factors(*args)

    formed = train_gradients.gradients_from_factors

    def counted_formed(*args):
        calls[0] += 1
        return formed(*args)

    calc.wrapper.train_grad_products = counted  # type: ignore[method-assign]
    monkeypatch.setattr(train_gradients, "products_from_factors", counted_kept)
    monkeypatch.setattr(train_gradients, "gradients_from_factors", counted_formed)
    return calls


def test_a_query_with_fewer_rows_than_the_rank_is_scored_without_projecting():
    calc = _calc()
    test = _data(3, seed=1)
    scores = calc.influence(test)
    basis, _ = calc.fitted_solver().low_rank()
    assert calc._grad_cache.projection(basis) is None
    assert calc._grad_cache.unprojected_cost(basis) == 3 + PASS_COST
    assert calc._grad_cache.value is None  # nor was [n, p] kept
    torch.testing.assert_close(scores, _expected(calc, test), rtol=1e-10, atol=1e-12)


def test_repeated_queries_project_once_passing_would_cost_more_than_projecting(monkeypatch):
    calc = _calc()
    queries = [_data(2, seed=s) for s in range(1, 6)]
    cost = 2 + PASS_COST
    assert 2 * cost < BUDGET < 3 * cost  # two passes, then the projections
    passes = _passes(calc, monkeypatch)
    chunks = -(-calc.num_train // calc.chunk_size)
    basis = None
    for i, test in enumerate(queries):
        before = passes[0]
        scores = calc.influence(test)
        basis, _ = calc.fitted_solver().low_rank()
        projected = calc._grad_cache.projection(basis) is not None
        assert projected == (i >= 2)
        assert passes[0] - before == (chunks if i <= 2 else 0)  # the 3rd query projects
        torch.testing.assert_close(scores, _expected(calc, test), rtol=1e-10, atol=1e-12)
    assert calc._grad_cache.unprojected_cost(basis) == 2 * cost


def test_a_query_with_as_many_rows_as_the_rank_projects_at_once():
    calc = _calc()
    test = _data(RANK, seed=1)
    scores = calc.influence(test)
    basis, _ = calc.fitted_solver().low_rank()
    assert calc._grad_cache.projection(basis) is not None
    assert calc._grad_cache.unprojected_cost(basis) == 0
    torch.testing.assert_close(scores, _expected(calc, test), rtol=1e-10, atol=1e-12)


def test_with_damping_shares_the_cost_spent_without_projecting():
    calc = _calc()
    calc.influence(_data(4, seed=1))  # 4 + c
    stiffer = calc.with_damping(0.5)
    test = _data(4, seed=2)
    scores = stiffer.influence(test)  # 2 (4 + c) > r + c: projects
    basis, _ = calc.fitted_solver().low_rank()
    assert calc._grad_cache.projection(basis) is not None
    torch.testing.assert_close(scores, _expected(stiffer, test), rtol=1e-10, atol=1e-12)


def test_a_model_whose_gradients_must_be_formed_projects_at_once():
    # forming the gradients costs more than multiplying them by r vectors
    calc = _calc(WithLayerNorm().double().eval(), features=4)
    assert not calc.wrapper.has_linear_shortcut  # a LayerNorm
    test = _data(2, features=4, seed=1)
    scores = calc.influence(test)
    basis, _ = calc.fitted_solver().low_rank()
    assert calc._grad_cache.projection(basis) is not None
    assert calc._grad_cache.value is None
    torch.testing.assert_close(scores, _expected(calc, test), rtol=1e-10, atol=1e-12)


def test_a_filled_gradient_cache_is_multiplied_without_projecting():
    calc = _calc(WithLayerNorm().double().eval(), features=4)
    calc.train_grads()  # fills [n, p]: a pass is then one matrix product
    test = _data(2, features=4, seed=1)
    scores = calc.influence(test)
    basis, _ = calc.fitted_solver().low_rank()
    assert calc._grad_cache.projection(basis) is None
    torch.testing.assert_close(scores, _expected(calc, test), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("m", "projected"), [(2, False), (3, True)])
def test_row_blocks_count_one_pass_each(m, projected):
    # chunk 8, p = 83: the smallest budget allowed holds row blocks of 1 test example, so with
    # r = 6 a query of m = 2 costs 2 + 2c < r + c and m = 3 costs 3 + 3c > r + c (one pass per
    # query, 3 + c, would not project); both are few enough vectors for the direct products
    calc = _calc(rank=6, chunk_size=8, memory_budget=2 * 8 * 83 * 8)
    assert calc.wrapper.multiplies_directly(3)
    test = _data(m, seed=1)
    scores = calc.influence(test)
    basis, _ = calc.fitted_solver().low_rank()
    assert (calc._grad_cache.projection(basis) is not None) == projected
    torch.testing.assert_close(scores, _expected(calc, test), rtol=1e-10, atol=1e-12)
    idx, top = calc.top_k(test, 4)
    torch.testing.assert_close(top, scores.gather(1, idx), rtol=1e-10, atol=1e-12)
