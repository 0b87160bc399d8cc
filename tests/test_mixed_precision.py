"""Curvature products in float32 for a float64 model (infl.mixed_precision), checked in float64.

References are float64: the dense Hessian (ExactHessian) and float64 CG. CG on float32 products
must meet the same tolerance on the float64 residual (iterative refinement); LiSSA and Arnoldi
use the float32 products as they are and must agree with their float64 runs to ~1e-5.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from infl import (
    Arnoldi,
    ConjugateGradient,
    DenseOperator,
    ExactHessian,
    HessianOperator,
    IndexedData,
    InfluenceCalculator,
    InflWarning,
    InputError,
    LiSSA,
    ModelWrapper,
    NotPositiveDefiniteError,
    Objective,
)
from infl.calculator_setup import curvature_operator
from infl.mixed_precision import (
    MixedPrecisionOperator,
    check_curvature_dtype,
    full_precision_operator,
    mixed_precision_operator,
    product_dtype,
)
from infl.solvers.base import relative_residuals
from reference import rel_err

WD = 0.01
DAMPING = 0.01


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 100) -> nn.Module:
    opt = torch.optim.LBFGS(model.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss = loss + WD / 2 * sum((q**2).sum() for q in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


@pytest.fixture(scope="module")
def mlp_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (80,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    return _train(model, x, y), x, y


@pytest.fixture(scope="module")
def cnn_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(60, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (60,), generator=gen)
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 3)
    ).double()
    return _train(model, x, y), x, y


def _calc(problem, solver, dtype=None, *, dense=False, curvature="hessian") -> InfluenceCalculator:
    """A calculator; ``dense=False`` keeps the small-p dense shortcut off, so that products
    are taken (in float32 with ``dtype``) instead of answered from the float64 matrix."""
    model, x, y = problem
    calc = InfluenceCalculator(
        model,
        Objective("cross_entropy", weight_decay=WD),
        (x, y),
        solver,
        chunk_size=128,
        progress=False,
        check_minimum=False,
        curvature=curvature,
        curvature_dtype=dtype,
    )
    op = calc.operator
    full = op.full_precision if isinstance(op, MixedPrecisionOperator) else op
    full.dense = "auto" if dense else False  # type: ignore[attr-defined]
    return calc


def _test(problem):
    _, x, y = problem
    return x[:3], y[:3]


# ---------------------------------------------------------------- the option


def test_curvature_dtype_is_checked():
    f64, f32 = torch.float64, torch.float32
    assert check_curvature_dtype(None, f64) is None
    assert check_curvature_dtype(f64, f64) is None  # the model's own dtype: a no-op
    assert check_curvature_dtype(f32, f32) is None
    assert check_curvature_dtype(f32, f64) is f32
    with pytest.raises(InputError, match=r"must be a torch\.dtype"):
        check_curvature_dtype("float32", f64)
    with pytest.raises(InputError, match="real floating dtype"):
        check_curvature_dtype(torch.int32, f64)
    for low in (torch.float16, torch.bfloat16):
        with pytest.raises(InputError, match="not supported"):
            check_curvature_dtype(low, f64)
    with pytest.raises(InputError, match="more precise than the model"):
        check_curvature_dtype(f64, f32)


def test_calculator_refuses_bad_dtype_and_distributed(mlp_problem):
    with pytest.raises(InputError, match="not supported"):
        _calc(mlp_problem, ConjugateGradient(), torch.bfloat16)
    calc = _calc(mlp_problem, ConjugateGradient(), torch.float64)
    assert calc.curvature_dtype is None
    assert isinstance(calc.operator, HessianOperator)

    class TwoRanks:
        world_size = 2

    two: Any = TwoRanks()
    with pytest.raises(InputError, match=r"torch\.distributed"):
        curvature_operator("hessian", calc.wrapper, calc.train, 32, two, torch.float32)


# ---------------------------------------------------------------- the operator


def test_operator_products_twin_and_dense(mlp_problem):
    calc = _calc(mlp_problem, ConjugateGradient(), torch.float32)
    op = calc.operator
    assert isinstance(op, MixedPrecisionOperator)
    full = op.full_precision
    assert isinstance(full, HessianOperator)
    assert op.dtype == torch.float64
    assert op.product_dtype == torch.float32
    assert product_dtype(op.damped(0.5)) == torch.float32
    assert product_dtype(full) == torch.float64
    # the twin: float32 parameters equal to the float64 ones rounded, data cast once
    twin = op.low_precision
    assert isinstance(twin, HessianOperator)
    assert twin.wrapper.dtype == torch.float32
    assert torch.equal(twin.wrapper.flat_params, calc.wrapper.flat_params.float())
    assert isinstance(twin.data, IndexedData)
    assert next(twin.data.chunks(200))[1][0].dtype == torch.float32
    v = torch.randn(3, op.size, dtype=torch.float64)
    got, want = op.matmat(v), full.matmat(v)
    assert got.dtype == torch.float64
    assert 0 < rel_err(got, want) < 1e-5
    assert op.num_matvecs == 3
    assert full.num_matvecs == 3
    assert torch.equal(op.to_dense(), full.to_dense())  # dense stays float64
    # damping: the full-precision twin of the damped operator is the damped float64 operator
    damped = full_precision_operator(op.damped(0.5))
    assert damped is not None
    torch.testing.assert_close(damped.matmat(v), want + 0.5 * v, rtol=1e-12, atol=1e-14)
    assert full_precision_operator(full) is None
    assert full_precision_operator(full.damped(1)) is None
    # K-FAC and LiSSA read these: they are the float64 operator's
    assert op.wrapper is calc.wrapper
    assert op.chunk_size == 128
    assert len(op.data) == 80


def test_minibatches_are_the_float64_operators_draws(mlp_problem):
    op = _calc(mlp_problem, ConjugateGradient(), torch.float32).operator.damped(0.1)
    full = full_precision_operator(op)
    assert full is not None
    assert op.supports_subsample
    subs = op.subsample_many(16, 5, torch.Generator().manual_seed(3))
    ref = full.subsample_many(16, 5, torch.Generator().manual_seed(3))
    one = op.subsample(16, torch.Generator().manual_seed(3))
    v = torch.randn(2, op.size, dtype=torch.float64)
    for sub, want in zip(subs, ref, strict=True):
        low_full = full_precision_operator(sub)
        assert low_full is not None
        got_x, want_x = low_full.base.data[0], want.base.data[0]  # type: ignore[attr-defined]
        assert torch.equal(got_x, want_x)  # the same examples, in float64
        assert torch.equal(sub.base.low_precision.data[0], want_x.float())  # type: ignore[attr-defined]
        assert rel_err(sub.matmat(v), want.matmat(v)) < 1e-5
    assert torch.equal(one.base.full_precision.data[0], ref[0].base.data[0])  # type: ignore[attr-defined]


def test_model_that_cannot_run_in_float32_is_refused():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2).double()
            self.scale = torch.ones(2, dtype=torch.float64)  # not a buffer: .to() misses it

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) @ torch.diag(self.scale)

    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    wrapper = ModelWrapper(Scaled().eval(), Objective("cross_entropy"))
    with pytest.raises(InputError, match=r"could not be evaluated in torch\.float32"):
        mixed_precision_operator(HessianOperator(wrapper, IndexedData((x, y))), torch.float32)


# ---------------------------------------------------------------- CG with refinement


@pytest.mark.parametrize("problem", ["mlp_problem", "cnn_problem"])
def test_cg_refined_matches_exact_like_float64_cg(problem, request):
    prob = request.getfixturevalue(problem)
    test = _test(prob)
    exact = _calc(prob, ExactHessian(damping=DAMPING)).influence(test)
    solver = ConjugateGradient(damping=DAMPING, rtol=1e-10, max_iter=500)
    plain = _calc(prob, solver)
    mixed = _calc(prob, solver, torch.float32)
    err64 = rel_err(plain.influence(test), exact)
    err32 = rel_err(mixed.influence(test), exact)
    assert err64 < 1e-8
    assert err32 < 1e-8
    result = mixed.inverse_hvp(test)
    info = result.info
    assert result.converged
    assert info["product_dtype"] == "float32"
    assert info["refinement_steps"] >= 2
    assert not info["refinement_fallback"]
    assert info["inner_iterations"] == result.iterations > 0
    assert info["full_precision_matvecs"] >= info["refinement_steps"]
    # the guarantee is on the float64 residual, recomputed here independently
    full = full_precision_operator(mixed.fitted_solver().operator)
    assert full is not None
    b = mixed.test_grads(test)
    true = relative_residuals(full, result.value, b)
    assert float(true.max()) <= 1e-10
    torch.testing.assert_close(true, result.residual_norms, rtol=1e-3, atol=1e-14)
    assert result.trace.shape == (result.iterations + 1, 3)
    assert "refinement_steps" not in plain.inverse_hvp(test).info  # plain CG unchanged


def _dense_mixed(matrix: torch.Tensor) -> MixedPrecisionOperator:
    return MixedPrecisionOperator(DenseOperator(matrix), DenseOperator(matrix.float()))


def _spd(p: int, cond: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    evals = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), p, dtype=torch.float64)
    return (q * evals) @ q.T


def test_cg_refined_with_preconditioner_and_atol():
    matrix = _spd(60, 1e4)
    rhs = torch.randn(3, 60, dtype=torch.float64)
    want = torch.linalg.solve(matrix + 1e-3 * torch.eye(60, dtype=torch.float64), rhs.T).T
    pcg = ConjugateGradient(damping=1e-3, rtol=1e-11, max_iter=500, preconditioner=Arnoldi(rank=10))
    result = pcg.solve(_dense_mixed(matrix), rhs)
    assert result.converged
    assert result.info["preconditioner"] == "Arnoldi"
    assert result.info["refinement_steps"] >= 2
    assert rel_err(result.value, want) < 1e-8
    absolute = ConjugateGradient(damping=1e-3, rtol=0.0, atol=1e-9, max_iter=500)
    result = absolute.solve(_dense_mixed(matrix), rhs)
    full = DenseOperator(matrix).damped(1e-3)
    assert float((full.matmat(result.value) - rhs).norm(dim=1).max()) <= 1e-9


def test_cg_refined_falls_back_when_low_precision_does_not_halve_the_residual():
    matrix = _spd(40, 1e3, seed=2)
    # products three times too large: each correction leaves 2/3 of the residual
    bad = MixedPrecisionOperator(DenseOperator(matrix), DenseOperator(3 * matrix.float()))
    rhs = torch.randn(2, 40, dtype=torch.float64)
    with pytest.warns(InflWarning, match="left the torch.float64 residual at 0.667 times"):
        result = ConjugateGradient(rtol=1e-10, max_iter=500).solve(bad, rhs)
    assert result.info["refinement_fallback"]
    assert result.converged
    assert float(relative_residuals(DenseOperator(matrix), result.value, rhs).max()) <= 1e-10


def test_cg_refined_falls_back_on_round_off_negative_curvature():
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    evals = torch.cat([torch.ones(20), torch.full((20,), 1e-9)]).double()
    matrix = (q * evals) @ q.T  # positive definite; in float32 not (round-off 1e-7 >> 1e-9)
    assert float(torch.linalg.eigvalsh(matrix.float().double()).min()) < 0
    rhs = torch.randn(2, 40, dtype=torch.float64)
    with pytest.warns(InflWarning, match="negative curvature that the torch.float64"):
        result = ConjugateGradient(rtol=1e-6, max_iter=200).solve(_dense_mixed(matrix), rhs)
    assert result.info["refinement_fallback"]
    assert result.converged
    assert float(relative_residuals(DenseOperator(matrix), result.value, rhs).max()) <= 1e-6


def test_cg_refined_negative_curvature_and_auto_damping():
    matrix = torch.diag(torch.tensor([3.0, 2.0, 1.0, -0.5], dtype=torch.float64))
    rhs = torch.ones(1, 4, dtype=torch.float64)
    with pytest.raises(NotPositiveDefiniteError, match="negative curvature"):
        ConjugateGradient().solve(_dense_mixed(matrix), rhs)
    matrix = _spd(30, 1e3) - 2e-3 * torch.eye(30, dtype=torch.float64)  # lambda_min ~ -1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InflWarning)
        fitted = ConjugateGradient(damping="auto", rtol=1e-10, max_iter=500).fit(
            _dense_mixed(matrix)
        )
        result = fitted.solve(torch.randn(2, 30, dtype=torch.float64))
    lam = fitted.damping
    assert lam > 1e-3
    assert result.converged
    full = DenseOperator(matrix).damped(lam)
    b = torch.randn(2, 30, dtype=torch.float64)
    x = fitted.solve(b).value
    assert float(relative_residuals(full, x, b).max()) <= 1e-10


def test_cg_refined_max_iter_far_from_converged_reports_the_recursive_residual():
    """A small budget spent far above the float32 floor: no last float64 product; the
    recursive residuals it reports are the true ones."""
    matrix = _spd(80, 1e5, seed=4)
    rhs = torch.randn(2, 80, dtype=torch.float64)
    with pytest.warns(InflWarning, match="max_iter=5"):
        result = ConjugateGradient(rtol=1e-12, max_iter=5).solve(_dense_mixed(matrix), rhs)
    assert not result.converged
    assert result.iterations == 5
    assert result.info["full_precision_matvecs"] == 0
    assert result.info["true_residual_checked"] is False
    true = relative_residuals(DenseOperator(matrix), result.value, rhs)
    torch.testing.assert_close(result.residual_norms, true, rtol=1e-5, atol=0)


def test_cg_refined_max_iter_near_the_float32_floor_measures_the_float64_residual():
    """A budget that runs out below sqrt(eps32) of ||b||, where the float32 recursion may
    have left the true residual: one last float64 product measures it."""
    matrix = _spd(40, 10.0, seed=3)
    rhs = torch.randn(2, 40, dtype=torch.float64)
    with pytest.warns(InflWarning, match="max_iter=13"):
        result = ConjugateGradient(rtol=1e-15, max_iter=13).solve(_dense_mixed(matrix), rhs)
    assert not result.converged
    assert result.info["true_residual_checked"] is True
    assert float(result.residual_norms.max()) < 3.5e-4
    true = relative_residuals(DenseOperator(matrix), result.value, rhs)
    torch.testing.assert_close(result.residual_norms, true, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- the other solvers


def test_lissa_arnoldi_and_exact_on_float32_products(mlp_problem):
    test = _test(mlp_problem)
    solvers = [
        LiSSA(damping=DAMPING, scale=20.0, depth=300, batch_size=None, rtol=1e-300),
        LiSSA(damping=DAMPING, scale=40.0, depth=200, batch_size=32, seed=5, rtol=1e-300),
        Arnoldi(rank=20, krylov_dim=40, damping=DAMPING),
    ]
    for solver in solvers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InflWarning)
            want = _calc(mlp_problem, solver).influence(test)
            got = _calc(mlp_problem, solver, torch.float32).influence(test)
        assert got.dtype == torch.float64
        assert rel_err(got, want) < 1e-5, type(solver).__name__
    exact = ExactHessian(damping=DAMPING)
    want = _calc(mlp_problem, exact).influence(test)
    assert torch.equal(_calc(mlp_problem, exact, torch.float32).influence(test), want)


def test_save_and_load_keep_the_curvature_dtype(mlp_problem, tmp_path):
    model, x, y = mlp_problem
    calc = _calc(mlp_problem, Arnoldi(rank=10, krylov_dim=30, damping=DAMPING), torch.float32)
    calc.save(tmp_path / "fit.pt")
    again = InfluenceCalculator.load(
        tmp_path / "fit.pt",
        model,
        Objective("cross_entropy", weight_decay=WD),
        (x, y),
        progress=False,
        check_minimum=False,
    )
    assert again.curvature_dtype == torch.float32
    assert isinstance(again.operator, MixedPrecisionOperator)
    assert torch.equal(again.influence(_test(mlp_problem)), calc.influence(_test(mlp_problem)))


def test_small_p_dense_matrix_answers_instead_of_float32_products(mlp_problem):
    test = _test(mlp_problem)
    solver = ConjugateGradient(damping=DAMPING, rtol=1e-10, max_iter=500)
    plain = _calc(mlp_problem, solver, dense=True)
    mixed = _calc(mlp_problem, solver, torch.float32, dense=True)
    result = mixed.inverse_hvp(test)
    assert result.info["operator_dense"]
    assert "refinement_steps" not in result.info
    assert mixed.operator.low_precision.num_matvecs == 0  # type: ignore[attr-defined]
    assert torch.equal(result.value, plain.inverse_hvp(test).value)


def test_gauss_newton_curvature_in_float32(cnn_problem):
    test = _test(cnn_problem)

    def calc(solver, dtype=None):
        return _calc(cnn_problem, solver, dtype, curvature="gauss_newton")

    exact = calc(ExactHessian(damping=DAMPING)).influence(test)
    mixed = calc(ConjugateGradient(damping=DAMPING, rtol=1e-10, max_iter=500), torch.float32)
    assert rel_err(mixed.influence(test), exact) < 1e-8
    assert mixed.inverse_hvp(test).info["refinement_steps"] >= 2
