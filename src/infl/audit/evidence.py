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
from tqdm.auto import tqdm

from infl import metrics
from infl.audit import thresholds as th
from infl.audit.report import Section, num, show
from infl.calculator import InfluenceCalculator
from infl.diagnostics import Spectrum, advise, compare_inverse_hvps
from infl.errors import InflError
from infl.objective import Objective
from infl.retrain import RetrainConfig, retrain_ground_truth
from infl.solvers import EKFAC, Arnoldi, ConjugateGradient, ExactHessian, LiSSA
from infl.solvers.base import Solver, SolveResult
from infl.store import Store

#: Iterations of a convergence trace kept in ``audit.json`` (evenly spaced, first and last).
TRACE_MAX_POINTS: int = 200


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
        "size": spec.size,
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
        "largest": [num(float(v)) for v in spec.largest[:10]],
        "smallest": [num(float(v)) for v in spec.smallest[:10]],
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


def convergence_trace(result: SolveResult, quantity: str) -> dict[str, Any] | None:
    """A solve's per-iteration history as JSON (``None`` for direct solvers, which have none).

    Parameters
    ----------
    result
        The solve; its ``trace`` is ``[iterations, k]``.
    quantity
        What the trace measures (``"relative residual"`` for CG, ``"relative increment"``
        for LiSSA: :attr:`~infl.solvers.SolveResult.trace`).

    Returns
    -------
    dict or None
        ``{"quantity", "iteration": [t], "values": [k lists of len(t)]}``; traces longer than
        :data:`TRACE_MAX_POINTS` keep evenly spaced iterations (the
        first and last always), values rounded with :func:`num`.
    """
    trace = result.trace
    if trace.dim() != 2 or trace.numel() == 0:
        return None
    steps = trace.shape[0]
    keep = np.unique(np.linspace(0, steps - 1, min(steps, TRACE_MAX_POINTS)).round())
    rows = trace.detach().to(torch.float64).cpu().numpy()[keep.astype(int)]
    return {
        "quantity": quantity,
        "iteration": [int(i) for i in keep],
        "values": [[num(float(v)) for v in rows[:, j]] for j in range(rows.shape[1])],
    }


