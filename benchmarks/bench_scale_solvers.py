"""Curvature at scale: fit time, score time, peak memory and fidelity of the scalable solvers.

Each section is one solver family, in its own functions; every run happens in a fresh process
(so its peak resident memory is its own) on the same trained models:

* ``mlp``: the 85,002-parameter digits MLP 64→256→256→10 of ``bench_solvers.py``;
* ``cnn``: a small digits CNN (8x8 images, conv 1→8 → conv 8→16 stride 2 → linear 256→10).

For each solver we report the fit time, the time to score all training points against 10 test
points, peak memory, and the Pearson / Spearman correlation (mean over the test points) of its
scores with those of converged conjugate gradient on the same damped Hessian.

Sections: ``kfac`` (K-FAC and EK-FAC, true Fisher; at the heuristic damping and, reusing the
factors through ``with_damping``, at CG's damping; compared with CG on the Gauss-Newton matrix,
which is what they approximate, and with CG on H when that converged).
``arnoldi`` (Arnoldi at rank 10/50/200 with low-rank scoring, and the time to rescore at
another damping from the same projection; CG preconditioned by Arnoldi at rank 50, with its
iteration count against the reference CG's; ``--quick``: ranks 5/10/20).

Run:  python benchmarks/bench_scale_solvers.py [--quick] [--sections kfac] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import infl
from infl import metrics

WEIGHT_DECAY = 1e-3
DAMPING = 0.01
N_TEST = 10


# ---------------------------------------------------------------------------- shared set-up
def sizes(quick: bool) -> dict[str, int]:
    if quick:
        return {"n_train": 200, "width": 32, "channels": 4, "steps": 60, "cg_iter": 200}
    return {"n_train": 1500, "width": 256, "channels": 8, "steps": 300, "cg_iter": 500}


def make_model(kind: str, size: dict[str, int]) -> nn.Module:
    if kind == "mlp":
        w = size["width"]
        return nn.Sequential(
            nn.Linear(64, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10)
        )
    c = size["channels"]
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, c, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * c * 16, 10),
    )


def build(kind: str, quick: bool) -> tuple[dict[str, torch.Tensor], Any, Any]:
    """Train ``kind`` on digits (Adam, full batch, weight decay); return its state and data."""
    size = sizes(quick)
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    n = size["n_train"]
    model = make_model(kind, size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=WEIGHT_DECAY)
    for _ in range(size["steps"]):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:n]), y[:n]).backward()
        opt.step()
    return model.state_dict(), (x[:n], y[:n]), (x[n : n + N_TEST], y[n : n + N_TEST])


def calculator(
    kind: str, quick: bool, state: Any, train: Any, solver: infl.Solver, curvature: str = "hessian"
) -> Any:
    model = make_model(kind, sizes(quick))
    model.load_state_dict(state)
    model.eval()
    objective = infl.Objective("cross_entropy", weight_decay=WEIGHT_DECAY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", infl.InflWarning)  # the --quick models are not converged
        return infl.InfluenceCalculator(
            model, objective, train, solver, progress=False, curvature=curvature
        )


def peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def agreement(scores: Any, ref: Any) -> dict[str, float]:
    """Mean over test points of the Pearson / Spearman correlation with the reference."""
    if ref is None:  # the reference failed (its row says why)
        return {"pearson": float("nan"), "spearman": float("nan")}
    pairs = list(zip(np.asarray(scores), np.asarray(ref), strict=True))
    return {
        "pearson": round(float(np.mean([metrics.pearson(a, b) for a, b in pairs])), 4),
        "spearman": round(float(np.mean([metrics.spearman(a, b) for a, b in pairs])), 4),
    }


def run_cg(kind: str, quick: bool, state: Any, train: Any, test: Any, queue: mp.Queue) -> None:
    """The reference: conjugate gradient on H + DAMPING I to a tight tolerance."""
    _cg(kind, quick, state, train, test, "hessian", queue)


def run_cg_gauss_newton(
    kind: str, quick: bool, state: Any, train: Any, test: Any, queue: mp.Queue
) -> None:
    """Conjugate gradient on G + DAMPING I (Gauss-Newton: what K-FAC approximates; PSD)."""
    _cg(kind, quick, state, train, test, "gauss_newton", queue)


def _cg(
    kind: str, quick: bool, state: Any, train: Any, test: Any, curvature: str, queue: Any
) -> None:
    torch.set_num_threads(2)
    solver = infl.ConjugateGradient(damping=DAMPING, rtol=1e-8, max_iter=sizes(quick)["cg_iter"])
    calc = calculator(kind, quick, state, train, solver, curvature)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", infl.InflWarning)
        scores = calc.influence(test)
    result = calc.inverse_hvp(test)
    queue.put(
        {
            "model": kind,
            "solver": "cg" if curvature == "hessian" else f"cg_{curvature}",
            "params": calc.num_params,
            "seconds": round(time.perf_counter() - start, 2),
            "iterations": result.iterations,
            "max_residual": float(result.residual_norms.max()),
            "peak_mb": round(peak_mb()),
            "scores": scores,
        }
    )


# ---------------------------------------------------------------------------- section: kfac
def run_kfac(
    kind: str, quick: bool, state: Any, train: Any, test: Any, name: str, queue: mp.Queue
) -> None:
    """K-FAC or EK-FAC: fit once, score at the heuristic damping and at CG's damping."""
    torch.set_num_threads(2)
    solver = infl.KFAC() if name == "kfac" else infl.EKFAC()
    calc = calculator(kind, quick, state, train, solver)
    start = time.perf_counter()
    fitted = calc.fitted_solver()
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = calc.influence(test)
    score_s = time.perf_counter() - start
    same = calc.with_damping(DAMPING)  # reuses the factors: no data pass
    start = time.perf_counter()
    scores_at_cg_damping = same.influence(test)
    rescore_s = time.perf_counter() - start
    queue.put(
        {
            "model": kind,
            "solver": name,
            "params": calc.num_params,
            "fit_seconds": round(fit_s, 2),
            "score_seconds": round(score_s, 2),
            "rescore_other_damping_seconds": round(rescore_s, 2),
            "heuristic_damping": round(fitted.damping, 6),
            "data_passes": fitted.info["data_passes"],
            "peak_mb": round(peak_mb()),
            "scores": scores,
            "scores_at_cg_damping": scores_at_cg_damping,
        }
    )


