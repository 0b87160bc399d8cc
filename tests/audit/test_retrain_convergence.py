"""The audit reports retrains that stopped above ``grad_tol`` (it silences the InflWarning)."""

from __future__ import annotations

import time

import pytest
import torch

from infl import Objective
from infl.audit import evidence as ev
from infl.retrain import RetrainConfig
from problems import make_logistic_problem


def _evidence(config: RetrainConfig) -> dict:
    problem = make_logistic_problem()
    predicted = torch.linspace(-1.0, 1.0, len(problem.x), dtype=torch.float64)[None, :]
    section = ev.retraining_evidence(
        problem.model, Objective("bce_with_logits", weight_decay=problem.wd),
        (problem.x, problem.y), (problem.x_test[:1], problem.y_test[:1]), [0], predicted,
        per_point=3, random_per_point=0, deadline=time.perf_counter() + 60.0, seed=0,
        config=config,
    ).section  # fmt: skip
    return {"numbers": section.numbers, "reading": section.reading}


@pytest.mark.filterwarnings("ignore::infl.errors.InflWarning")  # audit() silences them too
def test_retrains_short_of_grad_tol_are_named_in_numbers_and_reading():
    # two SGD steps cannot reach 1e-12: every removal misses; the control run starts at the
    # Newton minimum
    got = _evidence(RetrainConfig(optimizer="sgd", lr=0.01, max_steps=2, grad_tol=1e-12))
    numbers = got["numbers"]
    removed = numbers["removed"]
    assert len(removed) == 3
    assert set(removed) <= set(numbers["unconverged_retrains"])
    assert numbers["grad_tol"] == 1e-12
    assert numbers["max_unconverged_grad_norm"] > 1e-12
    assert "stopped above grad_tol=1e-12" in got["reading"]
    assert "fit_to_minimum" in got["reading"]


def test_converged_retrains_add_nothing_to_the_reading():
    got = _evidence(RetrainConfig(grad_tol=1e-9))
    assert got["numbers"]["unconverged_retrains"] == []
    assert got["numbers"]["max_unconverged_grad_norm"] is None
    assert "grad_tol" not in got["reading"]
