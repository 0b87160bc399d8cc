"""The records of :mod:`infl.experiments.correction`: its settings and its results.

:class:`CorrectionConfig` is the validated correction protocol (with the deprecated keyword
form resolved by :func:`resolve_config`); :class:`CorrectionResult` is one corrected test
example, :class:`CorrectionSummary` every ranking over many. The names stay importable from
:mod:`infl.experiments.correction`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from infl.errors import InputError
from infl.legacy_keywords import config_from_keywords

__all__ = [
    "RANKINGS",
    "CorrectionConfig",
    "CorrectionResult",
    "CorrectionSummary",
    "MeasurementName",
    "Ranking",
    "resolve_config",
]

Ranking = Literal["influence", "random", "gradient_similarity"]
MeasurementName = Literal["margin", "loss"]
RANKINGS: tuple[Ranking, ...] = ("influence", "random", "gradient_similarity")


@dataclass(frozen=True)
class CorrectionResult:
    """The outcome of :func:`correct_prediction` on one test example.

    Attributes
    ----------
    ranking : str
        ``"influence"``, ``"random"`` or ``"gradient_similarity"``.
    flipped : bool
        Whether the test example ended up classified correctly.
    steps : int
        Fine-tuning steps taken (the step at which it flipped, or ``max_steps``).
    max_steps : int
        The step budget.
    helpful : tuple of int
        :math:`S_+`, the training indices descended on, most helpful first.
    harmful : tuple of int
        :math:`S_-`, the training indices ascended on, most harmful first (empty unless
        ``ascend_harmful``).
    label : int
        The test example's target class.
    prediction_before, prediction_after : int
        Predicted class before and after fine-tuning.
    margin_before, margin_after : float
        Target logit minus the largest other logit, before and after (positive = correct).
    heldout_accuracy_before, heldout_accuracy_after : float or None
        Accuracy on the held-out data before and after (``None`` without held-out data).
    model : nn.Module or None
        The fine-tuned copy of the model (the user's module is never modified).
    """

    ranking: str
    flipped: bool
    steps: int
    max_steps: int
    helpful: tuple[int, ...]
    harmful: tuple[int, ...]
    label: int
    prediction_before: int
    prediction_after: int
    margin_before: float
    margin_after: float
    heldout_accuracy_before: float | None = None
    heldout_accuracy_after: float | None = None
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def heldout_accuracy_change(self) -> float | None:
        """After minus before: the collateral cost of the correction (negative = a loss)."""
        if self.heldout_accuracy_before is None or self.heldout_accuracy_after is None:
            return None
        return self.heldout_accuracy_after - self.heldout_accuracy_before


@dataclass(frozen=True)
class CorrectionSummary:
    """Result of :func:`compare_rankings`: every ranking on the same mis-predicted examples.

    Attributes
    ----------
    test_indices : tuple of int
        Positions (in ``test_data``) of the test examples that were corrected.
    results : dict of str to tuple of CorrectionResult
        One result per test example for each ranking, in ``test_indices`` order.
    """

    test_indices: tuple[int, ...]
    results: dict[str, tuple[CorrectionResult, ...]]

    def success_rate(self, ranking: str) -> float:
        """Fraction of the test examples whose prediction flipped within the budget."""
        res = self.results[ranking]
        return sum(r.flipped for r in res) / len(res) if res else math.nan

    def median_steps(self, ranking: str) -> float:
        """Median steps over the successful corrections (NaN if none succeeded)."""
        steps = [r.steps for r in self.results[ranking] if r.flipped]
        return float(statistics.median(steps)) if steps else math.nan

    def mean_heldout_change(self, ranking: str) -> float:
        """Mean held-out accuracy change over all attempts (NaN without held-out data)."""
        changes = [r.heldout_accuracy_change for r in self.results[ranking]]
        vals = [c for c in changes if c is not None]
        return sum(vals) / len(vals) if vals else math.nan

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per ranking: ``ranking``, ``attempts``, ``success_rate``,
        ``median_steps``, ``mean_heldout_change``."""
        return [
            {
                "ranking": name,
                "attempts": len(res),
                "success_rate": self.success_rate(name),
                "median_steps": self.median_steps(name),
                "mean_heldout_change": self.mean_heldout_change(name),
            }
            for name, res in self.results.items()
        ]

    def table(self) -> str:
        """:meth:`to_rows` as a fixed-width text table."""
        lines = [
            f"{'ranking':<20} {'attempts':>8} {'success':>8} {'median steps':>12} "
            f"{'Δ held-out acc':>14}"
        ]
        for r in self.to_rows():
            lines.append(
                f"{r['ranking']:<20} {r['attempts']:>8d} {r['success_rate']:>8.1%} "
                f"{r['median_steps']:>12.1f} {r['mean_heldout_change']:>+14.4f}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class CorrectionConfig:
    """The settings shared by :func:`correct_prediction` and :func:`compare_rankings`.

    One frozen record, validated at construction, so that a study can state its correction
    protocol once and pass it to both.

    Parameters
    ----------
    measurement
        Without a calculator: ``"margin"`` (default when ``None``, :math:`\\sigma=+1`) or
        ``"loss"`` (:math:`\\sigma=-1`), the test measurement :math:`f` that the ranking
        explains.
    k
        Size of the helpful set :math:`S_+` (and of the harmful set :math:`S_-`); at most the
        number of training examples (checked when the data is known).
    lr
        SGD step :math:`\\eta` of the fine-tuning.
    max_steps
        Step budget per corrected example.
    ascend_harmful
        Also ascend on the ``k`` most harmful examples (:math:`a = 1` in the module
        docstring's :math:`L(\\theta)`).
    seed
        Seeds the ``"random"`` ranking (``seed + j`` for the ``j``-th example of
        :func:`compare_rankings`).
    chunk_size
        Examples per chunk for gradients.

    Raises
    ------
    InputError
        A setting out of range (the message names it).
    """

    measurement: MeasurementName | None = None
    k: int = 10
    lr: float = 0.1
    max_steps: int = 100
    ascend_harmful: bool = False
    seed: int = 0
    chunk_size: int = 256

    def __post_init__(self) -> None:
        if self.measurement not in (None, "margin", "loss"):
            raise InputError(
                f"measurement must be None, 'margin' or 'loss', got {self.measurement!r}"
            )
        if isinstance(self.k, bool) or int(self.k) != self.k or self.k < 1:
            raise InputError(f"k must be a positive integer, got {self.k}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be a finite number > 0, got {self.lr}")
        if isinstance(self.max_steps, bool) or int(self.max_steps) != self.max_steps:
            raise InputError(f"max_steps must be a positive integer, got {self.max_steps}")
        if self.max_steps < 1:
            raise InputError(f"max_steps must be a positive integer, got {self.max_steps}")
        if isinstance(self.chunk_size, bool) or int(self.chunk_size) != self.chunk_size:
            raise InputError(f"chunk_size must be a positive integer, got {self.chunk_size}")
        if self.chunk_size < 1:
            raise InputError(f"chunk_size must be a positive integer, got {self.chunk_size}")
        object.__setattr__(self, "lr", float(self.lr))


def resolve_config(
    config: CorrectionConfig | None, settings: dict[str, Any], caller: str
) -> CorrectionConfig:
    """``config``, or (deprecated) a :class:`CorrectionConfig` built from keywords."""
    return config_from_keywords(
        CorrectionConfig,
        config,
        settings,
        caller,
        kind="settings",
        public_name="infl.experiments.CorrectionConfig",
    )