def kfac_section(
    kind: str, quick: bool, state: Any, train: Any, test: Any, ref: Any, curvature: str
) -> list:
    """K-FAC / EK-FAC against CG on the Gauss-Newton matrix (and on H, when CG converged)."""
    rows = []
    if curvature == "gauss_newton":
        gn_ref, ref = ref, None
    else:
        gn = in_fresh_process(run_cg_gauss_newton, kind, quick, state, train, test)
        gn_ref = gn.pop("scores", None)
        rows.append(gn)
    for name in ("kfac", "ekfac"):
        row = in_fresh_process(run_kfac, kind, quick, state, train, test, name)
        scores = row.pop("scores", None)
        at_cg = row.pop("scores_at_cg_damping", None)
        for label, reference in (("cg_gauss_newton", gn_ref), ("cg_hessian", ref)):
            if scores is None or reference is None:
                continue
            row[f"vs_{label}_heuristic_damping"] = agreement(scores, reference)
            row[f"vs_{label}_damping_{DAMPING}"] = agreement(at_cg, reference)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- section: arnoldi
def arnoldi_ranks(quick: bool) -> tuple[int, ...]:
    return (5, 10, 20) if quick else (10, 50, 200)


def run_arnoldi(
    kind: str,
    quick: bool,
    state: Any,
    train: Any,
    test: Any,
    rank: int,
    curvature: str,
    queue: mp.Queue,
) -> None:
    """Arnoldi(rank): Lanczos fit, then low-rank scoring ([n, r] projection, no solve)."""
    torch.set_num_threads(2)
    solver = infl.Arnoldi(rank=rank, damping=DAMPING)
    calc = calculator(kind, quick, state, train, solver, curvature)
    start = time.perf_counter()
    fitted = calc.fitted_solver()
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = calc.influence(test)  # projects the training gradients once
    score_s = time.perf_counter() - start
    hvps = calc.operator.num_matvecs
    start = time.perf_counter()
    calc.with_damping(10 * DAMPING).influence(test)  # new weights, same projection
    rescore_s = time.perf_counter() - start
    info = fitted.info
    queue.put(
        {
            "model": kind,
            "solver": f"arnoldi_r{rank}",
            "params": calc.num_params,
            "fit_seconds": round(fit_s, 2),
            "score_seconds": round(score_s, 2),
            "rescore_other_damping_seconds": round(rescore_s, 2),
            "rescore_hvps": calc.operator.num_matvecs - hvps,
            "fit_hvps": info["num_hvps"],
            "rank_kept": info["rank"],
            "negatives_dropped": info["num_negative_dropped"],
            "eigenvalue_range": [info["min_eigenvalue"], info["max_eigenvalue"]],
            "ritz_residual_rel_max": info["ritz_residual_rel_max"],
            "peak_mb": round(peak_mb()),
            "scores": scores,
        }
    )


