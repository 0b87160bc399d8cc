"""Small models: products answered from the assembled dense matrix (``dense="auto"``).

Every dense path is checked against the matrix-free one (``dense=False``) in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import infl.operators as operators
from infl import (
    Arnoldi,
    ConjugateGradient,
    ExactHessian,
    HessianOperator,
    IndexedData,
    InfluenceCalculator,
    ModelWrapper,
    Objective,
)
from infl.errors import InputError, NonFiniteError
from infl.operators import DenseOperator
from infl.spectral.damping import auto_damping_exact
from infl.spectral.lanczos import lanczos


def _problem(dense="auto"):
    """A 3-4-3 tanh MLP (p = 31) on 40 random examples, float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    wrapper = ModelWrapper(model, Objective("cross_entropy", weight_decay=0.01))
    return HessianOperator(wrapper, IndexedData((x, y)), chunk_size=16, dense=dense), (x, y)


def _safe_damping(op) -> float:
    """A damping that makes H + damping * I comfortably positive definite."""
    lowest = float(torch.linalg.eigvalsh(op.to_dense())[0])
    return max(0.0, -lowest) + 0.1


def test_cg_on_the_dense_matrix_equals_matrix_free_cg():
    auto, _ = _problem()
    free, _ = _problem(dense=False)
    damping = _safe_damping(HessianOperator(auto.wrapper, auto.data, dense=False))
    rhs = torch.randn(3, auto.size, dtype=torch.float64)
    solver = ConjugateGradient(damping=damping, rtol=1e-12, max_iter=200)
    got = solver.fit(auto).solve(rhs)
    want = solver.fit(free).solve(rhs)
    assert got.converged
    assert want.converged
    torch.testing.assert_close(got.value, want.value, rtol=1e-10, atol=1e-12)
    assert got.info["operator_dense"]
    assert not want.info["operator_dense"]
    # the assembly (in closed form for this nn.Sequential MLP: no product) is the only pass
    # over the data; every iteration's products are answered from the matrix
    assert auto.num_matvecs == auto.num_dense_matvecs
    assert got.info["true_residual_checked"]  # one more product of the 3 right-hand sides
    assert 0 < auto.num_dense_matvecs <= 3 * got.iterations + 3
    assert free.num_dense_matvecs == 0


def test_arnoldi_lanczos_on_the_dense_matrix_equals_matrix_free_lanczos():
    auto, _ = _problem()
    free, _ = _problem(dense=False)
    solver = Arnoldi(rank=5, krylov_dim=20, damping=0.5)
    got, want = solver.fit(auto), solver.fit(free)
    torch.testing.assert_close(got.eigenvalues, want.eigenvalues, rtol=1e-10, atol=1e-12)
    # the same Ritz vectors (Lanczos from the same start vector), not just the same span
    torch.testing.assert_close(got.basis, want.basis, rtol=0, atol=1e-9)
    rhs = torch.randn(4, auto.size, dtype=torch.float64)
    torch.testing.assert_close(got.apply(rhs), want.apply(rhs), rtol=1e-10, atol=1e-12)
    assert got.info["dense_matrix"]
    assert not want.info["dense_matrix"]
    assert got.info["eigensolver"] == want.info["eigensolver"] == "lanczos"
    assert got.info["lanczos_iterations"] == want.info["lanczos_iterations"] == 20
    assert got.info["num_hvps"] == 0  # a closed-form assembly; Lanczos's 20 products were dense
    assert want.info["num_hvps"] == 20


def test_arnoldi_takes_exact_eigenpairs_when_lanczos_would_exhaust_the_space():
    auto, _ = _problem()
    free, _ = _problem(dense=False)
    p = auto.size
    solver = Arnoldi(rank=6, krylov_dim=p, damping=0.5)
    got, want = solver.fit(auto), solver.fit(free)
    assert got.info["eigensolver"] == "eigh"
    assert got.info["lanczos_iterations"] == 0
    assert got.info["lanczos_exhausted"]
    assert want.info["eigensolver"] == "lanczos"
    torch.testing.assert_close(got.eigenvalues, want.eigenvalues, rtol=1e-10, atol=1e-12)
    rhs = torch.randn(2, p, dtype=torch.float64)
    torch.testing.assert_close(got.apply(rhs), want.apply(rhs), rtol=1e-9, atol=1e-11)
    assert got.info["ritz_residual_max"] < 1e-12 * got.info["max_eigenvalue"]
    spectrum = torch.linalg.eigvalsh(auto.to_dense())
    torch.testing.assert_close(got.eigenvalues, spectrum.flip(0)[:6], rtol=1e-12, atol=1e-14)
    # damping="auto" reads the exact extremes (no Lanczos margin)
    tuned = Arnoldi(rank=6, krylov_dim=p, damping="auto").fit(auto)
    rule = auto_damping_exact(float(spectrum[-1]), float(spectrum[0]))
    assert tuned.damping == pytest.approx(rule.damping, rel=1e-10)


