"""Seed statistics and the verdict rules of the fragility report.

Runs are pooled over seeds per configuration (:class:`Group`, collapsed runs set aside), each
metric becomes a mean ± std (:class:`Stat`), and a verdict says whether that agrees with the
paper's number or trend, or is *inconclusive* because the seed spread covers 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "COLLAPSE_MARGIN",
    "INCONCLUSIVE",
    "Comparison",
    "Group",
    "Stat",
    "difference",
    "group_rows",
    "is_collapsed",
    "is_inconclusive",
    "stat",
    "verdict_difference",
    "verdict_trend",
    "verdict_value",
]

COLLAPSE_MARGIN = 0.05
"""A run whose test accuracy is within this of chance (1/C) is *collapsed* (a dead network):
its influence numbers say nothing about influence functions, so it is excluded from means and
counted separately."""


@dataclass(frozen=True)
class Stat:
    """Mean ± std of one metric over the usable seeds of one configuration."""

    mean: float
    std: float
    count: int

    def __str__(self) -> str:
        if self.count == 0 or math.isnan(self.mean):
            return "n/a"
        if self.count == 1:
            return f"{self.mean:.3f}"
        return f"{self.mean:.3f} ± {self.std:.3f}"


def stat(values: Iterable[float]) -> Stat:
    """Mean and sample standard deviation of the finite values."""
    arr = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return Stat(math.nan, math.nan, 0)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return Stat(float(arr.mean()), std, int(arr.size))


def is_collapsed(row: dict[str, Any], num_classes: int) -> bool:
    """Whether a run ended at chance accuracy (see :data:`COLLAPSE_MARGIN`)."""
    return bool(row["test_accuracy"] <= 1.0 / num_classes + COLLAPSE_MARGIN)


@dataclass
class Group:
    """The seeds of one configuration."""

    key: tuple[Any, ...]
    rows: list[dict[str, Any]]
    usable: list[dict[str, Any]] = field(default_factory=list)

    def stat(self, metric: str) -> Stat:
        return stat(float(r[metric]) for r in self.usable if metric in r)

    @property
    def collapsed(self) -> int:
        return len(self.rows) - len(self.usable)


def group_rows(
    rows: Sequence[dict[str, Any]], keys: Sequence[str], num_classes: int
) -> dict[tuple[Any, ...], Group]:
    """Group rows by ``keys`` (seeds pooled); mark collapsed runs."""
    groups: dict[tuple[Any, ...], Group] = {}
    for row in rows:
        key = tuple(row[k] for k in keys)
        group = groups.setdefault(key, Group(key, []))
        group.rows.append(row)
        if not is_collapsed(row, num_classes):
            group.usable.append(row)
    return groups


INCONCLUSIVE = "inconclusive"
"""Prefix of a verdict whose seed spread is too wide to support or contradict the paper."""


def is_inconclusive(verdict: str) -> bool:
    """Whether ``verdict`` is an *inconclusive* one (see :func:`verdict_trend`)."""
    return verdict.startswith(INCONCLUSIVE)


def difference(first: Stat, last: Stat) -> Stat:
    """``last - first`` with the seed spread of a difference, :math:`\\sqrt{s_1^2 + s_2^2}`."""
    return Stat(
        last.mean - first.mean, math.hypot(first.std, last.std), min(first.count, last.count)
    )


def _covers_zero(diff: Stat) -> bool:
    """Whether ``mean ± std`` contains 0 (never for a zero spread: one seed says nothing)."""
    return diff.std > 0 and abs(diff.mean) <= diff.std


def verdict_value(ours: Stat, paper: float, tolerance: float = 0.1) -> str:
    """Compare our mean ± std with the paper's value.

    *Inconclusive* when our spread covers 0 (``|mean| <= std``) while the paper's value is
    farther than ``tolerance`` from 0: a sign we cannot establish cannot agree with one.
    Otherwise it *agrees* when the paper's value lies within max(tolerance, 2 std) of our
    mean, and *differs* beyond that.
    """
    if ours.count == 0:
        return "no usable runs"
    if _covers_zero(ours) and abs(paper) > tolerance:
        return (
            f"{INCONCLUSIVE} (spread covers 0: ours is {ours.mean:+.2f} ± {ours.std:.2f}, "
            f"the paper {paper:g})"
        )
    slack = max(tolerance, 2 * ours.std)
    diff = ours.mean - paper
    if abs(diff) <= slack:
        return "agrees"
    return f"differs: ours is {'higher' if diff > 0 else 'lower'} by {abs(diff):.2f}"


def verdict_difference(diff: Stat, margin: float = 0.05) -> str:
    """A difference the paper found positive: agrees when ``mean > margin``.

    *Inconclusive* when its spread covers 0 (``|mean| <= std``, ``std`` the spread of the
    difference from :func:`difference`).
    """
    if diff.count == 0:
        return "no usable runs"
    if _covers_zero(diff):
        return f"{INCONCLUSIVE} (spread covers 0: {diff.mean:+.2f} ± {diff.std:.2f})"
    return "agrees" if diff.mean > margin else f"differs: no clear gain ({diff.mean:+.2f})"


def verdict_trend(first: Stat, last: Stat, expected: str, margin: float = 0.05) -> str:
    """Compare the direction from ``first`` to ``last`` with ``expected`` (falls/grows).

    The change ``last - first`` has the seed spread :math:`\\sqrt{s_1^2 + s_2^2}`. When that
    spread covers 0 (``|change| <= spread``) the verdict is *inconclusive*: more seeds could
    show either direction. Otherwise the trend *falls* or *grows* when the change exceeds
    ``margin`` (else it is *flat*), and *agrees* when that is ``expected``.
    """
    if first.count == 0 or last.count == 0:
        return "no usable runs"
    diff = difference(first, last)
    change = diff.mean
    if _covers_zero(diff):
        return f"{INCONCLUSIVE} (spread covers 0: change {change:+.2f} ± {diff.std:.2f})"
    if change < -margin:
        ours = "falls"
    elif change > margin:
        ours = "grows"
    else:
        ours = "flat"
    return "agrees" if ours == expected else f"differs: ours {ours} ({change:+.2f})"


@dataclass
class Comparison:
    """One line of the report: what is compared, our number, the paper's, the verdict."""

    section: str
    setting: str
    ours: str
    paper: str
    verdict: str
