"""The stated thresholds of ``infl audit``, each with its reason (see docs/audit.md).

Every verdict and recommendation in :mod:`infl.audit` is decided by these constants only; the
report stores them in ``audit.json`` so that a reader can recompute every verdict.
"""

from __future__ import annotations

#: Retraining check: predicted vs actual (control-corrected) removal effects with a Pearson
#: correlation at least this high count as *trustworthy*. Koh & Liang (2017) and Basu et al.
#: (2021) report 0.95-1.0 on convex models where influence is known to work; 0.9 leaves room
#: for the noise of a few sampled removals.
PEARSON_TRUSTED: float = 0.9

#: Below this Pearson correlation the scores do not predict retraining (Basu et al. report
#: values of 0-0.5 on deep networks where influence fails): *not trustworthy*.
PEARSON_UNTRUSTED: float = 0.5

#: Fewest removals a correlation is computed from; with fewer, the check is inconclusive.
MIN_RETRAINS_FOR_CORRELATION: int = 4

#: Stationarity: ``drift_ratio`` = ``n * ||grad J|| / s`` compares the drift continued training
#: causes with one typical removal effect. Above 1 the retraining measurements mix in the drift
#: (*use with caution*); above this value the drift is an order of magnitude larger than what
#: is being estimated, and influence's assumption (a minimum) does not hold: *not trustworthy*.
DRIFT_UNTRUSTED: float = 10.0

#: Negative curvature: when the negative eigenvalues hold more than this fraction of the
#: total |eigenvalue| mass (dense spectrum), damping decides the answer rather than the model:
#: *not trustworthy*. Any negative eigenvalue at all gives *use with caution*.
NEGATIVE_MASS_UNTRUSTED: float = 0.1

#: Sensitivity: the top-k of a test point should survive a change of damping by the grid's
#: factors, and the switch from the Hessian to the Gauss-Newton matrix. A mean overlap below
#: this (fewer than half of the top-k shared) means the ranking is an artefact of a setting:
#: *use with caution*.
STABILITY_CAUTION: float = 0.5

#: Solver agreement: a solver whose inverse-HVPs have cosine at least this high with the
#: reference on every audited point is recommended as accurate enough for ranking.
AGREEMENT_COSINE: float = 0.99

#: Multipliers of the damping used for the sensitivity grid (a factor of 3 either way).
DAMPING_GRID_FACTORS: tuple[float, ...] = (1 / 3, 3.0)

#: The damping grid when the damping used is 0: these fractions of ``lambda_max(H)``.
ZERO_DAMPING_GRID: tuple[float, ...] = (1e-3, 1e-2)

#: Parameters up to which the exact Hessian is the reference solver (else converged CG).
EXACT_MAX_PARAMS: int = 2000

VERDICTS: tuple[str, ...] = ("trustworthy", "use with caution", "not trustworthy")


def as_dict() -> dict[str, float | int]:
    """Every numeric threshold by name (stored in ``audit.json``)."""
    return {
        "pearson_trusted": PEARSON_TRUSTED,
        "pearson_untrusted": PEARSON_UNTRUSTED,
        "min_retrains_for_correlation": MIN_RETRAINS_FOR_CORRELATION,
        "drift_untrusted": DRIFT_UNTRUSTED,
        "negative_mass_untrusted": NEGATIVE_MASS_UNTRUSTED,
        "stability_caution": STABILITY_CAUTION,
        "agreement_cosine": AGREEMENT_COSINE,
        "exact_max_params": EXACT_MAX_PARAMS,
    }
