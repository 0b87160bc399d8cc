"""``audit``: collect the evidence on a user's model and turn it into verdicts."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from infl.audit import thresholds as th
from infl.audit.evidence import (
    PROGRESS_RECORD,
    Retraining,
    agreement_evidence,
    curvature_evidence,
    default_solvers,
    reference_solver,
    retraining_evidence,
    sensitivity_evidence,
)
from infl.audit.report import AuditReport, PointVerdict, Section, num
from infl.audit.resume import audit_settings, open_evidence_store
from infl.audit.verdict import (
    model_checks,
    model_reasons,
    point_verdict,
    recommendations,
    summarize,
)
from infl.calculator import InfluenceCalculator
from infl.data import as_indexed
from infl.errors import InflWarning, InputError
from infl.model_checks import Stationarity
from infl.objective import Objective
from infl.solvers import ConjugateGradient
from infl.solvers.base import Solver


def pick_test_points(losses: torch.Tensor, num_test: int) -> list[int]:
    """Highest-loss, then median-loss, then evenly spread quantiles of the loss.

    Parameters
    ----------
    losses
        ``[m]`` test losses.
    num_test
        How many points to audit (at most ``m``).

    Returns
    -------
    list of int
        Distinct test indices, highest loss first, median second.
    """
    order = torch.argsort(losses, descending=True, stable=True).tolist()
    m = len(order)
    ranks = [0, m // 2]
    k = max(num_test, 2)
    ranks += [round(i * (m - 1) / (k - 1)) for i in range(k)]
    picked: list[int] = []
    for r in ranks:
        if order[r] not in picked and len(picked) < min(num_test, m):
            picked.append(order[r])
    for i in order:  # fill up if the quantiles collided
        if len(picked) >= min(num_test, m):
            break
        if i not in picked:
            picked.append(i)
    return picked


def _checked_indices(indices: list[int], m: int) -> list[int]:
    """``indices`` when they are distinct indices into ``m`` test points, else InputError."""
    for i in indices:
        if not 0 <= i < m:
            raise InputError(f"test index {i} is out of range: the test data has {m} points")
    if len(set(indices)) != len(indices):
        dup = next(i for i in indices if indices.count(i) > 1)
        raise InputError(f"test index {dup} is given twice")
    return list(indices)


def audit(
    model: nn.Module,
    objective: Objective,
    train_data: Any,
    test_data: Any,
    *,
    solvers: dict[str, Solver] | None = None,
    damping: float | None = None,
    curvature: str = "hessian",
    num_test: int = 2,
    test_indices: Sequence[int] | None = None,
    retrain_per_point: int = 8,
    random_per_point: int = 4,
    top_k: int = 10,
    budget_minutes: float = 5.0,
    seed: int = 0,
    store: str | os.PathLike[str] | None = None,
    fresh: bool = False,
    progress: bool = True,
) -> AuditReport:
    """Can these influence scores be trusted for this model? Evidence and verdicts.

    Parameters
    ----------
    model
        The trained module (eval mode). Not modified.
    objective
        Its training objective.
    train_data, test_data
        The training data (fixed order) and the test data to audit points from.
    solvers
        Solvers to compare with the reference (exact for ``p <= 2000``, else tight CG), by
        name; default: CG, LiSSA (auto scale), Arnoldi and EK-FAC at the damping used.
    damping
        The damping you intend to use (``None``: the advised one). If it leaves
        :math:`H + \\lambda I` indefinite, the advised damping is used and the report says so.
    curvature
        ``"hessian"`` or ``"gauss_newton"`` (the other one is the sensitivity comparison).
    num_test
        Test points to audit: the highest-loss, the median-loss, then loss quantiles.
    test_indices
        The test points to audit instead (distinct indices into ``test_data``, in this
        order; ``num_test`` is then ignored). The first two are retrained.
    retrain_per_point, random_per_point
        Leave-one-out retrains wanted per retrained point: its top-|influence| examples and
        random ones. Only the highest- and median-loss points are retrained.
    top_k
        ``k`` of the top-k overlaps (at most ``n``).
    budget_minutes
        Wall-clock budget of the whole audit; retraining gets what the other checks leave
        (at least one retrain and the control run, to estimate the cost of one).
    seed
        Seeds the random removals.
    store
        A directory that keeps each evidence section as it finishes
        (:mod:`infl.audit.resume`); rerunning with the same arguments and the same store loads
        the finished sections and continues an unfinished retraining check. A resumed audit's
        budget is what the finished work left of ``budget_minutes``. ``None``: nothing kept.
    fresh
        Delete the evidence in ``store`` first and start over (instead of refusing a store of
        other settings).
    progress
        Show a tqdm bar over the retrains.

    Returns
    -------
    AuditReport

    Raises
    ------
    InputError
        Bad arguments (counts, budget, test indices).
    StoreMismatchError
        ``store`` holds evidence of another model, objective, data or other arguments (the
        message names the first differing setting); pass ``fresh=True`` to start over.
    """
    if num_test < 1 or retrain_per_point < 1 or random_per_point < 0 or top_k < 1:
        raise InputError(
            "num_test, retrain_per_point and top_k must be >= 1, random_per_point >= 0"
        )
    if not budget_minutes > 0:
        raise InputError(f"budget_minutes must be positive, got {budget_minutes}")
    chosen = None if test_indices is None else [int(i) for i in test_indices]
    if chosen is not None and not chosen:
        raise InputError("test_indices must name at least one test point")
    with warnings.catch_warnings():
        # the audit reports stationarity, convergence and retraining quality itself
        warnings.simplefilter("ignore", InflWarning)
        return _collect(
            model,
            objective,
            train_data,
            test_data,
            solvers=solvers,
            damping=damping,
            curvature=curvature,
            num_test=num_test,
            test_indices=chosen,
            retrain_per_point=retrain_per_point,
            random_per_point=random_per_point,
            top_k=top_k,
            budget_minutes=budget_minutes,
            seed=seed,
            store=store,
            fresh=fresh,
            progress=progress,
        )


def _section(record: dict[str, Any], name: str) -> Section:
    """The section stored in ``record["section"]``."""
    sec = record["section"]
    return Section(name, sec["numbers"], sec["reading"])


def _as_json(section: Section) -> dict[str, Any]:
    return {"numbers": section.numbers, "reading": section.reading}


def _stationarity(stat: Stationarity) -> Section:
    """The stationarity section: gradient norm, drift ratio, implied weight decay."""
    station = {
        "grad_norm": num(stat.grad_norm),
        "grad_scale": num(stat.grad_scale),
        "drift_ratio": num(stat.drift_ratio),
        "is_minimum": stat.is_minimum,
        "wrong_weight_decay": stat.wrong_weight_decay,
        "implied_weight_decay": num(stat.implied_weight_decay),
    }
    reading = (
        f"At a minimum: drift ratio {station['drift_ratio']}."
        if stat.is_minimum
        else f"Not at a minimum: drift ratio {station['drift_ratio']} (gradient norm "
        f"{station['grad_norm']})."
    )
    return Section("stationarity", station, reading)


def _collect(
    model: nn.Module,
    objective: Objective,
    train_data: Any,
    test_data: Any,
    *,
    solvers: dict[str, Solver] | None,
    damping: float | None,
    curvature: str,
    num_test: int,
    test_indices: list[int] | None,
    retrain_per_point: int,
    random_per_point: int,
    top_k: int,
    budget_minutes: float,
    seed: int,
    store: str | os.PathLike[str] | None,
    fresh: bool,
    progress: bool,
) -> AuditReport:
    """The body of :func:`audit` (with the library's warnings silenced)."""
    start = time.perf_counter()
    test = as_indexed(test_data, "test data")
    if test_indices is not None:  # before a store is made for them
        test_indices = _checked_indices(test_indices, len(test))
    arguments = {
        "damping": damping,
        "curvature": curvature,
        "num_test": num_test if test_indices is None else None,
        "test_indices": test_indices,
        "retrain_per_point": retrain_per_point,
        "random_per_point": random_per_point,
        "top_k": top_k,
        "budget_minutes": budget_minutes,
        "seed": seed,
    }
    ev = open_evidence_store(
        store,
        audit_settings(model, objective, train_data, test_data, arguments, solvers),
        fresh=fresh,
        objective=objective,
    )
    base_start = time.perf_counter()
    base = InfluenceCalculator(
        model,
        objective,
        train_data,
        ConjugateGradient(),
        progress=False,
        curvature=curvature,
        check_minimum=not ev.has("stationarity"),
    )
    stationarity_seconds = time.perf_counter() - base_start  # the gradient pass
    n, p = base.num_train, base.num_params
    k = min(top_k, n)
    losses = torch.cat(
        [objective.per_example_loss(model, batch).detach() for _, batch in test.chunks(256)]
    )
    points = pick_test_points(losses.cpu(), num_test) if test_indices is None else test_indices
    sub = test.select(points)
    retrained = points[:2]

    def stationarity() -> dict[str, Any]:
        assert base.stationarity is not None
        return {
            "section": _as_json(_stationarity(base.stationarity)),
            "seconds": stationarity_seconds,
        }

    station_sec = _section(ev.record("stationarity", stationarity), "stationarity")

    def curvature_record() -> dict[str, Any]:
        c = curvature_evidence(base, damping)
        return {
            "section": _as_json(c.section),
            "damping": c.damping,
            "lambda_max": c.spectrum.lambda_max,
        }

    curv = ev.record("curvature", curvature_record)
    curv_sec = _section(curv, "curvature")
    used = float(curv["damping"])
    ref = base.with_solver(reference_solver(p, used))
    reference = ev.tensors(
        "reference",
        lambda: {
            "scores": ref.influence(sub),
            "predicted": ref.removal_effect(test.select(retrained)),
        },
    )
    ref_scores = reference["scores"]
    compared = solvers if solvers is not None else default_solvers(p, used)
    agreement = _section(
        ev.record(
            "solver_agreement",
            lambda: {"section": _as_json(agreement_evidence(ref, sub, ref_scores, compared, k))},
        ),
        "solver_agreement",
    )

    def sensitivity() -> dict[str, Any]:
        sec, _, _ = sensitivity_evidence(
            ref,
            model,
            objective,
            train_data,
            sub,
            ref_scores,
            float(curv["lambda_max"]),
            float(curv_sec.numbers["min_pd_damping"]),
            k,
            points,
        )
        return {"section": _as_json(sec)}

    sens = _section(ev.record("sensitivity", sensitivity), "sensitivity")
    stability = [row["damping_stability"] for row in sens.numbers["points"]]
    gn = [row["gauss_newton_overlap"] for row in sens.numbers["points"]]
    # the budget left: the finished sections' time counts, resumed or not
    partial = ev.load(PROGRESS_RECORD)
    spent_before = ev.resumed_seconds + (float(partial["seconds"]) if partial else 0.0)
    deadline = start + 60.0 * budget_minutes - spent_before

    def retraining() -> dict[str, Any]:
        r = retraining_evidence(
            model,
            objective,
            train_data,
            test.select(retrained),
            retrained,
            reference["predicted"],
            per_point=min(retrain_per_point, n),
            random_per_point=random_per_point,
            deadline=deadline,
            seed=seed,
            calc=ref,
            store=ev.store,
            progress=progress,
        )
        return {"section": _as_json(r.section)}

    retrain = Retraining.from_section(_section(ev.record("retraining", retraining), "retraining"))
    sections = [curv_sec, station_sec, agreement, sens, retrain.section]
    bad, caution = model_reasons(curv_sec.numbers, station_sec.numbers)
    levels = model_checks(curv_sec.numbers, station_sec.numbers)
    min_r = retrain.section.numbers["min_pearson"]
    verdicts: list[PointVerdict] = [
        point_verdict(
            index,
            num(float(losses[index])),
            bad,
            caution,
            retrain.pearson.get(index),
            index in retrain.pearson,
            min_r,
            stability[j],
            gn[j],
            levels,
        )
        for j, index in enumerate(points)
    ]
    settings = {
        "num_params": p,
        "num_train": n,
        "num_test": len(test),
        "audited_points": points,
        "retrained_points": retrained,
        "curvature": curvature,
        "damping_used": curv_sec.numbers["damping_used"],
        "budget_minutes": num(budget_minutes),
        "seconds": num(time.perf_counter() - start, 3),
        "resumed_sections": [name for name in ev.resumed if name != "reference"],
        "resumed_seconds": num(spent_before, 3),
        "seed": seed,
    }
    return AuditReport(
        sections=sections,
        points=verdicts,
        summary=summarize(verdicts),
        recommendations=recommendations(curv_sec.numbers, agreement.numbers, station_sec.numbers),
        settings=settings,
        thresholds=th.as_dict(),
        scatter=retrain.scatter,
    )


__all__ = ["audit", "pick_test_points"]
