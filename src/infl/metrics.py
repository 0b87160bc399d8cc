"""Fidelity metrics: how well predicted effects agree with actual (retrained) ones.

Pure functions of arrays. Every function accepts numpy arrays, torch tensors or nested
sequences, and compares quantities *in the same units and with the same sign*: typically
``predicted = calculator.removal_effect(test)`` and
``actual = retrain_ground_truth(...).corrected_change`` (both ``[m, k]``: change of test
measurement ``j`` when removal ``r`` is made). No metric flips a sign behind the user's back.

The correlation coefficients are those of :mod:`scipy.stats`; they are not re-derived here.
This module never imports the influence calculator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy import stats

from infl.errors import InputError

ArrayLike = Any
"""A numpy array, a torch tensor, or a (nested) sequence of numbers."""

RankBy = Literal["abs", "value", "negative"]


def as_numpy(x: ArrayLike, name: str = "input") -> np.ndarray:
    """``x`` as a float64 numpy array (torch tensors are detached and moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(
            f"{name} must be numeric (array or tensor); got {type(x).__name__}"
        ) from err
    return arr


def _pair(predicted: ArrayLike, actual: ArrayLike, min_size: int = 1) -> tuple[np.ndarray, ...]:
    p = as_numpy(predicted, "predicted")
    a = as_numpy(actual, "actual")
    if p.shape != a.shape:
        raise InputError(
            f"predicted has shape {p.shape} but actual has shape {a.shape}; metrics compare "
            "the same entries, so the shapes must match (e.g. both [m, k])"
        )
    p, a = p.reshape(-1), a.reshape(-1)
    if p.size < min_size:
        raise InputError(f"need at least {min_size} values to compare, got {p.size}")
    if not (np.isfinite(p).all() and np.isfinite(a).all()):
        which = "predicted" if not np.isfinite(p).all() else "actual"
        raise InputError(f"{which} contains NaN or infinite values; metrics need finite inputs")
    return p, a


def pearson(predicted: ArrayLike, actual: ArrayLike) -> float:
    """Pearson correlation :math:`r` of all entries (flattened), by ``scipy.stats.pearsonr``.

    Returns NaN (with scipy's warning) if either input is constant.
    """
    p, a = _pair(predicted, actual, min_size=2)
    return float(stats.pearsonr(p, a)[0])


def spearman(predicted: ArrayLike, actual: ArrayLike) -> float:
    """Spearman rank correlation :math:`\\rho` of all entries, by ``scipy.stats.spearmanr``."""
    p, a = _pair(predicted, actual, min_size=2)
    return float(stats.spearmanr(p, a)[0])


def kendall(predicted: ArrayLike, actual: ArrayLike) -> float:
    """Kendall's :math:`\\tau_b` of all entries, by ``scipy.stats.kendalltau``."""
    p, a = _pair(predicted, actual, min_size=2)
    return float(stats.kendalltau(p, a)[0])


def _ranking_key(x: np.ndarray, by: RankBy) -> np.ndarray:
    if by == "abs":
        return np.abs(x)
    if by == "value":
        return x
    if by == "negative":
        return -x
    raise InputError(f"by must be 'abs', 'value' or 'negative', got {by!r}")


def top_k_indices(values: ArrayLike, k: int, by: RankBy = "abs") -> np.ndarray:
    """Indices of the ``k`` largest entries of a 1-d array, largest first.

    ``by="abs"`` ranks by :math:`|x|`, ``"value"`` by :math:`x`, ``"negative"`` by
    :math:`-x`. Ties are broken by the lower index (a stable sort), so results are
    deterministic.
    """
    x = as_numpy(values, "values")
    if x.ndim != 1:
        raise InputError(f"values must be 1-d, got shape {x.shape}")
    _check_k(k, x.size)
    order = np.argsort(-_ranking_key(x, by), kind="stable")
    return order[:k]


def _check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= n:
        raise InputError(f"k must be an integer in 1..{n} (the number of entries), got {k}")


def top_k_overlap(predicted: ArrayLike, actual: ArrayLike, k: int, by: RankBy = "abs") -> float:
    """Fraction of the top-``k`` entries by ``predicted`` that are top-``k`` by ``actual``.

    :math:`|T_k(\\hat y) \\cap T_k(y)| / k \\in [0, 1]` for 1-d inputs, where :math:`T_k`
    is the set of indices of the ``k`` largest entries under the ranking ``by`` (see
    :func:`top_k_indices`). 1 means the same top-``k`` set (in any order).
    """
    p, a = _pair(predicted, actual)
    _check_1d(predicted, actual)
    _check_k(k, p.size)
    common = np.intersect1d(top_k_indices(p, k, by), top_k_indices(a, k, by))
    return common.size / k


def _check_1d(predicted: ArrayLike, actual: ArrayLike) -> None:
    shape = as_numpy(predicted).shape
    if len(shape) != 1:
        raise InputError(
            f"this metric ranks one list of scores: inputs must be 1-d, got shape {shape}; "
            "apply it per test example (row by row)"
        )


def precision_at_k(predicted: ArrayLike, relevant: ArrayLike, k: int, by: RankBy = "abs") -> float:
    """Fraction of the top-``k`` entries by ``predicted`` that are relevant.

    Parameters
    ----------
    predicted
        1-d scores ``[n]``.
    relevant
        A boolean mask ``[n]``, or a 1-d array of relevant indices.
    k
        Cut-off, ``1..n``.
    by
        Ranking of ``predicted`` (see :func:`top_k_indices`).
    """
    p = as_numpy(predicted, "predicted")
    if p.ndim != 1:
        raise InputError(f"predicted must be 1-d, got shape {p.shape}")
    _check_k(k, p.size)
    rel = relevant.detach().cpu().numpy() if isinstance(relevant, torch.Tensor) else relevant
    rel = np.asarray(rel)
    if rel.dtype == bool:
        if rel.shape != p.shape:
            raise InputError(f"relevant mask has shape {rel.shape}, predicted has {p.shape}")
        mask = rel
    else:
        if rel.size and (
            not np.issubdtype(rel.dtype, np.integer) or rel.min() < 0 or rel.max() >= p.size
        ):
            raise InputError(
                f"relevant must be a boolean mask or integer indices in 0..{p.size - 1}"
            )
        mask = np.zeros(p.size, dtype=bool)
        mask[rel.reshape(-1)] = True
    return float(mask[top_k_indices(p, k, by)].sum() / k)


def sign_agreement(predicted: ArrayLike, actual: ArrayLike, ignore_below: float = 0.0) -> float:
    """Fraction of entries where :math:`\\mathrm{sign}(\\hat y) = \\mathrm{sign}(y)`.

    Entries with :math:`|y| \\le` ``ignore_below`` are left out (their sign is noise); with the
    default 0 only exact zeros of ``actual`` are left out. Raises :class:`InputError` if no
    entry is left.
    """
    p, a = _pair(predicted, actual)
    keep = np.abs(a) > ignore_below
    if not keep.any():
        raise InputError(
            f"no entry of actual exceeds ignore_below={ignore_below} in magnitude; lower it"
        )
    return float(np.mean(np.sign(p[keep]) == np.sign(a[keep])))


def relative_error(predicted: ArrayLike, actual: ArrayLike) -> float:
    """:math:`\\|\\hat y - y\\|_2 / \\|y\\|_2` over all entries (0 is perfect)."""
    p, a = _pair(predicted, actual)
    denom = float(np.linalg.norm(a))
    if denom == 0.0:
        raise InputError("actual is all zeros, so the relative error is undefined")
    return float(np.linalg.norm(p - a) / denom)


def linear_datamodeling_score(
    removal_effect: ArrayLike,
    masks: ArrayLike,
    outputs: ArrayLike,
    *,
    reduce: bool = True,
) -> float | np.ndarray:
    """Linear datamodeling score (Park et al. 2023).

    For subset :math:`S_s` (``masks[s]``) the additive prediction of the measurement change
    relative to the full-data model is the sum of the predicted removal effects of the
    examples left out,

    .. math::

        g_{js} = \\sum_{i \\notin S_s} \\text{removal\\_effect}[j, i],

    and the LDS of test example :math:`j` is the Spearman correlation over subsets between
    :math:`g_{j\\cdot}` and the actual outputs :math:`f(z_j;\\theta_{S_s})`; the score is its
    mean over test examples. (Summing the attributions of the *included* examples, as Park et
    al. write it, differs by a per-row constant and a sign that this form already carries:
    ``removal_effect`` is in the units of :func:`infl.retrain_ground_truth`.)

    Parameters
    ----------
    removal_effect
        ``[m, n]`` predicted change of each test measurement when training example ``i`` is
        removed (e.g. ``InfluenceCalculator.removal_effect``).
    masks
        ``[S, n]`` booleans, ``True`` where example ``i`` is in subset ``s``
        (:attr:`infl.retrain.SubsetRetrain.masks`).
    outputs
        ``[m, S]`` actual measurement after training on each subset
        (:attr:`infl.retrain.SubsetRetrain.outputs`).
    reduce
        Return the mean (``True``) or the ``[m]`` per-test-example scores.
    """
    eff = as_numpy(removal_effect, "removal_effect")
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    mk = np.asarray(masks).astype(bool)
    out = as_numpy(outputs, "outputs")
    if eff.ndim == 1:
        eff = eff[None, :]
    if out.ndim == 1:
        out = out[None, :]
    if mk.ndim != 2 or eff.ndim != 2 or out.ndim != 2:
        raise InputError("removal_effect must be [m, n], masks [S, n] and outputs [m, S]")
    if mk.shape[1] != eff.shape[1] or out.shape != (eff.shape[0], mk.shape[0]):
        raise InputError(
            f"shapes do not fit: removal_effect {eff.shape} ([m, n]), masks {mk.shape} "
            f"([S, n]), outputs {out.shape} ([m, S])"
        )
    if mk.shape[0] < 2:
        raise InputError("the LDS needs at least 2 subsets (Park et al. use 100)")
    predicted = eff @ (~mk).T.astype(np.float64)  # [m, S]
    scores = np.array([spearman(predicted[j], out[j]) for j in range(eff.shape[0])])
    return float(np.mean(scores)) if reduce else scores


@dataclass(frozen=True)
class TaylorGap:
    """Agreement of predicted and retrained parameter-change norms (Basu et al. Fig. 1–2).

    Attributes
    ----------
    pearson, spearman : float
        Correlations between :math:`\\|H^{-1} g_i\\|/n` and :math:`\\|\\theta_{-i}-\\theta^*\\|`.
    median_ratio : float
        Median of actual / predicted norms (1 when the first-order approximation is exact in
        scale; Basu et al. find it grows with depth and width).
    """

    pearson: float
    spearman: float
    median_ratio: float


def taylor_gap(predicted_norms: ArrayLike, actual_norms: ArrayLike) -> TaylorGap:
    """Compare predicted and retrained parameter-change norms.

    Parameters
    ----------
    predicted_norms
        ``[k]`` :math:`\\|(H+\\lambda I)^{-1} g_i\\|_2/n`, e.g. the row norms of
        ``InfluenceCalculator.param_change(indices)``.
    actual_norms
        ``[k]`` :math:`\\|\\theta_{-i} - \\theta^*\\|_2`, e.g.
        ``retrain_ground_truth(...).param_change_norm``.
    """
    p, a = _pair(predicted_norms, actual_norms, min_size=2)
    if (p < 0).any() or (a < 0).any():
        raise InputError("norms must be non-negative")
    pos = p > 0
    ratio = float(np.median(a[pos] / p[pos])) if pos.any() else float("nan")
    return TaylorGap(pearson(p, a), spearman(p, a), ratio)


def fidelity_report(
    predicted: ArrayLike, actual: ArrayLike, k: int | None = None
) -> dict[str, float]:
    """The main metrics at once: Pearson, Spearman, Kendall, sign agreement, relative error,
    and (for 1-d inputs with ``k``) top-``k`` overlap."""
    report = {
        "pearson": pearson(predicted, actual),
        "spearman": spearman(predicted, actual),
        "kendall": kendall(predicted, actual),
        "sign_agreement": sign_agreement(predicted, actual),
        "relative_error": relative_error(predicted, actual),
    }
    if k is not None:
        report[f"top_{k}_overlap"] = top_k_overlap(predicted, actual, k)
    return report


__all__ = [
    "TaylorGap",
    "as_numpy",
    "fidelity_report",
    "kendall",
    "linear_datamodeling_score",
    "pearson",
    "precision_at_k",
    "relative_error",
    "sign_agreement",
    "spearman",
    "taylor_gap",
    "top_k_indices",
    "top_k_overlap",
]
