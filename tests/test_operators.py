"""Curvature operators: the Hessian, the generalised Gauss-Newton matrix, dense and damped forms.

The Gauss-Newton references are built here from per-example autograd Jacobians of the model
output and autograd Hessians of the loss in the outputs, with nothing taken from infl.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import reference
from infl import (
    ConjugateGradient,
    DampedOperator,
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
    supervised_loss,
)
from infl.operators import GaussNewtonOperator, TrainingDataOperator
from reference import rel_err
from reference_ggn import REFERENCE_LOSSES, reference_ggn

WD = 0.1


def _mlp(seed: int = 1, d_in: int = 3, width: int = 5, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, d_out)).double().eval()


def _data(loss: str, n: int = 12, d_in: int = 3, d_out: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, d_out, (n,), generator=gen)
    elif loss == "mse":
        y = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    else:
        y = torch.randint(0, 2, (n, d_out), generator=gen).double()
    return x, y


def _ggn(model, loss, data, wd=WD, chunk_size=5):
    return GaussNewtonOperator(ModelWrapper(model, Objective(loss, wd)), data, chunk_size)


def _hessian(model, loss, data, wd=WD, chunk_size=5):
    return HessianOperator(ModelWrapper(model, Objective(loss, wd)), data, chunk_size)


# ---------------------------------------------------------------- Gauss-Newton: exactness


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits"])
def test_ggn_dense_from_output_jacobians_equals_the_product_assembly(loss):
    from infl.operators import LinearOperator

    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2, 3))
    model = model.double().eval()
    x, y = _data(loss)
    x = x.unsqueeze(1)  # [n, 1, 3]: one channel
    op = _ggn(model, loss, IndexedData((x, y)))
    dense = op.to_dense(block_size=4)
    assert op.num_matvecs == 0  # K = 3 backward passes per example, no product
    torch.testing.assert_close(dense, LinearOperator.to_dense(op, 4), rtol=1e-12, atol=1e-13)
    assert op.to_dense() is dense  # kept


def test_a_block_of_the_dense_ggn_is_that_block_of_the_whole_matrix():
    model = _mlp()
    x, y = _data("cross_entropy")
    wrapper = ModelWrapper(model, Objective("cross_entropy", WD))
    data = IndexedData((x, y))
    index = torch.tensor([0, 3, 4, 17, 30, wrapper.num_params - 1])
    whole = wrapper.ggn_matrix(data, 5)
    block = wrapper.ggn_matrix(data, 5, index=index)
    assert whole is not None
    assert block is not None
    torch.testing.assert_close(block, whole[index][:, index], rtol=1e-13, atol=1e-15)


def test_ggn_dense_of_a_wide_output_is_assembled_from_products():
    # 300 outputs per example exceed the Jacobian path's bound: p products instead
    model = nn.Linear(2, 300).double().eval()
    x = torch.randn(4, 2, dtype=torch.float64)
    y = torch.randn(4, 300, dtype=torch.float64)
    op = _ggn(model, "mse", IndexedData((x, y)))
    dense = op.to_dense(block_size=400)
    assert op.num_matvecs == op.size
    expected = reference_ggn(model, x, y, REFERENCE_LOSSES["mse"], WD)
    torch.testing.assert_close(dense, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits"])
def test_ggn_to_dense_equals_autograd_jacobian_reference_on_mlp(loss):
    model = _mlp()
    x, y = _data(loss)
    op = _ggn(model, loss, IndexedData((x, y)))
    expected = reference_ggn(model, x, y, REFERENCE_LOSSES[loss], WD)
    torch.testing.assert_close(op.to_dense(block_size=7), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_ggn_equals_hessian_for_a_linear_model(loss):
    torch.manual_seed(3)
    model = nn.Linear(4, 3).double().eval()  # untrained: G = H holds at any parameters
    x, y = _data(loss, n=15, d_in=4)
    data = IndexedData((x, y))
    ggn, hess = _ggn(model, loss, data).to_dense(), _hessian(model, loss, data).to_dense()
    torch.testing.assert_close(ggn, hess, rtol=1e-10, atol=1e-10)


def test_ggn_equals_closed_form_hessian_of_logistic_regression(logistic):
    p = logistic
    op = _ggn(p.model, "bce_with_logits", IndexedData((p.x, p.y)), wd=p.wd, chunk_size=7)
    expected = reference.hessian(p.theta, p.x, p.y, p.wd)
    torch.testing.assert_close(op.to_dense(block_size=2), expected, rtol=1e-10, atol=1e-12)


def test_ggn_is_psd_where_the_hessian_is_indefinite_and_cg_solves_it():
    model = _mlp(d_out=3, width=6)
    x, y = _data("cross_entropy", n=20)
    data = IndexedData((x, y))
    wd = 0.01
    hess_op, ggn_op = (
        _hessian(model, "cross_entropy", data, wd),
        _ggn(model, "cross_entropy", data, wd),
    )
    h_evals, h_evecs = torch.linalg.eigh(hess_op.to_dense())
    g_dense = ggn_op.to_dense()
    g_evals = torch.linalg.eigvalsh(g_dense)
    assert float(h_evals[0]) < -0.05  # H + 0*I is indefinite ...
    assert float(g_evals[0]) >= wd - 1e-10  # ... G >= wd*I: positive definite
    # CG's first direction is the rhs, here H's most negative eigenvector: it must refuse H
    rhs = h_evecs[:, 0].reshape(1, -1)
    with pytest.raises(NotPositiveDefiniteError, match="damping"):
        ConjugateGradient(damping=0.0).solve(hess_op, rhs)
    result = ConjugateGradient(damping=0.0, rtol=1e-10).solve(ggn_op, rhs)
    assert result.converged
    assert rel_err(result.value, torch.linalg.solve(g_dense, rhs.T).T) < 1e-8


def test_ggn_without_weight_decay_is_psd_on_mlp():
    model = _mlp(width=8)
    x, y = _data("cross_entropy", n=6)  # rank(G) <= n * (C - 1) = 12 < p: singular
    g_evals = torch.linalg.eigvalsh(
        _ggn(model, "cross_entropy", IndexedData((x, y)), 0.0).to_dense()
    )
    assert float(g_evals[0]) >= -1e-10
    assert float(g_evals[-1]) > 1e-3


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits"])
def test_ggn_does_not_depend_on_chunk_size_or_data_form(loss):
    model = _mlp()
    x, y = _data(loss, n=11)
    v = torch.randn(4, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    results = [
        _ggn(model, loss, IndexedData((x, y)), chunk_size=c).matmat(v) for c in (1, 3, 11, 100)
    ]
    results.append(_ggn(model, loss, (x, y)).matmat(v))  # one batch
    results.append(_ggn(model, loss, {"inputs": x, "targets": y}).matmat(v))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    results.append(_ggn(model, loss, IndexedData(loader), chunk_size=4).matmat(v))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-12, atol=1e-13)


def test_ggn_operator_counts_matvecs_and_keeps_the_module_unchanged():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data("cross_entropy")
    op = _ggn(model, "cross_entropy", IndexedData((x, y)))
    assert isinstance(op, TrainingDataOperator)
    op.matmat(torch.randn(3, op.size, dtype=torch.float64))
    assert op.num_matvecs == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- Gauss-Newton: user losses


def _poisson_nll(out, y):
    """Per-example Poisson NLL with log-rate outputs: sum_c exp(f_c) - y_c f_c."""
    return (out.exp() - y * out).sum(dim=1)


def _poisson_output_hessian(out, y, u):
    return out.exp() * u


def _poisson_data(n=10):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.poisson(torch.full((n, 3), 2.0, dtype=torch.float64), generator=gen)
    return x, y


@pytest.mark.parametrize("output_hessian", [_poisson_output_hessian, "autograd"])
def test_ggn_with_user_output_hessian_matches_autograd_reference(output_hessian):
    model = _mlp()
    x, y = _poisson_data()
    loss = supervised_loss(_poisson_nll, output_hessian=output_hessian)
    op = _ggn(model, loss, IndexedData((x, y)))
    expected = reference_ggn(model, x, y, _poisson_nll, WD)
    torch.testing.assert_close(op.to_dense(), expected, rtol=1e-10, atol=1e-12)


def test_user_loss_through_supervised_loss_has_the_same_hessian_operator():
    model = _mlp()
    x, y = _poisson_data()
    data = IndexedData((x, y))
    wrapped = _hessian(model, supervised_loss(_poisson_nll), data).to_dense()
    plain = _hessian(model, lambda m, b: _poisson_nll(m(b[0]), b[1]), data).to_dense()
    torch.testing.assert_close(wrapped, plain)


@pytest.mark.parametrize(
    "loss",
    [lambda m, b: _poisson_nll(m(b[0]), b[1]), supervised_loss(_poisson_nll)],
    ids=["plain_callable", "supervised_loss_without_output_hessian"],
)
def test_ggn_refuses_a_loss_without_output_hessian_naming_the_fix(loss):
    wrapper = ModelWrapper(_mlp(), Objective(loss))
    match = r"curvature='hessian'.*output_hessian="
    with pytest.raises(InputError, match=match):
        GaussNewtonOperator(wrapper, IndexedData(_poisson_data()))
    with pytest.raises(InputError, match=match):
        wrapper.ggn_vp(_poisson_data(), torch.zeros(1, wrapper.num_params, dtype=torch.float64), 4)


# ---------------------------------------------------------------- Gauss-Newton: every solver


@pytest.fixture
def ggn_problem():
    """``(GGN operator, dense G, rhs [3, p])`` on a small cross-entropy MLP with weight decay."""
    model = _mlp()
    x, y = _data("cross_entropy", n=24)
    op = _ggn(model, "cross_entropy", IndexedData((x, y)), wd=0.2, chunk_size=16)
    dense = reference_ggn(model, x, y, REFERENCE_LOSSES["cross_entropy"], 0.2)
    rhs = torch.randn(3, op.size, dtype=torch.float64)
    return op, dense, rhs


@pytest.mark.parametrize(
    ("make_solver", "tol"),
    [
        (lambda d: ExactHessian(damping=d), 1e-8),
        (lambda d: ConjugateGradient(damping=d, rtol=1e-10, max_iter=500), 1e-7),
        (lambda d: LiSSA(damping=d, scale="auto", depth=1000, rtol=1e-9), 1e-7),
    ],
    ids=["exact", "cg", "lissa"],
)
@pytest.mark.parametrize("damping", [0.0, 0.02])
def test_every_solver_inverts_the_ggn(ggn_problem, make_solver, tol, damping):
    op, dense, rhs = ggn_problem
    eye = torch.eye(op.size, dtype=torch.float64)
    expected = torch.linalg.solve(dense + damping * eye, rhs.T).T
    result = make_solver(damping).solve(op, rhs)
    assert result.converged
    assert rel_err(result.value, expected) < tol


def test_exact_solver_reports_a_nonnegative_ggn_spectrum(ggn_problem):
    op, _, _ = ggn_problem
    info = ExactHessian().fit(op).info
    assert info["num_negative"] == 0
    assert info["min_eigenvalue"] == pytest.approx(0.2, abs=1e-8)  # G's null space + wd


def test_minibatch_lissa_on_the_ggn_approximates_and_is_seeded(ggn_problem):
    op, dense, rhs = ggn_problem
    solver = LiSSA(damping=0.05, scale="auto", depth=60, repeats=2, batch_size=8, seed=3)
    with pytest.warns(InflWarning):
        a = solver.solve(op, rhs[:1])
    with pytest.warns(InflWarning):
        b = solver.solve(op, rhs[:1])
    torch.testing.assert_close(a.value, b.value)
    eye = torch.eye(op.size, dtype=torch.float64)
    expected = torch.linalg.solve(dense + 0.05 * eye, rhs[:1].T).T
    assert 1e-6 < rel_err(a.value, expected) < 0.3


# ---------------------------------------------------------------- subsampling


@pytest.mark.parametrize("make_op", [_ggn, _hessian], ids=["gauss_newton", "hessian"])
def test_subsample_is_the_same_operator_on_the_drawn_minibatch(make_op):
    model = _mlp()
    x, y = _data("cross_entropy", n=20)
    op = make_op(model, "cross_entropy", IndexedData((x, y)))
    assert op.supports_subsample
    sub = op.subsample(6, torch.Generator().manual_seed(7))
    assert type(sub) is type(op)
    idx = torch.randperm(20, generator=torch.Generator().manual_seed(7))[:6].sort().values
    expected = make_op(model, "cross_entropy", (x[idx], y[idx])).to_dense()
    torch.testing.assert_close(sub.to_dense(), expected)
    # a minibatch of everything is the full operator
    torch.testing.assert_close(op.subsample(50, torch.Generator()).to_dense(), op.to_dense())


@pytest.mark.parametrize("make_op", [_ggn, _hessian], ids=["gauss_newton", "hessian"])
def test_subsample_is_unbiased(make_op):
    model = _mlp()
    x, y = _data("cross_entropy", n=10)
    op = make_op(model, "cross_entropy", IndexedData((x, y)), chunk_size=16)
    v = torch.randn(1, op.size, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    num_draws = 60
    draws = torch.stack([op.subsample(3, gen).matmat(v) for _ in range(num_draws)])
    full = op.matmat(v)
    spread = float((draws - full).pow(2).sum(dim=(1, 2)).mean().sqrt())  # one draw's rms error
    assert spread > 0.05 * float(full.norm())  # the minibatches do differ ...
    # ... and their mean is as close to the full operator as an unbiased average should be
    assert float((draws.mean(dim=0) - full).norm()) < 3 * spread / num_draws**0.5


def test_damped_subsample_is_the_damped_minibatch_operator():
    model = _mlp()
    x, y = _data("cross_entropy", n=20)
    op = _ggn(model, "cross_entropy", IndexedData((x, y))).damped(0.3)
    assert op.supports_subsample
    sub = op.subsample(5, torch.Generator().manual_seed(1))
    base = op.base.subsample(5, torch.Generator().manual_seed(1))
    eye = torch.eye(op.size, dtype=torch.float64)
    torch.testing.assert_close(sub.to_dense(), base.to_dense() + 0.3 * eye)


@pytest.mark.parametrize(
    "op",
    [
        DenseOperator(torch.eye(3, dtype=torch.float64)),
        DenseOperator(torch.eye(3, dtype=torch.float64)).damped(0.5),
    ],
    ids=["dense", "damped_dense"],
)
def test_dense_operators_refuse_subsampling_naming_the_fix(op):
    assert not op.supports_subsample
    with pytest.raises(InputError, match=r"batch_size=None"):
        op.subsample(2, torch.Generator())
    with pytest.raises(InputError, match=r"batch_size=None"):
        LiSSA(batch_size=2, scale=2.0).fit(op)


@pytest.mark.parametrize("make_op", [_ggn, _hessian], ids=["gauss_newton", "hessian"])
def test_operator_on_a_single_batch_refuses_subsampling(make_op):
    x, y = _data("cross_entropy")
    op = make_op(_mlp(), "cross_entropy", (x, y))
    assert not op.supports_subsample
    with pytest.raises(InputError, match="IndexedData"):
        op.subsample(2, torch.Generator())


# ---------------------------------------------------------------- Hessian, dense, damped


def test_hessian_to_dense_equals_closed_form_logistic_hessian(logistic):
    p = logistic
    op = _hessian(p.model, "bce_with_logits", IndexedData((p.x, p.y)), wd=p.wd, chunk_size=9)
    expected = reference.hessian(p.theta, p.x, p.y, p.wd)
    torch.testing.assert_close(op.to_dense(block_size=3), expected, rtol=1e-10, atol=1e-12)


def test_dense_hessian_is_assembled_once_and_shared_by_solver_and_spectrum(logistic):
    from infl.diagnostics import hessian_spectrum
    from infl.operators import LinearOperator

    p = logistic
    op = _hessian(p.model, "bce_with_logits", IndexedData((p.x, p.y)), wd=p.wd, chunk_size=9)
    dense = op.to_dense(block_size=3)
    size = op.size
    assert op.num_matvecs == size
    # the kept matrix is exactly what the plain assembly gives
    assert torch.equal(dense, LinearOperator.to_dense(op, 3))
    assert op.num_matvecs == 2 * size
    spectrum = hessian_spectrum(op, method="dense", damping=0.1)
    fitted = ExactHessian(damping=0.2).fit(op)
    pinv = ExactHessian(damping=0.1, pseudo_inverse=True).fit(op.damped(0.1))
    assert op.num_matvecs == 2 * size  # no product after the first assembly
    assert spectrum.num_matvecs == 0
    expected = reference.hessian(p.theta, p.x, p.y, p.wd)
    eye = torch.eye(size, dtype=torch.float64)
    torch.testing.assert_close(spectrum.eigenvalues, torch.linalg.eigvalsh(expected + 0.1 * eye))
    torch.testing.assert_close(fitted.eigenvalues, torch.linalg.eigvalsh(expected))
    torch.testing.assert_close(pinv.eigenvalues, torch.linalg.eigvalsh(expected + 0.1 * eye))
    # a minibatch operator is another matrix: it assembles its own
    sub = op.subsample(5, torch.Generator().manual_seed(0))
    assert not torch.equal(sub.to_dense(), dense)


def test_damped_operator_adds_lambda_identity(logistic):
    p = logistic
    op = _hessian(p.model, "bce_with_logits", IndexedData((p.x, p.y)), wd=p.wd)
    damped = op.damped(0.25)
    assert isinstance(damped, DampedOperator)
    assert op.damped(0.0) is op
    eye = torch.eye(op.size, dtype=torch.float64)
    torch.testing.assert_close(damped.to_dense(), op.to_dense() + 0.25 * eye)
    v = torch.randn(3, op.size, dtype=torch.float64)
    torch.testing.assert_close(damped.matmat(v), op.matmat(v) + 0.25 * v)
    torch.testing.assert_close(damped.matvec(v[0]), damped.matmat(v[:1])[0])


def test_dense_operator_matches_its_matrix_and_checks_shapes():
    matrix = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    op = DenseOperator(matrix)
    v = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(v), v @ matrix.T)
    assert op.shape == (2, 2)
    with pytest.raises(InputError, match="square"):
        DenseOperator(torch.zeros(2, 3))


@pytest.mark.parametrize("shape", [(3,), (2, 4), (1, 2, 3)])
@pytest.mark.parametrize("which", ["dense", "damped", "hessian", "gauss_newton"])
def test_matmat_refuses_wrong_shapes(which, shape):
    x, y = _data("cross_entropy")
    model = _mlp()
    op = {
        "dense": lambda: DenseOperator(torch.eye(3, dtype=torch.float64)),
        "damped": lambda: DenseOperator(torch.eye(3, dtype=torch.float64)).damped(1.0),
        "hessian": lambda: _hessian(model, "cross_entropy", IndexedData((x, y))),
        "gauss_newton": lambda: _ggn(model, "cross_entropy", IndexedData((x, y))),
    }[which]()
    with pytest.raises(InputError, match=rf"\[k, {op.size}\]"):
        op.matmat(torch.zeros(shape, dtype=torch.float64))


@pytest.mark.parametrize("cls", [HessianOperator, GaussNewtonOperator])
def test_training_data_operators_refuse_bad_chunk_size(cls):
    wrapper = ModelWrapper(_mlp(), Objective("cross_entropy"))
    with pytest.raises(InputError, match="chunk_size"):
        cls(wrapper, IndexedData(_data("cross_entropy")), chunk_size=0)


# ---------------------------------------------------------------- the calculator


def _calc(problem, curvature, solver=None, **kwargs):
    return InfluenceCalculator(
        problem.model,
        Objective("bce_with_logits", weight_decay=problem.wd),
        (problem.x, problem.y),
        solver or ExactHessian(),
        progress=False,
        curvature=curvature,
        **kwargs,
    )


@pytest.mark.parametrize("solver", [ExactHessian(), ConjugateGradient(rtol=1e-12)])
def test_calculator_gauss_newton_equals_hessian_on_logistic_regression(logistic, solver):
    test = (logistic.x_test, logistic.y_test)
    hess = _calc(logistic, "hessian", solver)
    ggn = _calc(logistic, "gauss_newton", solver)
    assert (hess.curvature, ggn.curvature) == ("hessian", "gauss_newton")
    assert isinstance(ggn.operator, GaussNewtonOperator)
    assert isinstance(hess.operator, HessianOperator)
    torch.testing.assert_close(ggn.influence(test), hess.influence(test), rtol=1e-9, atol=1e-10)


def test_calculator_default_curvature_is_the_hessian(logistic):
    calc = InfluenceCalculator(
        logistic.model,
        Objective("bce_with_logits", logistic.wd),
        (logistic.x, logistic.y),
        ExactHessian(),
        progress=False,
    )
    assert calc.curvature == "hessian"
    assert isinstance(calc.operator, HessianOperator)


@pytest.mark.parametrize("bad", ["newton", "GGN", "", None, 3])
def test_calculator_refuses_an_unknown_curvature(logistic, bad):
    with pytest.raises(InputError, match=r"curvature must be one of \['gauss_newton', 'hessian'\]"):
        _calc(logistic, bad)


def test_calculator_gauss_newton_without_output_hessian_names_the_fix():
    x, y = _poisson_data()
    with pytest.raises(
        InputError, match=r"curvature='hessian'.*supervised_loss\(fn, output_hessian="
    ):
        InfluenceCalculator(
            _mlp(),
            Objective(lambda m, b: _poisson_nll(m(b[0]), b[1])),
            (x, y),
            ExactHessian(),
            progress=False,
            curvature="gauss_newton",
        )


def test_calculator_gauss_newton_with_user_output_hessian_matches_autograd_reference():
    model = _mlp()
    x, y = _poisson_data(n=16)
    test = (x[:3], y[:3])
    wd = 0.05
    scores = {}
    for name, hess in [("user", _poisson_output_hessian), ("autograd", "autograd")]:
        objective = Objective(supervised_loss(_poisson_nll, output_hessian=hess), wd)
        calc = InfluenceCalculator(
            model, objective, (x, y), ExactHessian(), progress=False, curvature="gauss_newton"
        )
        scores[name] = calc.influence(test)
    # the closed form: -grad f(test)^T G^{-1} g_train, G from the autograd reference
    dense = reference_ggn(model, x, y, _poisson_nll, wd)
    wrapper = ModelWrapper(model, Objective(supervised_loss(_poisson_nll), wd))
    g_train, g_test = (
        wrapper.train_grads((x, y)),
        wrapper.per_example_grads(wrapper.objective.per_example_loss, test),
    )
    expected = -g_test @ torch.linalg.solve(dense, g_train.T)
    torch.testing.assert_close(scores["user"], expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(scores["autograd"], expected, rtol=1e-9, atol=1e-11)


def test_calculator_gauss_newton_on_mlp_runs_with_cg_where_the_hessian_needs_damping():
    model = _mlp(width=6)
    x, y = _data("cross_entropy", n=20)
    test = (x[:2], y[:2])
    objective = Objective("cross_entropy", weight_decay=0.01)
    ggn = InfluenceCalculator(
        model,
        objective,
        (x, y),
        ConjugateGradient(rtol=1e-10),
        progress=False,
        curvature="gauss_newton",
    )
    exact = InfluenceCalculator(
        model, objective, (x, y), ExactHessian(), progress=False, curvature="gauss_newton"
    )
    torch.testing.assert_close(ggn.influence(test), exact.influence(test), rtol=1e-7, atol=1e-9)
    with pytest.raises(NotPositiveDefiniteError):
        InfluenceCalculator(model, objective, (x, y), ExactHessian(), progress=False).influence(
            test
        )
