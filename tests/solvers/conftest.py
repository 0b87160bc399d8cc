"""Fixtures of the solver tests: the float64 logistic-regression Hessian and its dense reference."""

from __future__ import annotations

import pytest
import torch

import reference
from infl import HessianOperator, IndexedData, ModelWrapper, Objective


@pytest.fixture
def hessian_problem(logistic):
    """``(operator, dense H, rhs [4, p])`` for the trained L2 logistic regression."""
    wrapper = ModelWrapper(logistic.model, Objective("bce_with_logits", logistic.wd))
    op = HessianOperator(wrapper, IndexedData((logistic.x, logistic.y)), chunk_size=16)
    dense = reference.hessian(logistic.theta, logistic.x, logistic.y, logistic.wd)
    rhs = torch.randn(4, dense.shape[0], dtype=torch.float64)
    return op, dense, rhs


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype for one test (restored after it); modules opt in with
    ``pytestmark = pytest.mark.usefixtures("float64_default")``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
