"""Evaluations as functions: label flipping, mislabel detection (AUC, AP), group correlation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import reference
from infl import ExactHessian, InfluenceCalculator, InputError, Objective
from infl.evaluation import (
    average_precision,
    flip_labels,
    group_effect_correlation,
    mislabel_detection,
    roc_auc,
)


@pytest.mark.parametrize("seed", range(6))
def test_auc_and_average_precision_agree_with_sklearn_with_ties(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = 50 + 10 * seed
    labels = rng.random(n) < 0.3
    labels[:2] = [True, False]
    scores = rng.integers(0, 6, n).astype(float) + labels  # many ties, informative
    assert roc_auc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores))
    assert average_precision(scores, labels) == pytest.approx(
        metrics.average_precision_score(labels, scores)
    )


def test_auc_and_average_precision_limits():
    mask = np.array([True, True, False, False, False])
    assert roc_auc([5, 4, 3, 2, 1], mask) == 1.0
    assert roc_auc([1, 2, 3, 4, 5], mask) == 0.0
    assert roc_auc(np.ones(5), mask) == 0.5  # all tied: a half for every pair
    assert average_precision([5, 4, 3, 2, 1], mask) == 1.0
    assert average_precision(np.ones(5), mask) == pytest.approx(0.4)  # the positive rate
    result = mislabel_detection(torch.tensor([5.0, 4, 3, 2, 1]), torch.tensor(mask))
    assert (result.auc, result.average_precision, result.num_flipped, result.n) == (1, 1, 2, 5)
    assert result.chance_average_precision == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("scores", "mask", "words"),
    [
        ([1.0, 2.0], [True, False, True], "scores has 2 entries but the mask has 3"),
        ([1.0, 2.0], [False, False], "the mask has 0 positives of 2"),
        ([1.0, 2.0], [True, True], "the mask has 2 positives of 2"),
        ([1.0, float("nan")], [True, False], "NaN or infinite"),
        ([1.0, 2.0], [0.5, 1.0], "the mask must be boolean"),
    ],
)
def test_mislabel_detection_refuses_bad_input(scores, mask, words):
    with pytest.raises(InputError, match=words):
        mislabel_detection(scores, mask)


def test_flip_labels_flips_a_seeded_fraction_to_other_classes():
    y = torch.arange(100) % 4
    original = y.clone()
    flipped, mask = flip_labels(y, 0.2, 4, seed=7)
    assert torch.equal(y, original)  # the input is not modified
    assert int(mask.sum()) == 20
    assert bool((flipped[mask] != y[mask]).all())
    assert torch.equal(flipped[~mask], y[~mask])
    assert int(flipped.min()) >= 0
    assert int(flipped.max()) < 4
    again, mask2 = flip_labels(y.numpy(), 0.2, 4, seed=7)
    assert torch.equal(again, flipped)
    assert torch.equal(mask2, mask)
    assert not torch.equal(flip_labels(y, 0.2, 4, seed=8)[1], mask)
    # every other class is reached
    many, m = flip_labels(torch.zeros(3000, dtype=torch.long), 1.0, 4, seed=0)
    assert set(many[m].tolist()) == {1, 2, 3}


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((torch.tensor([0.0, 1.0]), 0.5, 2), "integer class labels"),
        ((torch.tensor([0, 1]), 1.5, 2), "fraction must be a number in"),
        ((torch.tensor([0, 1]), 0.5, 1), "num_classes must be an integer >= 2"),
        ((torch.tensor([0, 3]), 0.5, 3), "outside 0..2"),
    ],
)
def test_flip_labels_refuses_bad_input(args, words):
    with pytest.raises(InputError, match=words):
        flip_labels(*args)


def test_self_influence_detects_flipped_labels_on_logistic_regression():
    gen = torch.Generator().manual_seed(0)
    n, d = 120, 3
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y_clean = (x @ torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64) > 0).long()
    y_noisy, flipped = flip_labels(y_clean, 0.1, 2, seed=1)
    y = y_noisy.double()
    wd = 0.01
    model = reference.load_into(nn.Linear(d, 1).double(), reference.newton_fit(x, y, wd)).eval()
    calc = InfluenceCalculator(
        model, Objective("bce_with_logits", weight_decay=wd), (x, y), ExactHessian(), progress=False
    )
    result = mislabel_detection(-calc.self_influence(), flipped)
    assert result.auc >= 0.95, result
    assert result.average_precision > 3 * result.chance_average_precision
    # a random ranking does not (the test can fail)
    noise = torch.rand(n, generator=gen, dtype=torch.float64)
    assert mislabel_detection(noise, flipped).auc < 0.8


def test_group_effect_correlation_per_row_and_overall():
    rng = np.random.default_rng(0)
    actual = rng.normal(size=(4, 12))
    predicted = 2 * actual + rng.normal(scale=0.3, size=(4, 12))
    predicted[3] = 1.0  # a constant row: undefined, NaN, left out of the mean
    result = group_effect_correlation(torch.tensor(predicted), actual)
    for j in range(3):
        assert result.pearson[j] == pytest.approx(stats.pearsonr(predicted[j], actual[j])[0])
        assert result.spearman[j] == pytest.approx(stats.spearmanr(predicted[j], actual[j])[0])
    assert math.isnan(result.pearson[3])
    assert math.isnan(result.spearman[3])
    assert result.pearson_mean == pytest.approx(np.mean(result.pearson[:3]))
    assert result.spearman_mean == pytest.approx(np.mean(result.spearman[:3]))
    assert result.pearson_overall == pytest.approx(
        stats.pearsonr(predicted.ravel(), actual.ravel())[0]
    )
    assert result.pearson_mean > 0.9
    flipped = group_effect_correlation(-predicted[:3], actual[:3])
    assert flipped.spearman_mean < -0.9


@pytest.mark.parametrize(
    ("predicted", "actual", "words"),
    [
        (np.zeros((2, 3)), np.zeros((3, 2)), "must both be"),
        (np.zeros((2, 1)), np.zeros((2, 1)), "at least 2 groups"),
        (np.full((2, 3), np.inf), np.zeros((2, 3)), "must be finite"),
    ],
)
def test_group_effect_correlation_refuses_bad_input(predicted, actual, words):
    with pytest.raises(InputError, match=words):
        group_effect_correlation(predicted, actual)
