"""InfluenceCalculator: closed forms, leave-one-out retraining, invariances."""

from __future__ import annotations

import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import reference
from infl import (
    Arnoldi,
    ConjugateGradient,
    ExactHessian,
    InfluenceCalculator,
    InputError,
    LiSSA,
    Objective,
    logit_measurement,
)
from problems import make_logistic_problem


def _calc(problem, solver=None, **kwargs):
    return InfluenceCalculator(
        problem.model,
        Objective("bce_with_logits", weight_decay=problem.wd),
        (problem.x, problem.y),
        solver or ExactHessian(),
        progress=False,
        **kwargs,
    )


def test_influence_equals_closed_form(logistic):
    p = logistic
    calc = _calc(p)
    hess = reference.hessian(p.theta, p.x, p.y, p.wd)
    g_train = reference.per_example_grads(p.theta, p.x, p.y, p.wd)
    g_test = reference.per_example_grads(p.theta, p.x_test, p.y_test, 0.0)
    expected = -g_test @ torch.linalg.solve(hess, g_train.T)
    scores = calc.influence((p.x_test, p.y_test))
    assert scores.shape == (p.x_test.shape[0], p.x.shape[0])
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(calc.removal_effect((p.x_test, p.y_test)), -expected / p.x.shape[0])


def test_removal_effect_matches_leave_one_out_newton_refit():
    p = make_logistic_problem(n=60, wd=0.05, seed=2)
    test = (p.x_test[:3], p.y_test[:3])
    predicted = _calc(p).removal_effect(test)
    base = reference.per_example_loss(p.theta, *test)
    actual = torch.empty_like(predicted)
    for i in range(p.x.shape[0]):
        keep = torch.arange(p.x.shape[0]) != i
        theta_i = reference.newton_fit(p.x[keep], p.y[keep], p.wd, theta0=p.theta)
        actual[:, i] = reference.per_example_loss(theta_i, *test) - base
    for j in range(3):
        pearson = stats.pearsonr(predicted[j].numpy(), actual[j].numpy()).statistic
        spearman = stats.spearmanr(predicted[j].numpy(), actual[j].numpy()).statistic
        assert pearson >= 0.99, (j, pearson)
        assert spearman >= 0.99, (j, spearman)
    # first order: errors are small relative to the effects themselves
    assert float((predicted - actual).abs().max()) < 0.1 * float(actual.abs().max())


def test_param_change_matches_newton_refit():
    # the first-order error is the leverage term H_i/n, so use enough points for it to be small
    p = make_logistic_problem(n=200, wd=0.1, seed=3)
    predicted = _calc(p).param_change([0, 5, 7])
    for row, i in zip(predicted, [0, 5, 7], strict=True):
        keep = torch.arange(200) != i
        actual = reference.newton_fit(p.x[keep], p.y[keep], p.wd, theta0=p.theta) - p.theta
        assert float((row - actual).norm() / actual.norm()) < 0.05


@pytest.mark.parametrize("solver", [ConjugateGradient(rtol=1e-10), LiSSA(depth=5000, rtol=1e-9)])
def test_iterative_solvers_give_the_exact_scores(logistic, solver):
    test = (logistic.x_test, logistic.y_test)
    exact = _calc(logistic).influence(test)
    torch.testing.assert_close(_calc(logistic, solver).influence(test), exact, rtol=1e-5, atol=1e-7)


def test_self_influence_is_the_diagonal_of_pairwise_influence(logistic):
    calc = _calc(logistic)
    train = (logistic.x, logistic.y)
    torch.testing.assert_close(calc.self_influence(), torch.diagonal(calc.influence(train)))
    torch.testing.assert_close(calc.self_influence([3, 1]), calc.self_influence()[[3, 1]])


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_scores_do_not_depend_on_chunk_size_or_caching(logistic, chunk_size):
    test = (logistic.x_test, logistic.y_test)
    reference_scores = _calc(logistic, chunk_size=16).influence(test)
    streamed = _calc(logistic, chunk_size=chunk_size, cache_bytes=0)
    torch.testing.assert_close(streamed.influence(test), reference_scores)
    torch.testing.assert_close(streamed.influence(test), reference_scores)  # second, streamed again
    assert streamed._grad_cache.value is None
    cached = _calc(logistic, chunk_size=chunk_size)
    cached.train_grads()  # forms [n, p] and keeps it (an nn.Linear model's scoring never does)
    assert cached._grad_cache.value is not None
    torch.testing.assert_close(cached.influence(test), reference_scores)