def test_the_switch_follows_its_cost_model_and_size_limit(monkeypatch):
    op, _ = _problem()
    p = op.size  # 31, on n = 40 examples
    monkeypatch.setattr(operators, "CALL_COST_ENTRIES", 0)  # passes only: the assembly is 3 + 2p
    assert not op.dense_pays(12)
    assert not op.dense_pays(13)
    assert op.dense_pays(14)
    assert op.dense_pays(100, calls=10)  # 3 * 10 + 2 * 100 = 230
    assert not Arnoldi(rank=2, krylov_dim=13).fit(op).info["dense_matrix"]
    assert not op.answers_dense
    assert op.num_matvecs == 13
    fitted = Arnoldi(rank=2, krylov_dim=14).fit(op)
    assert fitted.info["dense_matrix"]
    assert op.answers_dense
    assert op.num_matvecs - op.num_dense_matvecs == 13  # then a closed-form assembly
    small, _ = _problem()
    monkeypatch.setattr(operators, "DENSE_AUTO_MAX_BYTES", p * p * 8 - 1)
    assert not small.dense_pays(10_000)
    assert not small.expect_products(10_000)
    assert small._dense is None


def test_a_calls_own_cost_counts_more_the_smaller_the_model(monkeypatch):
    op, (x, y) = _problem()
    one_batch = HessianOperator(op.wrapper, (x, y), chunk_size=16)
    monkeypatch.setattr(operators, "CALL_COST_ENTRIES", 40 * 31 * 10)  # 10 passes a call
    for candidate in (op, one_batch):
        # the assembly: (3 + 10) + 2 * 31 = 75; a call of k vectors: 13 + 2k
        assert not candidate.dense_pays(31, calls=1)  # 75
        assert candidate.dense_pays(32, calls=1)  # 77
        assert not candidate.dense_pays(5, calls=5)  # 65 + 10
        assert candidate.dense_pays(6, calls=6)  # 78 + 12
    big = HessianOperator(op.wrapper, IndexedData((x.repeat(10, 1), y.repeat(10))), chunk_size=64)
    assert not big.dense_pays(6, calls=6)  # 1 pass a call: 4 * 6 + 12 < 4 + 62
    monkeypatch.undo()
    assert op.dense_pays(2, calls=2)  # the default: two calls already pay on this model
    assert not op.dense_pays(1, calls=1)


def test_dense_false_never_answers_from_the_matrix_and_true_always_assembles():
    off, _ = _problem(dense=False)
    matrix = off.to_dense()  # still available, and kept
    assert off.to_dense() is matrix
    assert not off.expect_products(10_000)
    assert not off.answers_dense
    v = torch.randn(2, off.size, dtype=torch.float64)
    off.matmat(v)
    assert off.num_dense_matvecs == 0
    on, _ = _problem(dense=True)
    assert on.expect_products(1)
    assert on.answers_dense
    with pytest.raises(InputError, match="dense must be True, False or 'auto'"):
        _problem(dense="yes")


def test_products_after_an_assembly_come_from_the_matrix_and_are_counted():
    op, _ = _problem()
    v = torch.randn(3, op.size, dtype=torch.float64)
    free = op.matmat(v)
    assert op.num_dense_matvecs == 0
    op.to_dense()  # ExactHessian's assembly: later products are answered from it
    damped = op.damped(0.3)
    torch.testing.assert_close(op.matmat(v), free, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(damped.matmat(v), free + 0.3 * v, rtol=1e-10, atol=1e-12)
    assert op.num_dense_matvecs == 6
    assert damped.num_dense_matvecs == 3
    assert damped.answers_dense
    assert damped.expect_products(1)
    sub = op.subsample(10, torch.Generator().manual_seed(0))
    assert sub.dense == "auto"
    assert not sub.answers_dense


def test_calculator_cg_and_arnoldi_on_a_small_model_match_exact():
    op, (x, y) = _problem()
    damping = _safe_damping(op)
    model = op.wrapper.model
    kw = {"progress": False, "check_minimum": False}
    obj = Objective("cross_entropy", weight_decay=0.01)
    test = (x[:3], y[:3])
    exact = InfluenceCalculator(model, obj, (x, y), ExactHessian(damping=damping), **kw)
    want = exact.influence(test)
    cg = InfluenceCalculator(
        model, obj, (x, y), ConjugateGradient(damping=damping, rtol=1e-12), **kw
    )
    torch.testing.assert_close(cg.influence(test), want, rtol=1e-8, atol=1e-10)
    assert cg.inverse_hvp(test).info["operator_dense"]
    full = InfluenceCalculator(
        model, obj, (x, y), Arnoldi(rank=op.size, damping=damping, keep="magnitude"), **kw
    )
    torch.testing.assert_close(full.influence(test), want, rtol=1e-8, atol=1e-10)
    assert full.fitted_solver().info["eigensolver"] == "eigh"


def test_linear_per_example_gradients_are_checked_without_vmap(monkeypatch):
    op, (x, y) = _problem()
    wrapper = op.wrapper
    loss = wrapper.objective.per_example_loss
    want = wrapper._vmapped_grads(loss, (x, y))

    def refuse(*args, **kwargs):
        raise AssertionError("vmap(grad) was called")

    monkeypatch.setattr(wrapper, "_vmapped_grads", refuse)
    got = wrapper.per_example_grads(loss, (x, y))
    assert wrapper._linear_verified[loss] is True
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_lanczos_refuses_a_non_finite_product(bad):
    matrix = torch.eye(6, dtype=torch.float64)
    matrix[2, 2] = bad
    with pytest.raises(NonFiniteError, match="not finite at step 1"):
        lanczos(DenseOperator(matrix), 2, max_iter=6)
