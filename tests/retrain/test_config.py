"""The retraining protocol as one object (RetrainConfig) and the deprecated keywords."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers_gt import make_problem, model_from_theta, newton_fit
from infl import InputError, Objective
from infl.retrain import RetrainConfig, retrain_ground_truth, retrain_subsets


@pytest.fixture(scope="module")
def small():
    X, y, Xt, yt = make_problem(n=20, m=3)
    model = model_from_theta(newton_fit(X.numpy(), y.numpy(), 0.05))
    return model, Objective("bce_with_logits", weight_decay=0.05), (X, y), (Xt, yt)


def test_config_is_frozen_and_fills_in_the_learning_rate():
    cfg = RetrainConfig(optimizer="sgd")
    assert cfg.lr == cfg.learning_rate == 0.1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_steps = 3  # type: ignore[misc]
    assert RetrainConfig(optimizer="adam").learning_rate == 1e-3


def test_protocol_keywords_still_work_with_a_deprecation_warning(small):
    cfg = RetrainConfig(optimizer="sgd", lr=0.5, max_steps=5, grad_tol=None)
    # parallel_runs=1: by default a timed trial picks batched or one-by-one retrains, which
    # agree to round-off only; pinned, the two calls must give the same bits
    new = retrain_ground_truth(*small, [0, 1], config=cfg, parallel_runs=1, progress=False)
    with pytest.warns(DeprecationWarning, match=r"config=infl.RetrainConfig"):
        old = retrain_ground_truth(
            *small,
            [0, 1],
            optimizer="sgd",
            lr=0.5,
            max_steps=5,
            grad_tol=None,
            parallel_runs=1,
            progress=False,
        )
    assert old.config == new.config == cfg
    torch.testing.assert_close(old.raw_change, new.raw_change, atol=0, rtol=0)
    with pytest.warns(DeprecationWarning, match="retrain_subsets"):
        subsets = retrain_subsets(*small, num_subsets=2, grad_tol=1e-8, progress=False)
    assert subsets.ground_truth.config == RetrainConfig(grad_tol=1e-8)


def test_config_and_keywords_together_or_unknown_keywords_are_refused(small):
    with pytest.raises(InputError, match="config= and the protocol keywords max_steps"):
        retrain_ground_truth(*small, [0], config=RetrainConfig(), max_steps=3, progress=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'step_size'"):
        retrain_ground_truth(*small, [0], step_size=3, progress=False)
    with pytest.raises(InputError, match=r"config must be an infl\.RetrainConfig"):
        retrain_ground_truth(*small, [0], config={"max_steps": 3}, progress=False)  # type: ignore[arg-type]