def test_data_given_as_loader_or_dataset_gives_the_same_scores(logistic):
    test = (logistic.x_test, logistic.y_test)
    expected = _calc(logistic).influence(test)
    obj = Objective("bce_with_logits", weight_decay=logistic.wd)
    for data in (
        TensorDataset(logistic.x, logistic.y),
        DataLoader(TensorDataset(logistic.x, logistic.y), batch_size=9),
    ):
        calc = InfluenceCalculator(logistic.model, obj, data, ExactHessian(), progress=False)
        torch.testing.assert_close(calc.influence(TensorDataset(*test)), expected)


def test_inverse_hvps_of_a_test_batch_are_computed_once(logistic):
    calc = _calc(logistic, ConjugateGradient())
    test = (logistic.x_test, logistic.y_test)
    calc.influence(test)
    used = calc.operator.num_matvecs
    calc.removal_effect(test)
    calc.top_k(test, 3)
    assert calc.operator.num_matvecs == used
    calc.influence((logistic.x_test[:2].clone(), logistic.y_test[:2].clone()))
    assert calc.operator.num_matvecs > used


def test_top_k_orders_by_the_requested_key(logistic):
    calc = _calc(logistic)
    test = (logistic.x_test[:2], logistic.y_test[:2])
    scores = calc.influence(test)
    idx, vals = calc.top_k(test, 5, by="helpful")
    torch.testing.assert_close(vals, scores.sort(dim=1).values[:, :5])
    idx, vals = calc.top_k(test, 5, by="abs")
    torch.testing.assert_close(vals.abs(), scores.abs().sort(dim=1, descending=True).values[:, :5])
    torch.testing.assert_close(scores.gather(1, idx), vals)


def test_custom_measurement_uses_its_own_gradient(logistic):
    p = logistic
    measure = lambda model, batch: model(batch[0]).squeeze(1)  # noqa: E731 - the logit
    calc = _calc(p, measurement=measure)
    hess = reference.hessian(p.theta, p.x, p.y, p.wd)
    g_train = reference.per_example_grads(p.theta, p.x, p.y, p.wd)
    logit_grads = reference.augment(p.x_test)
    expected = -logit_grads @ torch.linalg.solve(hess, g_train.T)
    torch.testing.assert_close(calc.influence((p.x_test, p.y_test)), expected)


def test_logit_measurement_on_a_classifier_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    calc = InfluenceCalculator(
        model,
        Objective(weight_decay=0.1),
        (x, y),
        ConjugateGradient(damping=1.0),
        measurement=logit_measurement(),
        progress=False,
    )
    scores = calc.influence((x[:2], y[:2]))
    assert scores.dtype == torch.float32
    assert scores.shape == (2, 30)
    assert torch.isfinite(scores).all()


def test_with_damping_reuses_the_eigendecomposition_and_the_train_gradients(logistic):
    test = (logistic.x_test, logistic.y_test)
    calc = _calc(logistic, ExactHessian(damping=0.01))
    calc.influence(test)
    calc.train_grads()  # keep [n, p]: an nn.Linear model's scoring does not form it
    hvps, grads_cache = calc.operator.num_matvecs, calc._grad_cache.value
    assert grads_cache is not None
    stiffer = calc.with_damping(0.3)
    scores = stiffer.influence(test)
    assert calc.operator.num_matvecs == hvps  # no new HVP: eigenpairs reused
    assert stiffer._grad_cache.value is grads_cache  # train gradients not recomputed
    fresh = _calc(logistic, ExactHessian(damping=0.3)).influence(test)
    torch.testing.assert_close(scores, fresh)
    assert stiffer.solver == ExactHessian(damping=0.3)
    assert calc.solver == ExactHessian(damping=0.01)  # the original is unchanged
    torch.testing.assert_close(
        calc.influence(test), _calc(logistic, ExactHessian(damping=0.01)).influence(test)
    )


def test_with_solver_shares_gradients_and_gives_that_solvers_scores(logistic):
    test = (logistic.x_test, logistic.y_test)
    calc = _calc(logistic, ExactHessian(damping=0.05))
    calc.influence(test)
    cg = calc.with_solver(ConjugateGradient(damping=0.05, rtol=1e-12))
    assert cg._grad_cache is calc._grad_cache
    torch.testing.assert_close(cg.influence(test), calc.influence(test), rtol=1e-8, atol=1e-10)
    with pytest.raises(InputError, match="solver must be an infl solver"):
        calc.with_solver("cg")