def run_pcg(
    kind: str,
    quick: bool,
    state: Any,
    train: Any,
    test: Any,
    rank: int,
    curvature: str,
    queue: mp.Queue,
) -> None:
    """CG preconditioned by Arnoldi(rank), to the reference CG's tolerance."""
    torch.set_num_threads(2)
    solver = infl.ConjugateGradient(
        damping=DAMPING,
        rtol=1e-8,
        max_iter=sizes(quick)["cg_iter"],
        preconditioner=infl.Arnoldi(rank=rank),
    )
    calc = calculator(kind, quick, state, train, solver, curvature)
    start = time.perf_counter()
    calc.fitted_solver()
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", infl.InflWarning)
        scores = calc.influence(test)
    score_s = time.perf_counter() - start
    result = calc.inverse_hvp(test)
    queue.put(
        {
            "model": kind,
            "solver": f"pcg_arnoldi_r{rank}",
            "params": calc.num_params,
            "fit_seconds": round(fit_s, 2),
            "score_seconds": round(score_s, 2),
            "iterations": result.iterations,
            "max_residual": float(result.residual_norms.max()),
            "peak_mb": round(peak_mb()),
            "scores": scores,
        }
    )


def arnoldi_section(
    kind: str, quick: bool, state: Any, train: Any, test: Any, ref: Any, curvature: str
) -> list:
    rows = []
    ranks = arnoldi_ranks(quick)
    jobs = [(run_arnoldi, rank) for rank in ranks] + [(run_pcg, ranks[1])]
    for fn, rank in jobs:
        row = in_fresh_process(fn, kind, quick, state, train, test, rank, curvature)
        row["curvature"] = curvature
        scores = row.pop("scores", None)
        if scores is not None and ref is not None:  # ref is None when the reference CG failed
            row["vs_cg"] = agreement(scores, ref)
        rows.append(row)
    return rows


SECTIONS: dict[str, Callable[..., list]] = {"kfac": kfac_section, "arnoldi": arnoldi_section}


# ---------------------------------------------------------------------------- driver
class _Row:
    """Collects the row a run puts, so that the child can send it without torch tensors."""

    def __init__(self) -> None:
        self.row: dict[str, Any] = {}

    def put(self, row: dict[str, Any]) -> None:
        self.row = row


def _child(fn: Callable[..., None], args: tuple[Any, ...], queue: mp.Queue) -> None:
    # torch pickles tensors put on a multiprocessing queue as shared-memory handles that the
    # parent can only open while the child is alive; send numpy arrays instead (a child
    # exiting right after put() would otherwise leave the parent waiting forever)
    collected = _Row()
    try:
        fn(*args, collected)
    except Exception as err:  # report it as a row: the parent must never wait forever
        collected.row = {"model": args[0], "solver": fn.__name__, "error": repr(err)[:300]}
    row = {
        k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
        for k, v in collected.row.items()
    }
    queue.put(row)


def in_fresh_process(fn: Callable[..., None], *args: Any) -> dict[str, Any]:
    """``fn(*args, queue)`` in a fresh spawned process; returns the row it put."""
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    row = queue.get()
    proc.join()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and data (smoke run)")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument(
        "--curvature",
        choices=("gauss_newton", "hessian"),
        default="gauss_newton",
        help="curvature of the reference CG, Arnoldi and PCG (the Hessian of these models is "
        "indefinite at damping 0.01, so CG on it fails; the Gauss-Newton matrix is PSD)",
    )
    args = parser.parse_args()
    rows = []
    reference = run_cg_gauss_newton if args.curvature == "gauss_newton" else run_cg
    for kind in args.models.split(","):
        state, train, test = build(kind, args.quick)
        cg = in_fresh_process(reference, kind, args.quick, state, train, test)
        ref = cg.pop("scores", None)  # None if CG failed (H + damping I indefinite)
        rows.append(cg)
        print(json.dumps(cg), flush=True)
        for section in args.sections.split(","):
            for row in SECTIONS[section](kind, args.quick, state, train, test, ref, args.curvature):
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
