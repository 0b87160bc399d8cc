"""``fit_to_minimum`` reaches the minimum of the objective infl's Hessian is of.

The reference is an independent float64 Newton solve with closed-form gradients and Hessians
(``helpers_gt.newton_fit``, numpy only), or, for weight-decay groups, a hand-written Newton
iteration on the grouped objective.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_gt import make_problem, newton_fit, theta_of
from infl import ExactHessian, InfluenceCalculator, Objective
from infl.errors import InflWarning, InputError, ModelStateError, NonFiniteError
from infl.retrain import FitResult, fit_to_minimum
from infl.retrain import fit as fit_module

WD = 0.05


def _linear(d: int = 3, dtype: torch.dtype = torch.float64) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(d, 1).to(dtype)


def _grad_norm(model: nn.Module, objective: Objective, data) -> float:
    """||grad J|| by plain autograd on the whole batch, decay from the objective's groups."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    value = objective.per_example_loss(model, data).mean()
    for p, wd in zip(params, objective.decay_values(names), strict=True):
        value = value + 0.5 * wd * (p * p).sum()
    grads = torch.autograd.grad(value, params)
    return float(torch.cat([g.reshape(-1) for g in grads]).norm())


def test_reaches_grad_tol_at_the_newton_minimum_of_l2_logistic_regression():
    X, y, _, _ = make_problem(n=60, m=1)
    model = _linear()
    objective = Objective("bce_with_logits", weight_decay=WD)
    result = fit_to_minimum(model, objective, (X, y), grad_tol=1e-10)
    assert isinstance(result, FitResult)
    assert result.converged
    assert result.stop == "converged"
    assert result.grad_norm <= 1e-10
    assert 0 < result.iterations <= 1000
    assert _grad_norm(model, objective, (X, y)) <= 1e-10  # what it reports is what is there
    theta = newton_fit(X.numpy(), y.numpy(), WD)
    assert np.allclose(theta_of(model), theta, rtol=0, atol=1e-9)
    z = X @ model.weight.detach().reshape(-1) + model.bias.detach()
    expected = F.binary_cross_entropy_with_logits(z, y) + WD / 2 * sum(
        float((p * p).sum().detach()) for p in model.parameters()
    )
    assert result.value == pytest.approx(float(expected), rel=1e-12)
    assert all(p.grad is None for p in model.parameters())  # leaves no gradients behind


def test_the_calculator_finds_the_fit_stationary():
    X, y, _, _ = make_problem(n=40, m=1)
    model = _linear()
    objective = Objective("bce_with_logits", weight_decay=WD)
    fit_to_minimum(model, objective, (X, y), grad_tol=1e-10)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", InflWarning)  # no "not at a minimum" warning
        calc = InfluenceCalculator(model, objective, (X, y), ExactHessian(), progress=False)
    assert calc.stationarity is not None
    assert calc.stationarity.grad_norm < 1e-9


def _grouped_newton(X: np.ndarray, y: np.ndarray, wd_w: float, wd_b: float) -> np.ndarray:
    """Newton on mean BCE + wd_w/2 |w|^2 + wd_b/2 b^2 (closed form, float64)."""
    A = np.hstack([X, np.ones((len(X), 1))])
    decay = np.array([wd_w] * X.shape[1] + [wd_b])
    theta = np.zeros(A.shape[1])
    for _ in range(50):
        s = 1 / (1 + np.exp(-(A @ theta)))
        g = A.T @ (s - y) / len(y) + decay * theta
        H = (A * (s * (1 - s))[:, None]).T @ A / len(y) + np.diag(decay)
        theta = theta - np.linalg.solve(H, g)
    return theta


def test_weight_decay_groups_are_counted_as_the_objective_says():
    X, y, _, _ = make_problem(n=60, m=1)
    objective = Objective("bce_with_logits", weight_decay={"default": 0.2, "no_decay": ["bias"]})
    model = _linear()
    result = fit_to_minimum(model, objective, (X, y), grad_tol=1e-10)
    assert result.converged
    expected = _grouped_newton(X.numpy(), y.numpy(), 0.2, 0.0)
    assert np.allclose(theta_of(model), expected, rtol=0, atol=1e-9)
    uniform = newton_fit(X.numpy(), y.numpy(), 0.2)  # decaying the bias too: another minimum
    assert np.abs(uniform - expected).max() > 1e-3


def test_frozen_parameters_are_left_alone_and_undecayed():
    X, y, _, _ = make_problem(n=60, m=1)
    model = _linear()
    with torch.no_grad():
        model.bias.fill_(0.3)
    model.bias.requires_grad_(False)
    objective = Objective("bce_with_logits", weight_decay=WD)
    result = fit_to_minimum(model, objective, (X, y), grad_tol=1e-10)
    assert result.converged
    assert float(model.bias) == 0.3
    assert _grad_norm(model, objective, (X, y)) <= 1e-10