# ---------------------------------------------------------------- low-rank (Arnoldi) scoring


def test_low_rank_scores_equal_the_dense_low_rank_formula_without_a_solve(logistic):
    p = logistic
    test = (p.x_test, p.y_test)
    calc = _calc(p, Arnoldi(rank=3, damping=0.1))
    scores = calc.influence(test)
    basis, weights = calc.fitted_solver().low_rank()
    g_train = reference.per_example_grads(p.theta, p.x, p.y, p.wd)
    g_test = reference.per_example_grads(p.theta, p.x_test, p.y_test, 0.0)
    inverse = basis.T @ torch.diag(weights) @ basis  # A^-1 restricted to the top-3 eigenpairs
    torch.testing.assert_close(scores, -(g_test @ inverse @ g_train.T))
    # the cache holds the [n, r] projection, never the [n, p] gradients
    assert calc._grad_cache.value is None
    [(key, proj)] = calc._grad_cache.projections
    assert key is basis
    assert proj.shape == (p.x.shape[0], 3)
    # a second test batch: its test gradients and a matrix product, no HVP and no solve
    hvps = calc.operator.num_matvecs
    other = (p.x[:4], p.y[:4])
    second = calc.influence(other)
    assert calc.operator.num_matvecs == hvps
    assert len(calc._grad_cache.projections) == 1
    g_other = reference.per_example_grads(p.theta, p.x[:4], p.y[:4], 0.0)
    torch.testing.assert_close(second, -(g_other @ inverse @ g_train.T))
    # removal effects, top-k and self-influence take the same path
    torch.testing.assert_close(calc.removal_effect(other), -second / p.x.shape[0])
    idx, top = calc.top_k(other, 5)
    torch.testing.assert_close(top, second.gather(1, idx))
    # self-influence: the measurement is the training loss without weight decay
    g_self = reference.per_example_grads(p.theta, p.x, p.y, 0.0)
    expected_self = -((g_self @ inverse) * g_train).sum(dim=1)
    torch.testing.assert_close(calc.self_influence(), expected_self)
    torch.testing.assert_close(calc.self_influence([2, 7]), expected_self[[2, 7]])
    assert calc.operator.num_matvecs == hvps


def test_low_rank_with_damping_reuses_the_projection(logistic):
    test = (logistic.x_test, logistic.y_test)
    calc = _calc(logistic, Arnoldi(rank=2, damping=0.1))
    calc.influence(test)
    hvps = calc.operator.num_matvecs
    [(basis, proj)] = calc._grad_cache.projections
    stiffer = calc.with_damping(0.6)
    scores = stiffer.influence(test)
    assert calc.operator.num_matvecs == hvps  # no Lanczos, no HVP
    assert stiffer._grad_cache.projection(basis) is proj  # projection shared, not recomputed
    assert stiffer.fitted_solver().low_rank()[0] is basis
    fresh = _calc(logistic, Arnoldi(rank=2, damping=0.6)).influence(test)
    torch.testing.assert_close(scores, fresh)


def test_full_rank_arnoldi_scores_equal_the_exact_scores(logistic):
    test = (logistic.x_test, logistic.y_test)
    exact = _calc(logistic, ExactHessian(damping=0.05)).influence(test)
    low_rank = _calc(logistic, Arnoldi(rank=5, damping=0.05)).influence(test)
    complement = _calc(logistic, Arnoldi(rank=3, damping=0.05, complement=True))
    torch.testing.assert_close(low_rank, exact, rtol=1e-8, atol=1e-10)
    # with the complement the inverse is not low-rank: the ordinary solve path
    assert complement.fitted_solver().low_rank() is None
    ihvp = complement.inverse_hvp(test).value
    g_train = complement.train_grads()
    torch.testing.assert_close(complement.influence(test), -(ihvp @ g_train.T))


# ---------------------------------------------------------------- is the model at a minimum?
def _minimum_calc(problem, wd, **kwargs):
    import warnings

    from infl import InflWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calc = InfluenceCalculator(
            problem.model,
            Objective("bce_with_logits", weight_decay=wd),
            (problem.x, problem.y),
            ExactHessian(),
            progress=False,
            **kwargs,
        )
    return calc, [str(w.message) for w in caught if issubclass(w.category, InflWarning)]


