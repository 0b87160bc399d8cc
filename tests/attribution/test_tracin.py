"""TracIn-CP: reduces to grad_dot for one checkpoint, sums checkpoints, refuses bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import reference
from infl import InputError, Objective
from infl.attribution import grad_dot, tracin_cp


def _setup(p):
    return Objective("bce_with_logits", weight_decay=p.wd), (p.x, p.y), (p.x_test, p.y_test)


def test_one_checkpoint_with_lr_one_is_grad_dot(logistic):
    obj, train, test = _setup(logistic)
    torch.testing.assert_close(
        tracin_cp([logistic.model], [1.0], obj, train, test),
        grad_dot(logistic.model, obj, train, test),
        rtol=1e-12,
        atol=1e-14,
    )


def test_checkpoints_are_summed_with_their_learning_rates(logistic):
    obj, train, test = _setup(logistic)
    theta0 = torch.zeros_like(logistic.theta)
    theta0[0] = 0.3
    early = reference.load_into(nn.Linear(4, 1).double().eval(), theta0)
    before = copy.deepcopy(logistic.model.state_dict())
    got = tracin_cp(
        [early.state_dict(), logistic.model], [0.5, 0.2], obj, train, test, model=logistic.model
    )
    expected = 0.5 * grad_dot(early, obj, train, test) + 0.2 * grad_dot(
        logistic.model, obj, train, test
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    # closed form for the early checkpoint's share
    g = reference.per_example_grads(theta0, logistic.x, logistic.y, logistic.wd)
    t = reference.per_example_grads(theta0, logistic.x_test, logistic.y_test, 0.0)
    torch.testing.assert_close(
        got - 0.2 * grad_dot(logistic.model, obj, train, test), -0.5 * t @ g.T
    )
    for k, v in logistic.model.state_dict().items():  # model= is copied, never loaded into
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(
    ("checkpoints", "rates", "words"),
    [
        ([], [], "checkpoints is empty"),
        ("model", [1.0], "must be a list of modules or state_dicts"),
        (["model", "model"], [1.0], "got 1 learning rates for 2 checkpoints"),
        (["model"], [-1.0], "learning rate 0 is -1.0"),
        (["model"], [float("nan")], "must be a finite number > 0"),
        (["sd"], [1.0], "needs an architecture: pass model="),
        ([3], [1.0], "checkpoint 0 is a int"),
    ],
)
def test_bad_checkpoints_and_rates_are_refused(logistic, checkpoints, rates, words):
    obj, train, test = _setup(logistic)
    subst = {"model": logistic.model, "sd": logistic.model.state_dict()}
    cps = (
        subst[checkpoints]
        if isinstance(checkpoints, str)
        else [subst.get(c, c) if isinstance(c, str) else c for c in checkpoints]
    )
    with pytest.raises(InputError, match=words):
        tracin_cp(cps, rates, obj, train, test)


def test_a_state_dict_of_another_architecture_is_refused(logistic):
    obj, train, test = _setup(logistic)
    other = nn.Linear(3, 1).double().state_dict()
    with pytest.raises(InputError, match="checkpoint 0 does not fit model="):
        tracin_cp([other], 1.0, obj, train, test, model=logistic.model)
