"""A logistic-regression audit written once for the tests that only read it."""

from __future__ import annotations

from pathlib import Path

import pytest

from infl import Objective
from infl.audit import AuditReport, audit
from problems import make_logistic_problem


@pytest.fixture(scope="session")
def written_logistic(tmp_path_factory) -> tuple[AuditReport, Path]:
    """An audit of L2 logistic regression (3 points, default solvers), written with figures."""
    problem = make_logistic_problem()
    report = audit(
        problem.model,
        Objective("bce_with_logits", weight_decay=problem.wd),
        (problem.x, problem.y),
        (problem.x_test, problem.y_test),
        num_test=3,
        budget_minutes=2.0,
        progress=False,
    )
    out = tmp_path_factory.mktemp("audit")
    report.write(out)
    return report, out