def test_an_mlp_from_its_initialisation_converges():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (50,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    objective = Objective("cross_entropy", weight_decay=1e-2)
    result = fit_to_minimum(model, objective, (X, y), grad_tol=1e-8, num_threads=1)
    assert result.converged
    assert _grad_norm(model, objective, (X, y)) <= 1e-8


def test_chunked_evaluation_reaches_the_same_minimum(monkeypatch):
    X, y, _, _ = make_problem(n=50, m=1)
    objective = Objective("bce_with_logits", weight_decay=WD)
    monkeypatch.setattr(fit_module, "EVAL_CHUNK", 7)  # 8 chunks, the last one of 1 example
    model = _linear()
    result = fit_to_minimum(model, objective, (X, y), grad_tol=1e-10)
    assert result.converged
    assert np.allclose(theta_of(model), newton_fit(X.numpy(), y.numpy(), WD), rtol=0, atol=1e-9)


def test_budget_exhausted_is_reported_not_raised():
    X, y, _, _ = make_problem(n=60, m=1)
    model = _linear()
    with pytest.warns(InflWarning, match="raise max_iter"):
        result = fit_to_minimum(
            model, Objective("bce_with_logits", weight_decay=WD), (X, y), grad_tol=1e-12,
            max_iter=2,
        )  # fmt: skip
    assert not result.converged
    assert result.stop == "max_iter"
    assert result.iterations == 2
    assert result.grad_norm > 1e-12


def test_float32_stalls_short_of_an_unreachable_tolerance_and_says_why():
    X, y, _, _ = make_problem(n=60, m=1)
    model = _linear(dtype=torch.float32)
    with pytest.warns(InflWarning, match="float64"):
        result = fit_to_minimum(
            model, Objective("bce_with_logits", weight_decay=WD), (X.float(), y.float()),
            grad_tol=1e-12, max_iter=500,
        )  # fmt: skip
    assert result.stop == "stalled"
    assert not result.converged
    assert result.iterations < 500
    assert result.grad_norm < 1e-4  # it still got close


def test_fits_inside_no_grad():
    X, y, _, _ = make_problem(n=30, m=1)
    model = _linear()
    with torch.no_grad():
        result = fit_to_minimum(model, Objective("bce_with_logits", weight_decay=WD), (X, y))
    assert result.converged
    assert np.allclose(theta_of(model), newton_fit(X.numpy(), y.numpy(), WD), atol=1e-6)


def test_threads_are_restored():
    X, y, _, _ = make_problem(n=20, m=1)
    before = torch.get_num_threads()
    fit_to_minimum(_linear(), Objective("bce_with_logits", weight_decay=WD), (X, y), num_threads=1)
    assert torch.get_num_threads() == before


def _nan_beyond_radius(model, batch):
    x, t = batch
    losses = F.binary_cross_entropy_with_logits(model(x).squeeze(-1), t, reduction="none")
    return torch.where(model.weight.norm() > 3, torch.full_like(losses, float("nan")), losses)


def test_non_finite_objective_is_an_error_naming_the_fix():
    X, _, _, _ = make_problem(n=40, m=1)
    y = (X[:, 0] > 0).double()  # separable, no decay: the weights grow until the loss is NaN
    model = _linear()
    with pytest.raises(NonFiniteError, match="non-finite") as info:
        fit_to_minimum(model, Objective(_nan_beyond_radius), (X, y), grad_tol=1e-10)
    assert "lower lr" in str(info.value)
    assert "float64" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grad_tol": -1.0}, "grad_tol must be a finite number >= 0"),
        ({"grad_tol": float("nan")}, "grad_tol"),
        ({"grad_tol": None}, "grad_tol"),
        ({"max_iter": 0}, "max_iter must be a positive integer"),
        ({"max_iter": 2.5}, "max_iter"),
        ({"max_iter": True}, "max_iter"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"lr": float("inf")}, "lr"),
        ({"num_threads": 0}, "num_threads"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    X, y, _, _ = make_problem(n=10, m=1)
    with pytest.raises(InputError, match=match):
        fit_to_minimum(_linear(), Objective("bce_with_logits"), (X, y), **kwargs)


def test_bad_model_objective_and_data_are_refused():
    X, y, _, _ = make_problem(n=10, m=1)
    objective = Objective("bce_with_logits")
    with pytest.raises(InputError, match=r"torch\.nn\.Module"):
        fit_to_minimum(lambda x: x, objective, (X, y))  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"infl\.Objective"):
        fit_to_minimum(_linear(), "bce_with_logits", (X, y))  # type: ignore[arg-type]
    frozen = _linear().requires_grad_(False)
    with pytest.raises(InputError, match="no trainable parameters"):
        fit_to_minimum(frozen, objective, (X, y))
    with pytest.raises(InputError):
        fit_to_minimum(_linear(), objective, (X, y[:5]))  # mismatched lengths


def test_dropout_in_training_mode_is_refused():
    X, y, _, _ = make_problem(n=10, m=1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)).double()
    with pytest.raises(ModelStateError, match=r"model\.eval\(\)"):
        fit_to_minimum(model, Objective("bce_with_logits"), (X, y))
    result = fit_to_minimum(model.eval(), Objective("bce_with_logits", weight_decay=WD), (X, y))
    assert result.converged
