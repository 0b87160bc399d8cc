"""grad_dot / grad_cosine against closed-form logistic-regression gradients (float64)."""

from __future__ import annotations

import copy

import pytest
import torch

import reference
from infl import InputError, Objective
from infl.attribution import grad_cosine, grad_dot


def _objective(p):
    return Objective("bce_with_logits", weight_decay=p.wd)


def _closed_form(p):
    train = reference.per_example_grads(p.theta, p.x, p.y, p.wd)  # g_i, weight decay included
    test = reference.per_example_grads(p.theta, p.x_test, p.y_test, 0.0)  # loss gradients
    return test, train


def test_grad_dot_is_minus_test_times_train_gradients(logistic):
    t, g = _closed_form(logistic)
    got = grad_dot(
        logistic.model,
        _objective(logistic),
        (logistic.x, logistic.y),
        (logistic.x_test, logistic.y_test),
    )
    assert got.shape == (10, 60)
    torch.testing.assert_close(got, -(t @ g.T), rtol=1e-10, atol=1e-12)


def test_grad_cosine_is_the_normalised_dot_product(logistic):
    t, g = _closed_form(logistic)
    got = grad_cosine(
        logistic.model,
        _objective(logistic),
        (logistic.x, logistic.y),
        (logistic.x_test, logistic.y_test),
    )
    expected = -(t @ g.T) / (t.norm(dim=1)[:, None] * g.norm(dim=1)[None, :])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert got.min() >= -1.0
    assert got.max() <= 1.0
    assert got.min() < -0.5  # the range is used, not a constant
    assert got.max() > 0.5


def test_cosine_is_scale_invariant_and_dot_is_not(logistic):
    obj = _objective(logistic)
    train, test = (logistic.x, logistic.y), (logistic.x_test, logistic.y_test)

    def tripled(model, batch):
        return 3.0 * obj.per_example_loss(model, batch)

    dot1 = grad_dot(logistic.model, obj, train, test)
    dot3 = grad_dot(logistic.model, obj, train, test, measurement=tripled)
    torch.testing.assert_close(dot3, 3 * dot1)
    cos1 = grad_cosine(logistic.model, obj, train, test)
    cos3 = grad_cosine(logistic.model, obj, train, test, measurement=tripled)
    torch.testing.assert_close(cos3, cos1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [grad_dot, grad_cosine])
def test_results_do_not_depend_on_chunk_size_and_model_is_untouched(logistic, fn):
    before = copy.deepcopy(logistic.model.state_dict())
    args = (
        logistic.model,
        _objective(logistic),
        (logistic.x, logistic.y),
        (logistic.x_test, logistic.y_test),
    )
    torch.testing.assert_close(fn(*args, chunk_size=7), fn(*args, chunk_size=1000))
    for k, v in logistic.model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"chunk_size": 0}, "chunk_size must be a positive integer"),
        ({"objective": "bce"}, "objective must be an infl.Objective"),
    ],
)
def test_bad_arguments_are_refused(logistic, kwargs, words):
    args = {
        "model": logistic.model,
        "objective": _objective(logistic),
        "train": (logistic.x, logistic.y),
        "test": (logistic.x_test, logistic.y_test),
    }
    chunk = {k: v for k, v in kwargs.items() if k == "chunk_size"}
    args.update({k: v for k, v in kwargs.items() if k != "chunk_size"})
    with pytest.raises(InputError, match=words):
        grad_dot(**args, **chunk)