def _numeric(values: list[Any] | tuple[Any, ...]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def solve_facts(result: SolveResult) -> dict[str, Any]:
    """The plain facts of ``result.info`` (numbers, strings, flags, short lists of numbers).

    What the solver reports about its fit and solve (damping, LiSSA's scale and depth,
    Arnoldi's kept eigenvalues, the exact solver's spectrum counts, ...), JSON-ready and
    rounded with :func:`num`; tensors and long lists are left out.
    """
    out: dict[str, Any] = {}
    for key, value in result.info.items():
        if isinstance(value, (bool, str)) or value is None:
            out[key] = value
        elif isinstance(value, (int, float)):
            out[key] = num(value)
        elif isinstance(value, (list, tuple)) and len(value) <= 20 and _numeric(value):
            out[key] = [num(v) for v in value]
    return out


def _trace_quantity(solver: Solver) -> str:
    return "relative increment" if isinstance(solver, LiSSA) else "relative residual"


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosines of two ``[k, p]`` tensors, in float64."""
    a, b = a.detach().to(torch.float64), b.detach().to(device=a.device, dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    norms = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
    return (a * b).sum(dim=1) / norms.clamp_min(tiny)


def cosine_matrix(values: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The smallest (over test points) cosine between every pair of solvers' inverse-HVPs.

    Parameters
    ----------
    values
        Solver name -> ``[k, p]`` inverse-HVPs of the same ``k`` test points.

    Returns
    -------
    dict
        ``{"solvers": names, "min_cosine": [[c_ab]]}``, symmetric with ones on the diagonal
        (for non-zero rows).
    """
    names = list(values)
    matrix = [[num(float(_cosines(values[a], values[b]).min())) for b in names] for a in names]
    return {"solvers": names, "min_cosine": matrix}


def agreement_evidence(
    ref: InfluenceCalculator,
    test: Any,
    ref_scores: torch.Tensor,
    solvers: dict[str, Solver],
    top_k: int,
) -> Section:
    """Cosine of inverse-HVPs, score Spearman and top-k overlap of each solver vs ``ref``.

    Each solver's row also records its iterations, whether it converged and its largest
    relative residual; ``traces`` holds the per-iteration history of every iterative solve
    (the reference's too, when it is CG), ``cosine_matrix`` the smallest cosine between
    every pair of solvers and ``solver_info`` what each solve reported
    (:func:`solve_facts`). A solver that cannot run on this model (for example EK-FAC on
    unsupported layers) is listed under ``skipped`` with the reason.
    """
    ref_result = ref.inverse_hvp(test)
    ref_x = ref_result.value
    grads = ref.train_grads()
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    traces: dict[str, Any] = {}
    ref_trace = convergence_trace(ref_result, _trace_quantity(ref.solver))
    if ref_trace is not None:
        traces["reference"] = ref_trace
    values = {"reference": ref_x}
    facts = {"reference": solve_facts(ref_result)}
    for name, solver in solvers.items():
        start = time.perf_counter()
        try:
            other = ref.with_solver(solver)
            result = other.inverse_hvp(test)
            x = result.value
            if x.shape != ref_x.shape:
                raise InflError(f"inverse-HVPs of shape {tuple(x.shape)} (low-rank)")
            agree = compare_inverse_hvps(x, ref_x, train_grads=grads)
            scores = -(x.to(grads.dtype) @ grads.T)
        except (InflError, RuntimeError, ValueError) as err:
            skipped.append({"solver": name, "reason": " ".join(str(err).split())[:160]})
            continue
        overlaps = _topk_overlaps(scores, ref_scores, top_k)
        residuals = result.residual_norms.detach().to(torch.float64)
        rows.append(
            {
                "solver": name,
                "min_cosine": num(agree.min_cosine),
                "mean_spearman": num(agree.mean_spearman),
                "min_top_k_overlap": num(min(overlaps)),
                "iterations": int(result.iterations),
                "converged": bool(result.converged),
                "max_residual": num(float(residuals.max())) if residuals.numel() else None,
                "seconds": num(time.perf_counter() - start, 3),
            }
        )
        values[name] = x
        facts[name] = solve_facts(result)
        trace = convergence_trace(result, _trace_quantity(solver))
        if trace is not None:
            traces[name] = trace
    good = [r for r in rows if (r["min_cosine"] or 0.0) >= th.AGREEMENT_COSINE]
    ref_res = ref_result.residual_norms.detach().to(torch.float64)
    numbers: dict[str, Any] = {
        "reference": type(ref.solver).__name__,
        "reference_iterations": int(ref_result.iterations),
        "reference_max_residual": num(float(ref_res.max())) if ref_res.numel() else None,
        "top_k": top_k,
        "solvers": rows,
        "skipped": skipped,
        "cosine_matrix": cosine_matrix(values),
        "traces": traces,
        "solver_info": facts,
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
    indices: list[int] | None = None,
) -> tuple[Section, list[float | None], list[float | None]]:
    """Top-k stability of each test point over a damping grid and Hessian vs Gauss-Newton.

    ``numbers["points"]`` holds, per test point (``indices``: their indices in the test data,
    default ``0..m-1``), the top-k overlap with the reference at each grid damping, their mean
    (``damping_stability``) and the overlap with the other curvature's scores.

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
    test_indices = list(range(m)) if indices is None else list(indices)
    numbers: dict[str, Any] = {
        "top_k": top_k,
        "damping": num(float(ref.fitted_solver().damping)),
        "damping_grid": [num(v) for v in grid],
        "min_damping_stability": num(min(values)) if values else None,
        "min_gauss_newton_overlap": num(min(v for v in gn if v is not None))
        if any(v is not None for v in gn)
        else None,
        "gauss_newton_skipped": gn_note or None,
        "points": [
            {
                "test_index": test_indices[j],
                "grid_overlaps": [num(row[j]) for row in per_grid],
                "damping_stability": stability[j],
                "gauss_newton_overlap": gn[j],
            }
            for j in range(m)
        ],
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

    @classmethod
    def from_section(cls, section: Section) -> Retraining:
        """Rebuild the record from its section (as stored in ``audit.json`` or a store)."""
        pearson = {int(r["test_index"]): r["pearson"] for r in section.numbers["points"]}
        scatter = {
            int(k): (list(v["predicted"]), list(v["actual"]))
            for k, v in section.numbers.get("scatter", {}).items()
        }
        return cls(section, pearson, scatter)


#: Retrains run between two checks of the deadline (and two saves of the progress record).
RETRAIN_BATCH: int = 4

#: Models up to this many parameters are retrained on one torch thread: for them the
#: per-operation threading overhead outweighs the parallel work (L-BFGS retrains of the
#: 131- and 253-parameter example MLPs ran ~26x faster on one thread than on torch's two, on a
#: shared 2-core machine); larger ones keep torch's setting.
SINGLE_THREAD_MAX_PARAMS: int = 100_000

#: The audit-store record that lists the finished retrains and the time they took.
PROGRESS_RECORD = "retraining_progress"


def planned_removals(
    predicted: torch.Tensor, per_point: int, random_per_point: int, seed: int
) -> list[int]:
    """The leave-one-out removals the retraining check wants, most wanted first.

    Each point's top-|influence| examples, alternating between the points rank by rank, then
    ``random_per_point`` random other examples (``seed``).

    Parameters
    ----------
    predicted
        ``[points, n]`` predicted removal effects.
    """
    n = predicted.shape[1]
    rng = np.random.default_rng(seed)
    order: list[int] = []
    tops = [
        np.argsort(-predicted[j].abs().cpu().numpy(), kind="stable")[:per_point]
        for j in range(predicted.shape[0])
    ]
    for rank in range(per_point):
        for top in tops:
            if rank < len(top) and int(top[rank]) not in order:
                order.append(int(top[rank]))
    rest = [i for i in range(n) if i not in order]
    if rest:
        extra = rng.choice(rest, size=min(len(rest), random_per_point), replace=False)
        order += [int(i) for i in extra]
    return order


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
    store: Store | None = None,
    progress: bool = False,
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
        Top-|influence| and random removals wanted per point (:func:`planned_removals`).
    deadline
        ``time.perf_counter()`` value by which retraining must stop; one retrain (and the
        control run) is always done to estimate the cost of one. Retrains then run in batches
        of :data:`RETRAIN_BATCH` while the estimated cost of one more fits before the deadline.
    seed
        Seeds the random removals.
    config
        The retraining protocol (default: warm-start L-BFGS).
    calc
        The calculator whose ``param_change`` predicts the parameter-change norms of the
        retrained removals (the Taylor gap, :func:`infl.metrics.taylor_gap`); ``None``: no
        Taylor gap.
    store
        The audit's store: each finished retrain is kept in its ``retrains/`` directory
        (:func:`infl.retrain_ground_truth`'s store) and the list of finished ones in the record
        :data:`PROGRESS_RECORD`, so an interrupted check resumes where it stopped, with the
        cost estimate and the time already spent. ``None``: nothing is kept.
    progress
        Show a tqdm bar over the planned retrains.
    """
    order = planned_removals(predicted, per_point, random_per_point, seed)
    cfg = config or RetrainConfig(init="warm", optimizer="lbfgs", max_steps=200, grad_tol=1e-7)
    retrains = None if store is None else store.root / "retrains"
    size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    threads = 1 if size <= SINGLE_THREAD_MAX_PARAMS else None

    misses: dict[int, float] = {}  # retrains (-1: the control run) that stopped above grad_tol

    def run(removals: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        gt = retrain_ground_truth(
            model,
            objective,
            train_data,
            test_select,
            removals,
            config=cfg,
            progress=False,
            store=retrains,
            num_threads=threads,
        )
        if cfg.grad_tol is not None:  # the audit silences InflWarning: record the misses
            for index, g in zip(removals, gt.grad_norm.tolist(), strict=True):
                if g > cfg.grad_tol:
                    misses[int(index)] = g
            if gt.control_grad_norm > cfg.grad_tol:
                misses[-1] = gt.control_grad_norm
        return gt.corrected_change, gt.param_change_norm

    changes: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []
    saved = store.load_json(PROGRESS_RECORD) if store is not None else None
    if saved is not None:  # resume: the finished retrains come back from the store
        done = [int(i) for i in saved["done"]]
        per_retrain, spent = float(saved["seconds_per_retrain"]), float(saved["seconds"])
        change, norm = run(done)
        changes.append(change)
        norms.append(norm)
    else:
        start = time.perf_counter()
        change, norm = run([order[0]])
        spent = time.perf_counter() - start
        per_retrain = spent / 2  # one removal + the control run
        done = [order[0]]
        changes.append(change)
        norms.append(norm)
    with tqdm(
        total=len(order), initial=len(done), desc="audit: retraining", disable=not progress
    ) as bar:
        while True:
            if store is not None:
                store.save_json(
                    PROGRESS_RECORD,
                    {"done": done, "seconds_per_retrain": per_retrain, "seconds": spent},
                )
            afford = int((deadline - time.perf_counter()) / max(per_retrain, 1e-9)) - 1
            batch = order[len(done) : len(done) + min(max(afford, 0), RETRAIN_BATCH)]
            if not batch:
                break
            start = time.perf_counter()
            change, norm = run(batch)
            took = time.perf_counter() - start
            # an exponential average of the cost per retrain: recent batches weigh most
            per_retrain = (per_retrain + took / len(batch)) / 2
            spent += took
            done += batch
            changes.append(change)
            norms.append(norm)
            bar.update(len(batch))
    actual = torch.cat(changes, dim=1).to(torch.float64)
    pred = predicted[:, done].to(torch.float64)
    rows = []
    pearson: dict[int, float | None] = {}
    scatter: dict[str, dict[str, list[float | int | None]]] = {}
    for j, index in enumerate(points):
        p, a = pred[j].cpu().numpy(), actual[j].cpu().numpy()
        enough = len(done) >= th.MIN_RETRAINS_FOR_CORRELATION and np.ptp(a) > 0 and np.ptp(p) > 0
        r = num(metrics.pearson(p, a)) if enough else None
        rho = num(metrics.spearman(p, a)) if enough else None
        pearson[index] = r
        scatter[str(index)] = {
            "predicted": [num(float(v), 6) for v in p],
            "actual": [num(float(v), 6) for v in a],
        }
        rows.append({"test_index": index, "pearson": r, "spearman": rho, "retrains": len(done)})
    left = len(order) - len(done)
    numbers: dict[str, Any] = {
        "planned_retrains": len(order),
        "done_retrains": len(done),
        "left_out_retrains": left,
        "seconds_per_retrain": num(per_retrain, 3),
        "retraining_seconds": num(spent, 3),
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
    numbers["grad_tol"] = cfg.grad_tol
    numbers["unconverged_retrains"] = sorted(misses)  # -1: the control run
    numbers["max_unconverged_grad_norm"] = num(max(misses.values()), 3) if misses else None
    if misses:
        reading += (
            f" Retrains stopped above grad_tol={cfg.grad_tol:g} (||grad J|| up to "
            f"{show(numbers['max_unconverged_grad_norm'])}) for removals {sorted(misses)} "
            "(-1: the control run): not leave-one-out minima (train the model to a minimum, "
            "e.g. infl.fit_to_minimum; a ReLU kink can also stop them)."
        )
    numbers["removed"] = done
    numbers["scatter"] = scatter
    return Retraining.from_section(Section("retraining", numbers, reading))
