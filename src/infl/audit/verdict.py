"""Per-point verdicts, the model-level summary and the recommendations, from the thresholds.

Pure functions of the evidence records (no model, no solver): every decision here can be
recomputed from ``audit.json``.
"""

from __future__ import annotations

from typing import Any

from infl.audit import thresholds as th
from infl.audit.report import PointVerdict


def model_reasons(
    curvature: dict[str, Any], stationarity: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """Reasons that apply to every test point: ``(not_trustworthy, caution)``."""
    bad: list[str] = []
    caution: list[str] = []
    drift = stationarity.get("drift_ratio")
    if drift is None or drift > th.DRIFT_UNTRUSTED:
        bad.append(
            f"not at a minimum: drift ratio {drift} > {th.DRIFT_UNTRUSTED} (the gradient left "
            "outweighs a removal effect)"
        )
    elif drift > 1.0:
        caution.append(f"near but not at a minimum: drift ratio {drift}")
    frac = curvature.get("negative_mass_fraction")
    if frac is not None and frac > th.NEGATIVE_MASS_UNTRUSTED:
        bad.append(
            f"negative curvature dominates: negative mass fraction {frac} > "
            f"{th.NEGATIVE_MASS_UNTRUSTED}"
        )
    elif curvature.get("negative_count", 0) > 0:
        caution.append(f"H has {curvature['negative_count']} negative eigenvalues")
    if curvature.get("user_damping_positive_definite") is False:
        caution.append(
            f"your damping {curvature['user_damping']} leaves H + damping I indefinite "
            f"(needs > {curvature['min_pd_damping']})"
        )
    return bad, caution


#: The level of one check: ``pass``, ``caution``, ``not trustworthy``, or ``n/a`` (not computed).
LEVELS: tuple[str, ...] = ("pass", "caution", "not trustworthy", "n/a")


def _check(value: Any, level: int) -> dict[str, Any]:
    return {"value": value, "level": LEVELS[level]}


def model_checks(curvature: dict[str, Any], stationarity: dict[str, Any]) -> dict[str, Any]:
    """The model-level checks with their levels, by the same rules as :func:`model_reasons`.

    Returns
    -------
    dict
        ``{"drift_ratio", "negative_mass_fraction", "damping_positive_definite"}``, each
        ``{"value": v, "level": one of LEVELS}``.
    """
    drift = stationarity.get("drift_ratio")
    drift_level = 2 if drift is None or drift > th.DRIFT_UNTRUSTED else int(drift > 1.0)
    frac = curvature.get("negative_mass_fraction")
    if frac is not None and frac > th.NEGATIVE_MASS_UNTRUSTED:
        neg_level = 2
    else:
        neg_level = int(curvature.get("negative_count", 0) > 0)
    pd = curvature.get("user_damping_positive_definite")
    return {
        "drift_ratio": _check(drift, drift_level),
        "negative_mass_fraction": _check(frac, neg_level),
        "damping_positive_definite": _check(pd, 3 if pd is None else int(pd is False)),
    }


def point_verdict(
    test_index: int,
    loss: float | None,
    model_bad: list[str],
    model_caution: list[str],
    pearson: float | None,
    retrained: bool,
    model_min_pearson: float | None,
    stability: float | None,
    gn_overlap: float | None,
    model_levels: dict[str, Any] | None = None,
) -> PointVerdict:
    """The verdict on one test point from the model-level reasons and its own evidence.

    ``model_levels`` (:func:`model_checks`) is copied into the verdict's ``checks``, with the
    point's own checks (``retraining_pearson``, ``damping_stability``,
    ``gauss_newton_overlap``) and their levels; the verdict is the worst level among them.
    """
    bad = list(model_bad)
    caution = list(model_caution)
    r = pearson if retrained else model_min_pearson
    whose = "its" if retrained else "the audited points'"
    checks = dict(model_levels or {})
    if r is None:
        caution.append("no retraining check (too few retrains)")
        checks["retraining_pearson"] = _check(None, 1)
    elif r < th.PEARSON_UNTRUSTED:
        bad.append(f"{whose} retraining Pearson {r} < {th.PEARSON_UNTRUSTED}")
        checks["retraining_pearson"] = _check(r, 2)
    elif r < th.PEARSON_TRUSTED:
        caution.append(f"{whose} retraining Pearson {r} < {th.PEARSON_TRUSTED}")
        checks["retraining_pearson"] = _check(r, 1)
    else:
        checks["retraining_pearson"] = _check(r, 0)
    for name, value, what in (
        ("damping_stability", stability, "with damping"),
        ("gauss_newton_overlap", gn_overlap, "from Hessian to Gauss-Newton"),
    ):
        if value is None:
            checks[name] = _check(None, 3)
        elif value < th.STABILITY_CAUTION:
            caution.append(f"top-k changes {what} (overlap {value})")
            checks[name] = _check(value, 1)
        else:
            checks[name] = _check(value, 0)
    if bad:
        return PointVerdict(test_index, loss, th.VERDICTS[2], tuple(bad + caution), checks)
    if caution:
        return PointVerdict(test_index, loss, th.VERDICTS[1], tuple(caution), checks)
    return PointVerdict(test_index, loss, th.VERDICTS[0], (), checks)


def summarize(points: list[PointVerdict]) -> dict[str, Any]:
    """The model-level verdict (the worst point's) with counts and a one-line reading."""
    counts = {v: sum(p.verdict == v for p in points) for v in th.VERDICTS}
    worst = max((th.VERDICTS.index(p.verdict) for p in points), default=1)
    verdict = th.VERDICTS[worst]
    parts = [f"{counts[v]} {v}" for v in th.VERDICTS if counts[v]]
    return {
        "verdict": verdict,
        "counts": counts,
        "reading": f"Of {len(points)} audited test points: " + ", ".join(parts) + ".",
    }


def recommendations(
    curvature: dict[str, Any], agreement: dict[str, Any], stationarity: dict[str, Any]
) -> list[str]:
    """What to change, each following from one piece of evidence."""
    out: list[str] = []
    if curvature.get("user_damping_positive_definite") is False:
        out.append(
            f"Use damping above {curvature['min_pd_damping']} (suggested "
            f"{curvature['suggested_damping']}); yours leaves H + damping I indefinite."
        )
    elif curvature.get("user_damping") is None:
        out.append(f"Use damping {curvature['damping_used']} (the advised value).")
    rows = [
        r
        for r in agreement.get("solvers", [])
        if r["min_cosine"] is not None and r["min_cosine"] >= th.AGREEMENT_COSINE
    ]
    if rows:
        fastest = min(rows, key=lambda r: r["seconds"] or 0.0)
        out.append(
            f"Solver: {fastest['solver']} agrees with {agreement['reference']} (cosine "
            f"{fastest['min_cosine']}) and took {fastest['seconds']} s."
        )
    else:
        out.append(f"Solver: use {agreement['reference']}; no cheaper solver agreed with it.")
    drift = stationarity.get("drift_ratio")
    if drift is None or drift > 1.0:
        if stationarity.get("wrong_weight_decay"):
            out.append(
                f"The objective's weight decay does not match training: the implied one is "
                f"{stationarity['implied_weight_decay']}."
            )
        else:
            out.append(
                f"Train longer (drift ratio {drift}) or add weight decay: influence assumes a "
                "minimum, and Basu et al. found weight decay makes it far more accurate."
            )
    frac = curvature.get("negative_mass_fraction")
    if frac is not None and frac > th.NEGATIVE_MASS_UNTRUSTED:
        out.append(
            f"Negative curvature holds {frac} of the eigenvalue mass: the scores depend on "
            "the damping more than on the model; prefer Gauss-Newton curvature."
        )
    return out
