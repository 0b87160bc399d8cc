"""InfluenceCalculator.group_removal_effect: first/second order against closed forms/retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import reference
from infl import ExactHessian, InfluenceCalculator, InputError, Objective, RetrainConfig
from infl.retrain import retrain_ground_truth
from problems import LogisticProblem


def _logit(model, batch):
    return model(batch[0]).reshape(-1)


def _calc(p: LogisticProblem, **kw) -> InfluenceCalculator:
    return InfluenceCalculator(
        p.model, Objective("bce_with_logits", p.wd), (p.x, p.y), ExactHessian(), progress=False,
        **kw,
    )  # fmt: skip


def test_first_order_is_the_sum_of_the_members_removal_effects(logistic):
    calc = _calc(logistic)
    test = (logistic.x_test, logistic.y_test)
    groups = [[0, 1, 2], [7], list(range(10, 30))]
    got = calc.group_removal_effect(test, groups)
    single = calc.removal_effect(test)
    expected = torch.stack([single[:, g].sum(dim=1) for g in groups], dim=1)
    assert got.shape == (len(logistic.y_test), 3)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


# -- least squares: the objective is quadratic, so everything is closed form --------------------
@pytest.fixture
def least_squares():
    gen = torch.Generator().manual_seed(3)
    n, d, wd = 40, 3, 0.1
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(
        n, generator=gen, dtype=torch.float64
    )
    xt = reference.augment(x)
    # infl's mse is sum (f - y)^2 (no 1/2): J = (1/n)|X theta - y|^2 + (wd/2)|theta|^2
    hess = 2 * xt.T @ xt / n + wd * torch.eye(d + 1, dtype=torch.float64)
    theta = torch.linalg.solve(hess, 2 * xt.T @ y / n)
    model = nn.Linear(d, 1).double()
    reference.load_into(model, theta)
    return {"x": x, "y": y, "xt": xt, "wd": wd, "hess": hess, "theta": theta, "model": model}


def test_second_order_is_the_two_term_neumann_series_on_least_squares(least_squares):
    ls = least_squares
    x, y, xt, wd, hess, theta = ls["x"], ls["y"], ls["xt"], ls["wd"], ls["hess"], ls["theta"]
    n = len(y)
    calc = InfluenceCalculator(
        ls["model"], Objective("mse", wd), (x, y[:, None]), ExactHessian(), measurement=_logit,
        progress=False,
    )  # fmt: skip
    test = (x[:5], y[:5, None])
    grads = 2 * (xt @ theta - y)[:, None] * xt + wd * theta  # g_i
    ratios = []
    for group in (list(range(0, 24, 2)), [0, 2, 4]):  # p = 0.3 and 0.075
        first, second = (calc.group_removal_effect(test, [group], order=k)[:, 0] for k in (1, 2))
        s = grads[group].sum(0)
        h_group = 2 * xt[group].T @ xt[group] / len(group) + wd * torch.eye(4, dtype=x.dtype)
        step = torch.linalg.solve(hess, s / n)
        by_hand = xt[:5] @ (step + len(group) / n * torch.linalg.solve(hess, h_group @ step))
        assert reference.rel_err(second, by_hand) < 1e-10
        assert reference.rel_err(first, xt[:5] @ step) < 1e-10
        # exact removal (quadratic objective): Delta = (H - p H_U)^{-1} s / n
        exact = xt[:5] @ torch.linalg.solve(hess - len(group) / n * h_group, s / n)
        err1, err2 = reference.rel_err(first, exact), reference.rel_err(second, exact)
        assert err2 < err1
        ratios.append(err2 / err1)
    # order 1 is off by O(p), order 2 by O(p^2) (relative): their ratio shrinks with p
    assert ratios[1] < 0.5 * ratios[0], ratios


def test_second_order_is_closer_to_retraining_for_a_large_one_class_group(logistic):
    # 30% of the data, all from class 1: the group carries its own share of the curvature
    p = logistic
    n = len(p.y)
    ones = torch.nonzero(p.y == 1).reshape(-1)
    group = ones[: int(0.3 * n)].tolist()
    assert len(group) == 18
    groups = [group, ones[-10:].tolist()]
    test = (p.x_test, p.y_test)
    calc = _calc(p, measurement=_logit)
    first = calc.group_removal_effect(test, groups, order=1)
    second = calc.group_removal_effect(test, groups, order=2)
    truth = retrain_ground_truth(
        p.model, Objective("bce_with_logits", p.wd), (p.x, p.y), test, groups,
        config=RetrainConfig(grad_tol=1e-10), measurement=_logit, progress=False,
        num_threads=1,
    ).raw_change  # fmt: skip
    for g in range(len(groups)):
        err1 = reference.rel_err(first[:, g], truth[:, g])
        err2 = reference.rel_err(second[:, g], truth[:, g])
        print(f"group {g} ({len(groups[g])} of {n}): first-order error {err1:.4f}, "
              f"second-order error {err2:.4f}")  # fmt: skip
        assert err2 < err1


def test_gauss_newton_curvature_equals_the_hessian_on_a_linear_model(logistic):
    test = (logistic.x_test, logistic.y_test)
    groups = [list(range(15)), [20, 30, 40]]
    hess = _calc(logistic).group_removal_effect(test, groups, order=2)
    ggn = _calc(logistic, curvature="gauss_newton").group_removal_effect(test, groups, order=2)
    torch.testing.assert_close(ggn, hess, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(hess, _calc(logistic).group_removal_effect(test, groups))


def test_a_label_array_equals_the_explicit_groups(logistic):
    calc = _calc(logistic)
    test = (logistic.x_test, logistic.y_test)
    labels = torch.arange(60) % 3 * 10 + 5  # labels 5, 15, 25
    explicit = [list(range(k, 60, 3)) for k in range(3)]
    for order in (1, 2):
        want = calc.group_removal_effect(test, explicit, order=order)
        for form in (labels, labels.numpy(), labels.tolist(), np.array(["b", "c", "d"] * 20)):
            got = calc.group_removal_effect(test, form, order=order)
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("groups", "match"),
    [
        ([[0, 1], []], "group 1 is empty"),
        ([[0, 60]], r"group 0 contains index 60, out of range for 60 .*0\.\.59"),
        ([[0, -1]], "group 0 contains index -1, out of range"),
        ([[0, 1.5]], "group 0 contains 1.5, which is not an integer index"),
        ([[3, 4, 3]], "group 0 lists index 3 more than once"),
        ([list(range(60))], "group 0 holds all 60 training examples"),
        (torch.zeros(59, dtype=torch.long), "length n=60; got length 59"),
        ([0, 1, 2], r"length n=60; got length 3.*\[\[i, j, \.\.\.\]\]"),
        (torch.zeros(3, 20, dtype=torch.long), r"label array of shape \[n=60\], got shape"),
        (torch.zeros(60, dtype=torch.long), "one label .* for all 60 examples"),
        ([], "groups is empty"),
        ([[0, 1], 5], "group 1 is 5; every group must be a list"),
        ("abc", "groups must be a list of index lists or a label array"),
    ],
)
def test_bad_groups_are_refused_by_name(logistic, groups, match):
    calc = _calc(logistic)
    with pytest.raises(InputError, match=match):
        calc.group_removal_effect((logistic.x_test, logistic.y_test), groups)


@pytest.mark.parametrize("order", [0, 3, True, "2"])
def test_bad_order_is_refused(logistic, order):
    with pytest.raises(InputError, match="order must be 1 or 2"):
        _calc(logistic).group_removal_effect((logistic.x_test, logistic.y_test), [[0]], order=order)
