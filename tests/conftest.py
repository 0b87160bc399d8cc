"""Shared fixtures: small float64 problems with known answers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from problems import LogisticProblem, make_logistic_problem


@pytest.fixture
def logistic() -> LogisticProblem:
    return make_logistic_problem()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
