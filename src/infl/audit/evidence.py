"""The four pieces of evidence an audit collects, each from the public calculator API.

* :func:`curvature_evidence` — the spectrum and what the user's damping does to it;
* :func:`agreement_evidence` — every applicable solver against the most accurate one;
* :func:`sensitivity_evidence` — top-k stability over a damping grid and Hessian vs GN;
* :func:`retraining_evidence` — warm-start leave-one-out retraining within a time budget.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from infl import metrics
from infl.audit import thresholds as th
from infl.audit.report import Section, num, show
from infl.calculator import InfluenceCalculator
from infl.diagnostics import Spectrum, advise, compare_inverse_hvps
from infl.errors import InflError
from infl.objective import Objective
from infl.retrain import RetrainConfig, retrain_ground_truth
from infl.solvers import EKFAC, Arnoldi, ConjugateGradient, ExactHessian, LiSSA
from infl.solvers.base import Solver


@dataclass(frozen=True)
class Curvature:
    """The curvature section and the damping the audit goes on with.

    Attributes
    ----------
    section
        The evidence record.
    damping
        The damping used for every score: the user's when it makes :math:`H+\\lambda I`
        positive definite, else the advised one.
    spectrum
        The spectrum of :math:`H` (undamped).
    """

    section: Section
    damping: float
    spectrum: Spectrum


def curvature_evidence(calc: InfluenceCalculator, damping: float | None) -> Curvature:
    """Extreme eigenvalues of :math:`H`, the smallest PD damping, and the user's damping.

    Parameters
    ----------
    calc
        A calculator on the audited model (its solver does not matter).
    damping
        The damping the user intends to use (``None``: the advised one).

    Returns
    -------
    Curvature
    """
    spec = calc.spectrum(k=10)
    advice = advise(spec, damping=damping)
    lam_max, lam_min = spec.lambda_max, spec.lambda_min
    user_pd = damping is not None and damping > advice.min_damping
    used = float(damping) if (damping is not None and user_pd) else advice.suggested_damping
    if not user_pd and advice.min_damping == 0.0 and damping is not None:
        used = float(damping)  # H is positive definite already: any damping >= 0 is fine
        user_pd = True
    neg_frac = spec.negative_mass_fraction
    numbers: dict[str, Any] = {
        "method": spec.method,
        "lambda_max": num(lam_max),
        "lambda_min": num(lam_min),
        "negative_count": spec.num_negative,
        "negative_mass": num(spec.negative_mass),
        "negative_mass_fraction": num(neg_frac),
        "condition_number": num(spec.condition_number),
        "min_pd_damping": num(advice.min_damping),
        "suggested_damping": num(advice.suggested_damping),
        "user_damping": num(damping),
        "user_damping_positive_definite": user_pd if damping is not None else None,
        "damping_used": num(used),
        "damped_condition_number": num(
            (lam_max + used) / (lam_min + used) if lam_min + used > 0 else math.inf
        ),
        "largest": [num(float(v)) for v in spec.largest[:5]],
        "smallest": [num(float(v)) for v in spec.smallest[:5]],
    }
    if spec.num_negative == 0:
        reading = (
            f"H is positive definite (lambda_min = {numbers['lambda_min']}, condition number "
            f"{numbers['condition_number']}); damping {numbers['damping_used']} is used."
        )
    else:
        what = (
            "the advised damping is used instead"
            if damping is not None and not user_pd
            else "it makes H + damping I positive definite"
        )
        reading = (
            f"H has {numbers['negative_count']} negative eigenvalues (lambda_min = "
            f"{numbers['lambda_min']}); the smallest positive-definite damping is "
            f"{numbers['min_pd_damping']}; damping {numbers['damping_used']} is used: {what}."
        )
    return Curvature(Section("curvature", numbers, reading), float(used), spec)


def reference_solver(num_params: int, damping: float) -> Solver:
    """The most accurate solver available: exact up to ``EXACT_MAX_PARAMS``, else tight CG."""
    if num_params <= th.EXACT_MAX_PARAMS:
        return ExactHessian(damping=damping)
    return ConjugateGradient(damping=damping, rtol=1e-8, max_iter=1000)


def default_solvers(num_params: int, damping: float) -> dict[str, Solver]:
    """CG, LiSSA (auto scale), Arnoldi and EK-FAC at ``damping`` (compared with the reference)."""
    out: dict[str, Solver] = {}
    if num_params <= th.EXACT_MAX_PARAMS:
        out["cg"] = ConjugateGradient(damping=damping, rtol=1e-6, max_iter=500)
    out["lissa"] = LiSSA(damping=damping, max_depth=1000)
    out["arnoldi"] = Arnoldi(rank=min(20, num_params), damping=damping)
    out["ekfac"] = EKFAC(damping=max(damping, 1e-8))
    return out


def _topk_overlaps(scores: torch.Tensor, reference: torch.Tensor, k: int) -> list[float]:
    return [
        metrics.top_k_overlap(scores[j].cpu().numpy(), reference[j].cpu().numpy(), k)
        for j in range(reference.shape[0])
    ]


def agreement_evidence(
    ref: InfluenceCalculator,
    test: Any,
    ref_scores: torch.Tensor,
    solvers: dict[str, Solver],
    top_k: int,
) -> Section:
    """Cosine of inverse-HVPs, score Spearman and top-k overlap of each solver vs ``ref``.

    A solver that cannot run on this model (for example EK-FAC on unsupported layers) is
    listed under ``skipped`` with the reason.
    """
    ref_x = ref.inverse_hvp(test).value
    grads = ref.train_grads()
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for name, solver in solvers.items():
        start = time.perf_counter()
        try:
            other = ref.with_solver(solver)
            x = other.inverse_hvp(test).value
            if x.shape != ref_x.shape:
                raise InflError(f"inverse-HVPs of shape {tuple(x.shape)} (low-rank)")
            agree = compare_inverse_hvps(x, ref_x, train_grads=grads)
            scores = -(x.to(grads.dtype) @ grads.T)
        except (InflError, RuntimeError, ValueError) as err:
            skipped.append({"solver": name, "reason": " ".join(str(err).split())[:160]})
            continue
        overlaps = _topk_overlaps(scores, ref_scores, top_k)
        rows.append(
            {
                "solver": name,
                "min_cosine": num(agree.min_cosine),
                "mean_spearman": num(agree.mean_spearman),
                "min_top_k_overlap": num(min(overlaps)),
                "seconds": num(time.perf_counter() - start, 3),
            }
        )
    good = [r for r in rows if (r["min_cosine"] or 0.0) >= th.AGREEMENT_COSINE]
    numbers: dict[str, Any] = {
        "reference": type(ref.solver).__name__,
        "top_k": top_k,
        "solvers": rows,
        "skipped": skipped,
    }
    if rows:
        worst = min(rows, key=lambda r: r["min_cosine"] if r["min_cosine"] is not None else -2)
        reading = (
            f"{len(good)} of {len(rows)} solvers agree with {numbers['reference']} "
            f"(cosine >= {th.AGREEMENT_COSINE}); the worst is {worst['solver']} at cosine "
            f"{worst['min_cosine']}."
        )
    else:
        reading = f"Only the reference {numbers['reference']} could run on this model."
    numbers["agreeing"] = len(good)
    numbers["compared"] = len(rows)
    return Section("solver_agreement", numbers, reading)


def damping_grid(damping: float, lambda_max: float, min_pd: float = 0.0) -> list[float]:
    """The dampings the sensitivity check tries besides ``damping``.

    The grid scales the damping's excess over ``min_pd`` (the smallest positive-definite
    damping) by :data:`~infl.audit.thresholds.DAMPING_GRID_FACTORS`, so that every grid point
    keeps :math:`H + \\lambda I` positive definite.
    """
    excess = damping - min_pd
    if excess > 0:
        return [min_pd + excess * f for f in th.DAMPING_GRID_FACTORS]
    return [min_pd + max(lambda_max, 1e-12) * f for f in th.ZERO_DAMPING_GRID]


def sensitivity_evidence(
    ref: InfluenceCalculator,
    model: nn.Module,
    objective: Objective,
    train_data: Any,
    test: Any,
    ref_scores: torch.Tensor,
    lambda_max: float,
    min_pd: float,
    top_k: int,
) -> tuple[Section, list[float | None], list[float | None]]:
    """Top-k stability of each test point over a damping grid and Hessian vs Gauss-Newton.

    Returns
    -------
    section, damping_stability, gn_overlap
        The record, and per test point the mean top-k overlap across the damping grid and
        with Gauss-Newton scores (``None`` where not computed).
    """
    grid = damping_grid(float(ref.fitted_solver().damping), lambda_max, min_pd)
    per_grid = []
    for lam in grid:
        per_grid.append(_topk_overlaps(ref.with_damping(lam).influence(test), ref_scores, top_k))
    m = ref_scores.shape[0]
    stability: list[float | None] = [
        num(float(np.mean([row[j] for row in per_grid]))) for j in range(m)
    ]
    gn: list[float | None] = [None] * m
    gn_note = ""
    try:
        gn_calc = InfluenceCalculator(
            model,
            objective,
            train_data,
            ref.solver,
            progress=False,
            curvature="gauss_newton" if ref.curvature == "hessian" else "hessian",
            check_minimum=False,
        )
        gn = [num(v) for v in _topk_overlaps(gn_calc.influence(test), ref_scores, top_k)]
    except (InflError, RuntimeError, ValueError) as err:
        gn_note = " ".join(str(err).split())[:160]
    values = [v for v in stability if v is not None]
    numbers: dict[str, Any] = {
        "top_k": top_k,
        "damping_grid": [num(v) for v in grid],
        "min_damping_stability": num(min(values)) if values else None,
        "min_gauss_newton_overlap": num(min(v for v in gn if v is not None))
        if any(v is not None for v in gn)
        else None,
        "gauss_newton_skipped": gn_note or None,
    }
    reading = (
        f"Across the damping grid the top-{top_k} keeps at least "
        f"{numbers['min_damping_stability']} of its members on every audited point; "
        + (
            f"Hessian vs Gauss-Newton overlap is at least {numbers['min_gauss_newton_overlap']}."
            if not gn_note
            else "Gauss-Newton was skipped (the loss has no output Hessian)."
        )
    )
    return Section("sensitivity", numbers, reading), stability, gn


@dataclass(frozen=True)
class Retraining:
    """The retraining section with its per-point correlations and scatter data."""

    section: Section
    pearson: dict[int, float | None]
    scatter: dict[int, tuple[list[float], list[float]]]


def retraining_evidence(
    model: nn.Module,
    objective: Objective,
    train_data: Any,
    test_select: Any,
    points: list[int],
    predicted: torch.Tensor,
    *,
    per_point: int,
    random_per_point: int,
    deadline: float,
    seed: int,
    config: RetrainConfig | None = None,
    calc: InfluenceCalculator | None = None,
) -> Retraining:
    """Warm-start leave-one-out retraining of top-|influence| and random examples.

    Parameters
    ----------
    model, objective, train_data
        The audited setup.
    test_select
        The test batch of the retrained points (rows of ``predicted``, in order).
    points
        Their indices in the test data (for the records).
    predicted
        ``[len(points), n]`` predicted removal effects.
    per_point, random_per_point
        Top-|influence| and random removals wanted per point.
    deadline
        ``time.perf_counter()`` value by which retraining must stop; one retrain (and the
        control run) is always done to estimate the cost of one.
    seed
        Seeds the random removals.
    config
        The retraining protocol (default: warm-start L-BFGS).
    calc
        The calculator whose ``param_change`` predicts the parameter-change norms of the
        retrained removals (the Taylor gap, :func:`infl.metrics.taylor_gap`); ``None``: no
        Taylor gap.
    """
    n = predicted.shape[1]
    rng = np.random.default_rng(seed)
    order: list[int] = []
    tops = [
        np.argsort(-predicted[j].abs().cpu().numpy(), kind="stable")[:per_point]
        for j in range(len(points))
    ]
    for rank in range(per_point):
        for top in tops:
            if rank < len(top) and int(top[rank]) not in order:
                order.append(int(top[rank]))
    rest = [i for i in range(n) if i not in order]
    if rest:
        extra = rng.choice(rest, size=min(len(rest), random_per_point), replace=False)
        order += [int(i) for i in extra]
    cfg = config or RetrainConfig(init="warm", optimizer="lbfgs", max_steps=200, grad_tol=1e-7)
    start = time.perf_counter()
    first = retrain_ground_truth(
        model, objective, train_data, test_select, [order[0]], config=cfg, progress=False
    )
    per_retrain = (time.perf_counter() - start) / 2  # one removal + the control run
    afford = int((deadline - time.perf_counter()) / max(per_retrain, 1e-9)) - 1
    more = order[1 : 1 + max(afford, 0)]
    changes = [first.corrected_change]
    norms = [first.param_change_norm]
    if more:
        gt = retrain_ground_truth(
            model, objective, train_data, test_select, more, config=cfg, progress=False
        )
        changes.append(gt.corrected_change)
        norms.append(gt.param_change_norm)
    done = [order[0], *more]
    actual = torch.cat(changes, dim=1).to(torch.float64)
    pred = predicted[:, done].to(torch.float64)
    rows = []
    pearson: dict[int, float | None] = {}
    scatter: dict[int, tuple[list[float], list[float]]] = {}
    for j, index in enumerate(points):
        p, a = pred[j].cpu().numpy(), actual[j].cpu().numpy()
        enough = len(done) >= th.MIN_RETRAINS_FOR_CORRELATION and np.ptp(a) > 0 and np.ptp(p) > 0
        r = num(metrics.pearson(p, a)) if enough else None
        rho = num(metrics.spearman(p, a)) if enough else None
        pearson[index] = r
        scatter[index] = (p.tolist(), a.tolist())
        rows.append({"test_index": index, "pearson": r, "spearman": rho, "retrains": len(done)})
    left = len(order) - len(done)
    numbers: dict[str, Any] = {
        "planned_retrains": len(order),
        "done_retrains": len(done),
        "left_out_retrains": left,
        "seconds_per_retrain": num(per_retrain, 3),
        "points": rows,
    }
    gap = None
    if calc is not None and len(done) >= 2:
        predicted_norms = calc.param_change(done).norm(dim=1).to(torch.float64).cpu()
        gap = metrics.taylor_gap(predicted_norms, torch.cat(norms).to(torch.float64).cpu())
    numbers["taylor_gap_spearman"] = num(gap.spearman) if gap else None
    numbers["taylor_gap_pearson"] = num(gap.pearson) if gap else None
    numbers["taylor_gap_median_ratio"] = num(gap.median_ratio) if gap else None
    rs = [r for r in pearson.values() if r is not None]
    if rs:
        reading = f"Predicted vs retrained removal effects: Pearson at least {num(min(rs))}"
    else:
        reading = "Too few retrains for a correlation"
    numbers["min_pearson"] = num(min(rs)) if rs else None
    reading += (
        f" over {len(done)} retrains; the budget left out {left} of {len(order)} planned."
        if left
        else f" over {len(done)} retrains (all planned)."
    )
    if gap is not None:
        reading += (
            f" Taylor gap: predicted vs retrained parameter-change norms Spearman "
            f"{show(numbers['taylor_gap_spearman'])}, median retrained/predicted ratio "
            f"{show(numbers['taylor_gap_median_ratio'])}."
        )
    return Retraining(Section("retraining", numbers, reading), pearson, scatter)
