"""Metrics against scipy, hand-computed cases and invariances (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from infl.errors import InputError
from infl.metrics import (
    fidelity_report,
    kendall,
    linear_datamodeling_score,
    pearson,
    precision_at_k,
    relative_error,
    sign_agreement,
    spearman,
    taylor_gap,
    top_k_indices,
    top_k_overlap,
)


@pytest.mark.parametrize("seed", range(5))
def test_correlations_agree_with_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(4, 7))
    b = a + rng.normal(size=(4, 7))
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a.ravel(), b.ravel())[0], abs=1e-12)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)
    assert kendall(a, b) == pytest.approx(stats.kendalltau(a.ravel(), b.ravel())[0], abs=1e-12)
    # torch inputs (any dtype, requires_grad) give the same numbers
    ta = torch.tensor(a, dtype=torch.float32, requires_grad=True)
    assert pearson(ta, torch.tensor(b)) == pytest.approx(pearson(a.astype(np.float32), b), abs=1e-6)


def test_hand_computed_cases():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)
    # one discordant pair out of C(3,2)=3: tau = (2 - 1) / 3
    assert kendall([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert top_k_overlap([5, -4, 0.1, 0.2], [-3, 6, 1, 0.0], k=2) == 1.0
    assert top_k_overlap([5, 4, 0.1, 0.2], [0, 0.1, 3, 2], k=2) == 0.0
    assert top_k_overlap([5, 4, 0.1, 0.2], [5, 0.1, 3, 2], k=2) == 0.5
    assert top_k_overlap([5, -4, 1], [5, -4, 1], k=2, by="value").__eq__(1.0)
    assert list(top_k_indices([1, -5, 3], 2)) == [1, 2]
    assert list(top_k_indices([1, -5, 3], 2, by="value")) == [2, 0]
    assert list(top_k_indices([1, -5, 3], 1, by="negative")) == [1]
    assert precision_at_k([0.9, 0.1, 0.8, 0.3], [0, 3], k=2) == 0.5
    assert precision_at_k([0.9, 0.1, 0.8, 0.3], np.array([True, False, True, False]), k=2) == 1.0
    assert sign_agreement([1, -1, 2, -3], [2, 1, 0.5, -1]) == 0.75
    assert sign_agreement([1, -1, 2], [2, 1e-9, -0.5], ignore_below=1e-6) == 0.5
    assert relative_error([1, 1], [1, 0]) == pytest.approx(1.0)
    assert relative_error([3, 4], [3, 4]) == 0.0


def test_lds_hand_case():
    # 2 test points, 3 train points, 4 subsets; outputs exactly linear in the removed set
    effect = np.array([[1.0, 2.0, 4.0], [-1.0, 0.0, 1.0]])
    masks = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 0]], dtype=bool)
    outputs = effect @ (~masks).T.astype(float) + 7.0
    assert linear_datamodeling_score(effect, masks, outputs) == pytest.approx(1.0)
    per = linear_datamodeling_score(-effect, masks, outputs, reduce=False)
    np.testing.assert_allclose(per, [-1.0, -1.0])
    # independent recomputation with scipy for random data
    rng = np.random.default_rng(0)
    effect = rng.normal(size=(3, 10))
    masks = rng.uniform(size=(8, 10)) < 0.5
    outputs = rng.normal(size=(3, 8))
    expected = np.mean([stats.spearmanr(effect[j] @ (~masks).T, outputs[j])[0] for j in range(3)])
    assert linear_datamodeling_score(effect, masks, outputs) == pytest.approx(expected)


def test_taylor_gap():
    pred = np.array([1.0, 2.0, 3.0, 4.0])
    gap = taylor_gap(pred, 2 * pred)
    assert gap.pearson == pytest.approx(1.0)
    assert gap.spearman == pytest.approx(1.0)
    assert gap.median_ratio == pytest.approx(2.0)
    with pytest.raises(InputError, match="non-negative"):
        taylor_gap([-1.0, 1.0], [1.0, 1.0])


def test_fidelity_report_keys():
    rep = fidelity_report([1.0, 2.0, 3.0, -1.0], [1.1, 2.2, 2.9, -0.5], k=2)
    assert set(rep) == {
        "pearson",
        "spearman",
        "kendall",
        "sign_agreement",
        "relative_error",
        "top_2_overlap",
    }
    assert rep["sign_agreement"] == 1.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: pearson([1, 2, 3], [1, 2]), "shape"),
        (lambda: spearman(np.ones((2, 3)), np.ones((3, 2))), "shapes must match"),
        (lambda: pearson([1.0], [2.0]), "at least 2"),
        (lambda: pearson([1.0, np.nan], [1.0, 2.0]), "NaN"),
        (lambda: top_k_overlap([1, 2], [1, 2], k=3), "k must be"),
        (lambda: top_k_overlap([1, 2], [1, 2], k=0), "k must be"),
        (lambda: top_k_overlap(np.ones((2, 2)), np.ones((2, 2)), k=1), "1-d"),
        (lambda: top_k_indices([1, 2], 1, by="sideways"), "by must be"),
        (lambda: precision_at_k([1, 2], [5], k=1), "indices in 0..1"),
        (lambda: relative_error([1, 2], [0, 0]), "all zeros"),
        (lambda: sign_agreement([1], [0.0]), "no entry"),
        (
            lambda: linear_datamodeling_score(np.ones((2, 3)), np.ones((4, 3)), np.ones((2, 5))),
            "shapes",
        ),
        (lambda: pearson("abc", [1, 2, 3]), "numeric"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(InputError, match=match):
        call()


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(arrays(np.int64, st.integers(3, 30), elements=st.integers(-1000, 1000), unique=True))
def test_spearman_invariant_under_monotone_transforms(ints):
    x = ints.astype(np.float64)  # well-separated values: the transforms stay strict in floats
    rng = np.random.default_rng(len(x))
    y = rng.normal(size=x.shape)
    base = spearman(x, y)
    # strictly increasing maps preserve ranks; a decreasing one flips the sign
    assert spearman(np.exp(x / 100) * 5 + 1, y) == pytest.approx(base, abs=1e-12)
    assert spearman(x**3, y) == pytest.approx(base, abs=1e-12)
    assert spearman(torch.tensor(np.cbrt(x)), y) == pytest.approx(base, abs=1e-12)
    # Pearson is not rank-based: a non-linear monotone map generally changes it
    assert kendall(np.exp(x / 100), y) == pytest.approx(kendall(x, y), abs=1e-12)
    assert spearman(-x, y) == pytest.approx(-base, abs=1e-12)
    assert spearman(x, x) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, st.integers(2, 25), elements=finite),
    st.data(),
)
def test_top_k_overlap_bounds(x, data):
    n = x.size
    y = data.draw(arrays(np.float64, n, elements=finite))
    k = data.draw(st.integers(1, n))
    value = top_k_overlap(x, y, k)
    assert 0.0 <= value <= 1.0
    assert value * k == pytest.approx(round(value * k))  # a count over k
    assert top_k_overlap(x, x, k) == 1.0
    assert top_k_overlap(x, y, n) == 1.0  # k = n: every index is in both sets
    assert top_k_overlap(x, y, k) == top_k_overlap(y, x, k)  # symmetric
    assert top_k_overlap(x, y, k) == top_k_overlap(3 * x, -y, k)  # |.| ranking: scale, sign