def test_converged_model_passes_the_minimum_check_from_one_pass(logistic):
    calc, warned = _minimum_calc(logistic, logistic.wd)
    assert warned == []
    s = calc.stationarity
    assert s.is_minimum
    assert s.drift_ratio < 1e-6
    # the numbers: grad J = mean of the training gradients, scale = their RMS norm
    g = reference.per_example_grads(logistic.theta, logistic.x, logistic.y, logistic.wd)
    assert s.grad_norm == pytest.approx(float(g.mean(dim=0).norm()), abs=1e-12)
    assert s.grad_scale == pytest.approx(float(g.pow(2).sum(dim=1).mean().sqrt()))
    # an nn.Linear model: the sums come from its layer's inputs and output gradients, and
    # [n, p] is neither formed nor cached (its scoring does not need it)
    assert calc._grad_cache.value is None


def test_unconverged_model_warns_with_what_it_does_to_the_scores(logistic):
    import dataclasses

    model = nn.Linear(4, 1).double()
    with torch.no_grad():
        model.weight.copy_(logistic.theta[:4].reshape(1, 4) * 0.5)  # halfway to the minimum
        model.bias.copy_(logistic.theta[4:])
    problem = dataclasses.replace(logistic, model=model)
    calc, warned = _minimum_calc(problem, logistic.wd)
    assert not calc.stationarity.is_minimum
    [message] = warned
    for words in ("not at a minimum", "drift", "Retrain longer", "weight_decay",
                  "control-corrected", "check_minimum=False"):  # fmt: skip
        assert words in message
    assert "looks trained with weight_decay" not in message  # not a weight-decay mix-up
    off, none = _minimum_calc(problem, logistic.wd, check_minimum=False)
    assert none == []
    assert off.stationarity is None


def test_converged_model_checked_with_the_wrong_weight_decay_warns(logistic):
    calc, warned = _minimum_calc(logistic, 0.5)
    [message] = warned
    assert "not at a minimum" in message
    assert "looks trained with weight_decay ~ 0.05" in message
    assert calc.stationarity.wrong_weight_decay
    assert calc.stationarity.implied_weight_decay == pytest.approx(logistic.wd, rel=1e-6)


# ---------------------------------------------------------------- spectrum, advice, damping="auto"


def test_calc_spectrum_on_logistic_regression_equals_the_dense_eigenvalues(logistic):
    p = logistic
    calc = _calc(p, check_minimum=False)
    spectrum = calc.spectrum(k=3)
    dense = torch.linalg.eigvalsh(reference.hessian(p.theta, p.x, p.y, p.wd))
    assert spectrum.full
    torch.testing.assert_close(spectrum.eigenvalues.to(dense), dense)
    assert spectrum.lambda_min == pytest.approx(float(dense[0]))


def test_calc_advise_equals_diagnostics_advise_on_the_calculators_operator(logistic):
    from infl.diagnostics import advise

    calc = _calc(logistic, ConjugateGradient(), check_minimum=False)
    assert calc.advise(tol=1e-4) == advise(calc.operator, tol=1e-4)
    assert calc.advise(damping=0.3) == advise(calc.operator, damping=0.3)


def test_calc_advise_uses_the_gauss_newton_operator_when_asked(logistic):
    from infl.diagnostics import advise
    from infl.operators import GaussNewtonOperator

    calc = _calc(logistic, ConjugateGradient(), check_minimum=False, curvature="gauss_newton")
    assert isinstance(calc.operator, GaussNewtonOperator)
    assert calc.advise() == advise(calc.operator)


def test_auto_damping_through_the_calculator_resolves_to_a_number(logistic):
    calc = _calc(logistic, ExactHessian(damping="auto"), check_minimum=False)
    fitted = calc.fitted_solver()
    assert isinstance(fitted.damping, float)
    assert fitted.info["damping_auto"]
    explicit = calc.with_damping(0.5)  # reuses the eigendecomposition
    assert explicit.fitted_solver() is not fitted
    assert explicit.fitted_solver().damping == 0.5
    again = explicit.with_damping("auto")
    assert again.solver.damping == "auto"
    assert again.fitted_solver().damping == fitted.damping
    with pytest.raises(InputError, match=r"got 'automatic'.*damping='auto'"):
        calc.with_damping("automatic")
    with pytest.raises(InputError, match=r">= 0 or 'auto', got -1"):
        calc.with_damping(-1.0)
