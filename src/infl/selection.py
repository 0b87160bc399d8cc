"""Choosing test and training points the way fidelity studies do (Basu et al. 2021, §5.2).

* test points: the one with the highest loss, or the one at a given percentile of the test
  losses;
* training points: the top-``k`` by :math:`|\\text{influence}|`, or ``k`` points around a
  given percentile of the influence distribution (Basu et al. use the top 100 and the 30th
  percentile).

Pure functions of 1-d arrays (numpy or torch); they return integer indices (numpy ``int64``).
Compute the losses with ``objective.per_example_loss(model, batch)`` and the scores with the
calculator.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from infl.errors import InputError
from infl.metrics import ArrayLike, as_numpy, top_k_indices


def _vector(values: ArrayLike, name: str) -> np.ndarray:
    x = as_numpy(values, name)
    if x.ndim != 1 or x.size == 0:
        raise InputError(f"{name} must be a non-empty 1-d array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return x


def _check_percentile(q: float) -> float:
    if not 0 <= q <= 100:
        raise InputError(f"percentile must be in [0, 100], got {q}")
    return float(q)


def highest_loss(losses: ArrayLike) -> int:
    """Index of the test example with the highest loss (the first one on ties)."""
    return int(np.argmax(_vector(losses, "losses")))


def at_loss_percentile(losses: ArrayLike, q: float) -> int:
    """Index of the test example at the ``q``-th percentile of the losses.

    The example of rank :math:`\\mathrm{round}(q/100\\cdot(m-1))` in ascending order of loss
    (ties broken by index): ``q=100`` is the highest loss, ``q=0`` the lowest, ``q=50`` the
    median example (an actual example, not an interpolated value).
    """
    x = _vector(losses, "losses")
    q = _check_percentile(q)
    order = np.argsort(x, kind="stable")
    return int(order[round(q / 100 * (x.size - 1))])


def top_k_influence(
    scores: ArrayLike, k: int, by: Literal["abs", "value", "negative"] = "abs"
) -> np.ndarray:
    """The ``k`` training indices with the largest :math:`|\\text{influence}|` (largest first).

    ``scores`` is ``[n]`` (one test example's influence or removal effect on every training
    example). ``by="value"`` / ``"negative"`` rank by the signed score instead.
    """
    return top_k_indices(_vector(scores, "scores"), k, by)


def at_influence_percentile(
    scores: ArrayLike, q: float, k: int = 1, by: Literal["abs", "value"] = "abs"
) -> np.ndarray:
    """``k`` training indices around the ``q``-th percentile of the influence distribution.

    Ranks the ``n`` scores in ascending order of :math:`|\\text{score}|` (``by="abs"``) or of
    the signed score (``by="value"``), and returns the ``k`` consecutive ranks centred on rank
    :math:`\\mathrm{round}(q/100\\cdot(n-1))` (shifted to stay inside ``0..n-1``), in
    ascending order of score. ``q=30, k=100`` gives the 100 points around the 30th
    percentile (Basu et al. §5.2).
    """
    x = _vector(scores, "scores")
    q = _check_percentile(q)
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= x.size:
        raise InputError(f"k must be an integer in 1..{x.size}, got {k}")
    if by not in ("abs", "value"):
        raise InputError(f"by must be 'abs' or 'value', got {by!r}")
    key = np.abs(x) if by == "abs" else x
    order = np.argsort(key, kind="stable")
    centre = round(q / 100 * (x.size - 1))
    start = min(max(centre - k // 2, 0), x.size - k)
    return order[start : start + k]


__all__ = ["at_influence_percentile", "at_loss_percentile", "highest_loss", "top_k_influence"]
