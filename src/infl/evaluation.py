"""Evaluations of attribution scores as pure functions: mislabel detection, group effects.

Pure functions on arrays and tensors; nothing here imports the calculator or the model, so
any estimator (influence, :mod:`infl.attribution`, or someone else's) is judged the same way.
The linear datamodeling score lives in :func:`infl.metrics.linear_datamodeling_score`.

* :func:`flip_labels` corrupts a seeded fraction of the labels and says which;
* :func:`mislabel_detection` scores a suspicion ranking against the flipped mask (ROC AUC and
  average precision, ties handled);
* :func:`group_effect_correlation` compares predicted and actual effects of removing groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from infl.errors import InputError
from infl.metrics import as_numpy, pearson, spearman

ArrayLike = Any

__all__ = [
    "GroupCorrelation",
    "MislabelDetection",
    "average_precision",
    "flip_labels",
    "group_effect_correlation",
    "mislabel_detection",
    "roc_auc",
]


def flip_labels(
    y: ArrayLike, fraction: float, num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip a seeded ``fraction`` of class labels to another class, uniformly at random.

    Exactly :math:`\\operatorname{round}(\\text{fraction}\\cdot n)` examples, drawn without
    replacement, get a label drawn uniformly from the ``num_classes - 1`` *other* classes
    (every flipped label differs from the original). The input is not modified.

    Parameters
    ----------
    y
        ``[n]`` integer class labels in ``0 .. num_classes - 1`` (tensor or array).
    fraction
        In ``[0, 1]``.
    num_classes
        :math:`C \\ge 2`.
    seed
        Seeds which examples flip and to what (same seed, same flips).

    Returns
    -------
    flipped, mask
        ``[n]`` ``int64`` labels and the ``[n]`` ``bool`` mask of flipped examples.

    Examples
    --------
    >>> import torch
    >>> y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    >>> y2, mask = flip_labels(y, 0.3, num_classes=3, seed=0)
    >>> int(mask.sum()), bool((y2[mask] != y[mask]).all())
    (3, True)
    """
    labels = torch.as_tensor(y).detach().cpu()
    if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise InputError(
            f"y must be a 1-d tensor of integer class labels, got dtype {labels.dtype} and "
            f"shape {tuple(labels.shape)}; pass y.long() for [n] class indices"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not (isinstance(fraction, (int, float)) and 0.0 <= fraction <= 1.0):
        raise InputError(f"fraction must be a number in [0, 1], got {fraction!r}")
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise InputError(
            f"labels lie in {int(labels.min())}..{int(labels.max())}, outside 0..{num_classes - 1}"
            "; pass the right num_classes"
        )
    n = labels.numel()
    gen = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(n, generator=gen)[: round(fraction * n)]
    shift = torch.randint(1, num_classes, (chosen.numel(),), generator=gen)
    flipped = labels.clone()
    flipped[chosen] = (labels[chosen] + shift) % num_classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return flipped, mask


def _scores_and_labels(scores: ArrayLike, positive: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = as_numpy(scores, "scores").reshape(-1)
    if isinstance(positive, torch.Tensor):
        positive = positive.detach().cpu().numpy()
    pos = np.asarray(positive)
    if pos.dtype != bool:
        if not np.isin(pos, (0, 1)).all():
            raise InputError("the mask must be boolean (or 0/1), True for the flipped examples")
        pos = pos.astype(bool)
    pos = pos.reshape(-1)
    if s.shape != pos.shape:
        raise InputError(
            f"scores has {s.size} entries but the mask has {pos.size}; pass one score per "
            "training example (e.g. the negated self-influence, [n])"
        )
    if not np.isfinite(s).all():
        raise InputError("scores contain NaN or infinite values; need finite suspicion scores")
    num_pos = int(pos.sum())
    if num_pos == 0 or num_pos == pos.size:
        raise InputError(
            f"the mask has {num_pos} positives of {pos.size}; detection needs both flipped and "
            "clean examples (flip a fraction strictly between 0 and 1)"
        )
    return s, pos


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # boundaries of runs of equal values
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_vals)) + 1]
    ends = np.r_[starts[1:], values.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(scores: ArrayLike, positive: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` (higher = more likely positive).

    The Mann–Whitney form with mid-ranks for ties:

    .. math::

        \\mathrm{AUC} = \\frac{\\sum_{i \\in +} r_i - n_+(n_+ + 1)/2}{n_+ n_-}
        = P(s_+ > s_-) + \\tfrac12 P(s_+ = s_-),

    so a tie between a positive and a negative counts one half (1 = every positive ranked
    first, 0.5 = chance). Cost :math:`O(n \\log n)`.
    """
    s, pos = _scores_and_labels(scores, positive)
    ranks = _average_ranks(s)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(scores: ArrayLike, positive: ArrayLike) -> float:
    """Average precision of ``scores`` (higher = more likely positive), ties handled.

    .. math::

        \\mathrm{AP} = \\sum_t (R_t - R_{t-1})\\, P_t

    over the distinct score thresholds :math:`t` in decreasing order, with :math:`P_t` and
    :math:`R_t` the precision and recall of predicting "positive" for every score
    :math:`\\ge t` (tied examples enter together; no interpolation). Equals the fraction of
    positives for a constant score, 1 when every positive is ranked above every negative.
    """
    s, pos = _scores_and_labels(scores, positive)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, p_sorted = s[order], pos[order]
    tp = np.cumsum(p_sorted)
    fp = np.cumsum(~p_sorted)
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]  # last index of each tie group
    tp, fp = tp[last].astype(np.float64), fp[last].astype(np.float64)
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


@dataclass(frozen=True)
class MislabelDetection:
    """How well a suspicion score ranks flipped labels first.

    Attributes
    ----------
    auc : float
        ROC AUC (:func:`roc_auc`): 1 perfect, 0.5 chance.
    average_precision : float
        :func:`average_precision`; chance level is ``num_flipped / n``.
    num_flipped, n : int
        Positives and examples.
    """

    auc: float
    average_precision: float
    num_flipped: int
    n: int

    @property
    def chance_average_precision(self) -> float:
        """The average precision of a random ranking: ``num_flipped / n``."""
        return self.num_flipped / self.n


def mislabel_detection(scores: ArrayLike, flipped_mask: ArrayLike) -> MislabelDetection:
    """Rank training examples by ``scores`` and measure how early the flipped ones come.

    Parameters
    ----------
    scores
        ``[n]`` suspicion scores, **higher = more suspicious**. For infl's influence that is
        the *negated* self-influence, ``-calc.self_influence()`` (:math:`g_i^T A^{-1} g_i
        \\ge 0` for a positive definite :math:`A`: large for examples the model fits poorly);
        for the baselines the negated diagonal of their train-on-train scores.
    flipped_mask
        ``[n]`` booleans, ``True`` for the examples whose label was flipped
        (:func:`flip_labels`).

    Returns
    -------
    MislabelDetection
        ROC AUC and average precision, with ties handled (see :func:`roc_auc`).

    Raises
    ------
    InputError
        Mismatched lengths, non-finite scores, a mask that is not boolean, or a mask with no
        positive or no negative.
    """
    s, pos = _scores_and_labels(scores, flipped_mask)
    return MislabelDetection(
        auc=roc_auc(s, pos),
        average_precision=average_precision(s, pos),
        num_flipped=int(pos.sum()),
        n=int(pos.size),
    )


@dataclass(frozen=True)
class GroupCorrelation:
    """Agreement of predicted and actual group-removal effects.

    Attributes
    ----------
    pearson, spearman : ndarray ``[m]``
        Per test point, the correlation across the ``G`` groups (NaN where a row is
        constant).
    pearson_overall, spearman_overall : float
        The correlation of all ``m * G`` entries at once.
    pearson_mean, spearman_mean : float
        The mean of the per-test-point correlations over the rows where it is defined (NaN
        if none is).
    """

    pearson: np.ndarray
    spearman: np.ndarray
    pearson_overall: float
    spearman_overall: float
    pearson_mean: float
    spearman_mean: float


def _row_corr(fn: Any, p: np.ndarray, a: np.ndarray) -> float:
    if np.ptp(p) == 0.0 or np.ptp(a) == 0.0:
        return math.nan
    return float(fn(p, a))


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def group_effect_correlation(predicted: ArrayLike, actual: ArrayLike) -> GroupCorrelation:
    """Correlate predicted and actual effects of removing ``G`` groups on ``m`` test points.

    Parameters
    ----------
    predicted
        ``[m, G]`` predicted change of each test measurement when group ``g`` is removed —
        for first-order estimators the sum of the members' removal effects,
        ``removal_effect[:, group].sum(1)`` (Koh et al. 2019's group influence).
    actual
        ``[m, G]`` the retrained change, e.g. ``retrain_ground_truth(..., removals=groups)
        .corrected_change``; same units and sign as ``predicted``.

    Returns
    -------
    GroupCorrelation
        Pearson and Spearman per test point (``[m]``) across groups, their means, and over
        all entries.

    Raises
    ------
    InputError
        Shapes differ, are not 2-d, have fewer than 2 groups, or hold non-finite values.
    """
    p = as_numpy(predicted, "predicted")
    a = as_numpy(actual, "actual")
    if p.ndim == 1:
        p = p[None, :]
    if a.ndim == 1:
        a = a[None, :]
    if p.ndim != 2 or p.shape != a.shape:
        raise InputError(
            f"predicted {p.shape} and actual {a.shape} must both be [m, G] (test points x "
            "groups) with the same shape"
        )
    if p.shape[1] < 2:
        raise InputError(f"need at least 2 groups to correlate across, got G={p.shape[1]}")
    if not (np.isfinite(p).all() and np.isfinite(a).all()):
        raise InputError("predicted and actual must be finite (no NaN or inf)")
    rows_p = np.array([_row_corr(pearson, p[j], a[j]) for j in range(p.shape[0])])
    rows_s = np.array([_row_corr(spearman, p[j], a[j]) for j in range(p.shape[0])])
    return GroupCorrelation(
        pearson=rows_p,
        spearman=rows_s,
        pearson_overall=_row_corr(pearson, p.reshape(-1), a.reshape(-1)),
        spearman_overall=_row_corr(spearman, p.reshape(-1), a.reshape(-1)),
        pearson_mean=_nanmean(rows_p),
        spearman_mean=_nanmean(rows_s),
    )
