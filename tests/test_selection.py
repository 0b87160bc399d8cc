"""Selection helpers: test points by loss, training points by influence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infl.errors import InputError
from infl.selection import (
    at_influence_percentile,
    at_loss_percentile,
    highest_loss,
    top_k_influence,
)


def test_loss_selection():
    losses = torch.tensor([0.3, 2.0, 0.1, 0.7, 1.1])
    assert highest_loss(losses) == 1
    assert at_loss_percentile(losses, 100) == 1
    assert at_loss_percentile(losses, 0) == 2
    assert at_loss_percentile(losses, 50) == 3  # sorted: .1 .3 .7 1.1 2.0 -> median .7
    assert at_loss_percentile(np.array([5.0]), 30) == 0


def test_influence_selection():
    scores = np.array([0.5, -3.0, 0.05, 2.0, -0.2, 1.0, 0.0, -0.7, 0.3, 0.1])
    np.testing.assert_array_equal(top_k_influence(scores, 3), [1, 3, 5])
    np.testing.assert_array_equal(top_k_influence(scores, 2, by="negative"), [1, 7])
    # |scores| ascending: 0.0(6) .05(2) .1(9) .2(4) .3(8) .5(0) .7(7) 1(5) 2(3) 3(1)
    np.testing.assert_array_equal(at_influence_percentile(scores, 30, k=1), [4])  # rank round(2.7)
    np.testing.assert_array_equal(at_influence_percentile(scores, 30, k=3), [9, 4, 8])
    np.testing.assert_array_equal(at_influence_percentile(scores, 100, k=3), [5, 3, 1])
    np.testing.assert_array_equal(at_influence_percentile(scores, 0, k=2), [6, 2])
    # the 30th-percentile window really sits around the 30th percentile of |influence|
    rng = np.random.default_rng(0)
    big = rng.standard_cauchy(1000)
    picked = np.abs(big[at_influence_percentile(big, 30, k=100)])
    q25, q35 = np.percentile(np.abs(big), [25, 35])
    assert q25 <= picked.min()
    assert picked.max() <= q35


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: highest_loss([]), "non-empty 1-d"),
        (lambda: at_loss_percentile([1.0, 2.0], 101), "percentile"),
        (lambda: at_loss_percentile([1.0, np.nan], 50), "NaN"),
        (lambda: top_k_influence([1.0, 2.0], 3), "k must be"),
        (lambda: at_influence_percentile([1.0, 2.0], 30, k=3), "k must be"),
        (lambda: at_influence_percentile(np.ones((2, 2)), 30), "1-d"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(InputError, match=match):
        call()
