"""Every estimator agrees with the calculator's sign where the answer is known.

A training example that duplicates the test point is helpful to it (up-weighting it lowers
the test loss), so every estimator must give it a negative score, as influence does.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference
from infl import ExactHessian, InfluenceCalculator, Objective
from infl.attribution import grad_cosine, grad_dot, random_projection, tracin_cp


@pytest.fixture
def duplicated():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(40, generator=gen, dtype=torch.float64) > 0).double()
    # the test point: a misfit-ish example, its exact copy is training example 40
    x_test, y_test = torch.tensor([[-0.4, 0.2, 1.0]], dtype=torch.float64), torch.ones(1).double()
    x, y = torch.cat([x, x_test]), torch.cat([y, y_test])
    wd = 0.05
    model = reference.load_into(nn.Linear(3, 1).double(), reference.newton_fit(x, y, wd)).eval()
    return model, Objective("bce_with_logits", weight_decay=wd), (x, y), (x_test, y_test)


ESTIMATORS = {
    "influence": lambda m, o, tr, te: InfluenceCalculator(
        m, o, tr, ExactHessian(), progress=False
    ).influence(te),
    "grad_dot": grad_dot,
    "grad_cosine": grad_cosine,
    "tracin_cp": lambda m, o, tr, te: tracin_cp([m], [0.1], o, tr, te),
    "random_projection": lambda m, o, tr, te: random_projection(
        m, o, tr, te, dim=16, damping=1e-3, seed=0
    ),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_a_copy_of_the_test_point_is_helpful(duplicated, name):
    scores = ESTIMATORS[name](*duplicated)
    assert scores.shape == (1, 41)
    assert scores[0, 40] < 0, f"{name}: the duplicate scored {float(scores[0, 40])}"
    # and it is among the most helpful examples
    assert int((scores[0] < scores[0, 40]).sum()) <= 3, name


def test_the_baselines_rank_like_influence_on_a_convex_model(duplicated):
    model, obj, train, _ = duplicated
    x, y = train
    tests = (x[:10], y[:10])
    influence = InfluenceCalculator(model, obj, train, ExactHessian(), progress=False).influence(
        tests
    )
    for fn in (grad_dot, grad_cosine):
        scores = fn(model, obj, train, tests)
        agree = (torch.sign(scores) == torch.sign(influence)).double().mean()
        assert agree > 0.8, (fn.__name__, float(agree))
