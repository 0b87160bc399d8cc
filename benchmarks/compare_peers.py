"""infl side by side with other influence libraries: same models, data, damping and test points.

For each model (trained once, seeded) and each solver, infl and every installed peer that has
that solver run back to back in one process on the same problem:

    scores[j, i] = -grad l(z_test_j)^T (H + lambda I)^{-1} grad l(z_i)       ([m, n])

with ``H`` the Hessian of the mean training cross-entropy (no weight-decay term, for every
library: lambda is the only regulariser) in infl's sign (negative = helpful; each adapter in
``benchmarks/peers/`` states how it converts its library's sign). Reported per run: wall seconds
(from the library's constructor to the ``[m, n]`` scores), Pearson of its scores with the exact
answer (mean over test points), and for infl its floor: the HVPs its solver's algorithm needs
times the time of one such HVP (timed alone), plus one per-sample-gradient pass over train and
test (see ``floor_seconds``).

Models: ``iris`` (MLP 4-5-3, p = 43, n = 120, float64, 2 test points), ``cnn`` (infl's
``small_cnn``, p = 2,514, n = 1,438 digits images, float64, 2 test points), ``mlp`` (64-256-256-10,
p = 85,002, n = 1,438 digits, float32, 10 test points). The exact reference is infl's dense
float64 solve (the ``exact`` row) when it runs, else conjugate gradient on a float64 copy to a
relative residual of 1e-10 (``mlp``, or when ``exact`` is not among ``--solvers``).

Solvers: exact (dense Hessian; on the CNN only with ``--cnn-exact``: minutes for every library,
and peers' dense Hessians are not run above ``--peer-exact-max-p``), CG 100, LiSSA (Iris: full
batch, depth 5000; CNN: batch 128, depth 500 by default, ``--lissa-depth``; every library gets
infl's automatic scale sigma, estimated once beforehand, and runs the full depth), Arnoldi (rank
10 / Krylov 30 on Iris, rank 50 / Krylov 100 otherwise), K-FAC and EK-FAC. Runs under 2 s are
repeated for about 2 s more (3 to 201 runs in all, the best kept) for every library alike; a
peer's run is stopped after ``--peer-timeout`` seconds.

``--variants`` adds columns for infl's opt-in options (``variants``): float32 curvature
products on the float64 models, CG preconditioned by 20 Arnoldi eigenpairs, and K-FAC/EK-FAC
with the exact expectation over the labels. ``--ladder`` also runs every library's CG and
LiSSA at smaller budgets and reports the time to equal accuracy (``time_to_accuracy.py``).
``--seeds S`` draws every library's stochastic runs (minibatch LiSSA; K-FAC / EK-FAC with
sampled labels) at seeds ``0 .. S-1`` and reports their mean accuracy (the time is seed 0's),
so that a lucky or unlucky draw does not decide "as accurate".
Accuracy is
reported as Pearson and as the largest relative error over test points; the column "best infl
at equal accuracy" picks the fastest infl run as accurate as the fastest peer's (Pearson and
relative error; see ``finish``).

Peers (pyDVL, Captum, dattri, kronfluence) are never infl dependencies: install them in a
separate virtualenv (benchmarks/README.md, "Side by side with peers"); any that is missing is
skipped with a note, so the script also runs with infl alone.

Run:  python benchmarks/compare_peers.py [--quick] [--models iris,mlp,cnn]
          [--solvers exact,cg,lissa,arnoldi,kfac,ekfac] [--peers pydvl,captum,dattri,kronfluence]
          [--cnn-exact] [--lissa-depth T] [--peer-timeout 300] [--peer-exact-max-p 1000]
          [--threads 1] [--cg-rtol 1e-10] [--variants] [--ladder] [--seeds 1] [--json out.json]
(about 7 minutes on a quiet 2-core machine; each model's rows are printed to stderr and saved
to the JSON file as soon as they are final).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import random
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import infl
from infl import metrics
from infl.studies import datasets, models

sys.path.insert(0, str(Path(__file__).resolve().parent))
import time_to_accuracy as tta
from peers import ALL as PEERS
from peers.common import Problem, Setting

TRAIN_DECAY = 1e-3  # weight decay used to *train* (so the models sit near a minimum)
DAMPING = {"iris": 0.01, "cnn": 0.01, "mlp": 0.1}
QUICK_DAMPING = 1.0  # the --quick models are barely trained: their Hessians are indefinite
N_TEST = {"iris": 2, "cnn": 2, "mlp": 10}
CHUNK = 256
# LiSSA depth T: the 5000 on Iris; 500 on the CNN so that the full comparison fits
# in ~20 minutes on a shared 2-core machine (each step costs the same in every library, so the
# ratio does not depend on T; Pearson does). --lissa-depth 5000 restores the setting.
LISSA_DEPTH = {"iris": 5000, "cnn": 500}
SOLVERS = ("exact", "cg", "lissa", "arnoldi", "kfac", "ekfac")


# ---------------------------------------------------------------------------- problems
def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lbfgs: bool) -> None:
    """Full-batch training on mean cross-entropy + (TRAIN_DECAY / 2) ||theta||^2."""
    params = list(model.parameters())

    def objective() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        return loss + 0.5 * TRAIN_DECAY * sum((q * q).sum() for q in params)

    if lbfgs:
        opt: torch.optim.Optimizer = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=steps,
            tolerance_grad=1e-12,
            tolerance_change=1e-15,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = objective()
            value.backward()
            return value

        opt.step(closure)  # type: ignore[arg-type]
    else:
        opt = torch.optim.Adam(params, lr=1e-2 if x.dim() > 2 else 1e-3)
        for _ in range(steps):
            opt.zero_grad()
            objective().backward()
            opt.step()
    model.eval()


def build_problem(name: str, quick: bool, n_train: int | None = None) -> Problem:
    """Train the model ``name`` once (seed 0) and return it with its data.

    ``n_train`` keeps only the first ``n_train`` training examples (before training).
    """
    torch.manual_seed(0)
    if name == "iris":
        split = datasets.load_iris(seed=0, dtype=torch.float64)
        model: nn.Module = models.mlp(4, 3, width=5, depth=1, seed=0).double()
        x, y = split.x_train, split.y_train
        _train(model, x, y, steps=50 if quick else 500, lbfgs=True)
    elif name == "cnn":
        split = datasets.load_digits(seed=0, images=True, dtype=torch.float64)
        model = models.small_cnn(seed=0).double()
        n = n_train or (200 if quick else split.n_train)
        x, y = split.x_train[:n], split.y_train[:n]
        _train(model, x, y, steps=50 if quick else 500, lbfgs=False)
    elif name == "mlp":
        split = datasets.load_digits(seed=0, dtype=torch.float32)
        width = 32 if quick else 256
        model = models.mlp(64, 10, width=width, depth=2, seed=0)
        n = n_train or (200 if quick else split.n_train)
        x, y = split.x_train[:n], split.y_train[:n]
        _train(model, x, y, steps=50 if quick else 300, lbfgs=False)
    else:
        raise SystemExit(f"unknown model {name!r}: choose from iris, cnn, mlp")
    for q in model.parameters():
        q.requires_grad_(True)
    m = N_TEST[name]
    return Problem(name, model, x, y, split.x_test[:m], split.y_test[:m])


def settings(
    problem: Problem,
    quick: bool,
    scale: Callable[[float, int | None], float],
    lissa_depth: int | None = None,
    cnn_exact: bool = False,
    cg_rtol: float = 1e-10,
) -> dict[str, Setting]:
    """The solver settings for ``problem`` (``scale(damping, batch)`` gives LiSSA's sigma).

    The dense Hessian of the CNN (2,514 HVPs over 1,438 examples: minutes) is opt-in.
    """
    lam = QUICK_DAMPING if quick else DAMPING[problem.name]
    depth = 50 if quick else LISSA_DEPTH.get(problem.name, 1000)
    if lissa_depth is not None:
        depth = lissa_depth
    out = {
        "exact": Setting("exact", lam),
        "cg": Setting("cg", lam, max_iter=10 if quick else 100, rtol=cg_rtol),
        "arnoldi": Setting(
            "arnoldi",
            lam,
            rank=min(10 if problem.name == "iris" else 50, problem.p // 2) if not quick else 5,
            krylov=min(30 if problem.name == "iris" else 100, problem.p) if not quick else 15,
        ),
        "kfac": Setting("kfac", lam),
        "ekfac": Setting("ekfac", lam),
    }
    if problem.name != "mlp":
        batch = None if problem.name == "iris" else 128
        out["lissa"] = Setting("lissa", lam, depth=depth, batch_size=batch, scale=scale(lam, batch))
    if problem.p > 20_000 or (problem.name == "cnn" and not cnn_exact):
        del out["exact"]
    return out


# ---------------------------------------------------------------------------- infl
def objective() -> infl.Objective:
    return infl.Objective("cross_entropy", weight_decay=0.0)


def infl_solver(
    setting: Setting, preconditioner: infl.Solver | None = None, **options: Any
) -> infl.Solver:
    """infl's solver for ``setting``; ``options`` are extra solver fields (a variant's)."""
    solver = _default_solver(setting, preconditioner)
    return dataclasses.replace(solver, **options) if options else solver


def _default_solver(setting: Setting, preconditioner: infl.Solver | None) -> infl.Solver:
    lam = setting.damping
    if setting.method == "exact":
        return infl.ExactHessian(damping=lam)
    if setting.method == "cg":
        return infl.ConjugateGradient(
            damping=lam,
            rtol=setting.rtol,
            max_iter=setting.max_iter,
            preconditioner=preconditioner,
        )
    if setting.method == "lissa":
        return infl.LiSSA(
            damping=lam,
            scale=setting.scale,
            depth=setting.depth,
            batch_size=setting.batch_size,
            rtol=1e-300,  # run the full depth, as every peer is asked to
        )
    if setting.method == "arnoldi":
        return infl.Arnoldi(rank=setting.rank, krylov_dim=setting.krylov, damping=lam)
    if setting.method == "kfac":
        return infl.KFAC(damping=lam)
    if setting.method == "ekfac":
        return infl.EKFAC(damping=lam)
    raise ValueError(setting.method)


def calculator(problem: Problem, solver: infl.Solver, **options: Any) -> infl.InfluenceCalculator:
    """infl's calculator for ``problem``: ``chunk_size=CHUNK`` unless ``options`` say else."""
    options.setdefault("chunk_size", CHUNK)
    return infl.InfluenceCalculator(
        problem.fresh_model(),
        objective(),
        (problem.x_train, problem.y_train),
        solver,
        progress=False,
        check_minimum=False,
        **options,
    )


Variant = dict[str, Any]
"""An infl option set beside the default run: ``calculator`` keywords, ``preconditioner`` (an
unfitted solver) for CG, and ``solver`` (a dict of solver fields)."""


def variants(problem: Problem, setting: Setting) -> dict[str, Variant]:
    """infl's opt-in speed options worth a row of their own for this model and solver.

    ``float32 products`` (float64 models): the curvature products in float32, the answer in
    float64 (CG refines against float64 products to the same rtol; LiSSA and Arnoldi use the
    float32 products, their own error being far larger than float32 round-off).
    ``Arnoldi-20 preconditioned`` (CG): PCG whose preconditioner inverts the top 20 eigenpairs
    found by 40 Lanczos steps. ``K-FAC preconditioned`` / ``EK-FAC preconditioned`` (CG):
    PCG whose preconditioner is infl's K-FAC / EK-FAC at the same damping (one factor pass,
    two for EK-FAC; with float32 products on the float64 models). ``block`` (CG):
    ``block=True``, breakdown-free block CG (one Krylov space shared by the right-hand
    sides), alone and with the options above.
    ``exact label expectation`` (K-FAC, EK-FAC):
    ``mc_samples="exact"``, the true Fisher's expectation over the labels instead of one
    sampled label per example. ``empirical Fisher`` (K-FAC, EK-FAC): ``fisher="empirical"``,
    the data's labels instead of sampled ones: the curvature dattri's EK-FAC estimates (its
    covariance and eigenvalue passes differentiate the task's loss at the data's labels), and
    deterministic. ``control variate`` (minibatch LiSSA):
    ``snapshot_every="auto"``, a full-data product at an anchor every ``4n/b`` steps, so the
    recursion converges instead of stalling at the minibatch noise (same scale and depth).
    ``partition`` (minibatch LiSSA): ``sampling="partition"``, the blocks of a fixed random
    partition visited once per epoch, each keeping its gradient graph (a step is one
    double-backward pass), alone and with the control variate.
    ``every Ritz pair`` (Arnoldi): ``rank = krylov_dim``, every Ritz pair of the same Lanczos
    run instead of the top half. ``every Ritz pair, complement`` (Arnoldi, damping > 0): the
    same with ``complement=True``, the part of each gradient outside the Krylov space scaled by
    ``1/lambda`` instead of dropped (no extra HVP; scoring then needs the full train gradients).
    """
    method = setting.method
    out: dict[str, Variant] = {}
    if problem.dtype == torch.float64 and method in ("cg", "lissa", "arnoldi"):
        out["float32 products"] = {"curvature_dtype": torch.float32}
    if method == "cg" and problem.p > 1_000:
        out["Arnoldi-20 preconditioned"] = {"preconditioner": infl.Arnoldi(rank=20, krylov_dim=40)}
    if method == "cg":
        out["block"] = {"solver": {"block": True}}
        if problem.dtype == torch.float64:
            out["block, float32 products"] = {
                "solver": {"block": True},
                "curvature_dtype": torch.float32,
            }
        if problem.p > 1_000:
            out["block, Arnoldi-20 preconditioned"] = {
                "solver": {"block": True},
                "preconditioner": infl.Arnoldi(rank=20, krylov_dim=40),
            }
            low = problem.dtype == torch.float64
            suffix = ", float32 products" if low else ""
            for name, pre in (("K-FAC", infl.KFAC()), ("EK-FAC", infl.EKFAC())):
                fields: Variant = {"preconditioner": pre}
                if low:
                    fields["curvature_dtype"] = torch.float32
                out[f"{name} preconditioned{suffix}"] = fields
                out[f"block, {name} preconditioned{suffix}"] = {**fields, "solver": {"block": True}}
    if method == "arnoldi" and setting.krylov > setting.rank:
        out["every Ritz pair"] = {"solver": {"rank": setting.krylov}}
        if problem.dtype == torch.float64:
            out["every Ritz pair, float32 products"] = {
                "solver": {"rank": setting.krylov},
                "curvature_dtype": torch.float32,
            }
    if method == "arnoldi" and setting.damping > 0:
        complement = {"rank": setting.krylov, "complement": True}
        out["every Ritz pair, complement"] = {"solver": complement}
        if problem.dtype == torch.float64:
            out["every Ritz pair, complement, float32 products"] = {
                "solver": complement,
                "curvature_dtype": torch.float32,
            }
    if method in ("kfac", "ekfac"):
        out["exact label expectation"] = {"solver": {"mc_samples": "exact"}}
        out["empirical Fisher"] = {"solver": {"fisher": "empirical"}}
    if method == "lissa" and problem.name != "iris":  # minibatch LiSSA
        lissa_options = {
            "control variate": {"snapshot_every": "auto"},
            "partition": {"sampling": "partition"},
            "partition, control variate": {"sampling": "partition", "snapshot_every": "auto"},
        }
        for name, fields in lissa_options.items():
            out[name] = {"solver": fields}
            if problem.dtype == torch.float64:
                out[f"{name}, float32 products"] = {
                    "solver": fields,
                    "curvature_dtype": torch.float32,
                }
    return out


def run_infl(
    problem: Problem, setting: Setting, variant: Variant | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """infl's scores and its run record: seconds, solver iterations, full-data HVPs made."""
    options = dict(variant or {})
    pre = options.pop("preconditioner", None)
    solver_options = options.pop("solver", {})
    start = time.perf_counter()
    calc = calculator(problem, infl_solver(setting, pre, **solver_options), **options)
    scores = calc.influence((problem.x_test, problem.y_test))
    seconds = time.perf_counter() - start
    result = calc.inverse_hvp((problem.x_test, problem.y_test))
    run = {
        "seconds": seconds,
        "iterations": int(result.iterations),
        "matvecs": int(getattr(calc.operator, "num_matvecs", 0)),
    }
    return scores.detach(), run


def lissa_scale(problem: Problem, damping: float, batch: int | None) -> float:
    """sigma = infl's automatic LiSSA scale for this batch size (estimated once, untimed)."""
    solver = infl.LiSSA(damping=damping, scale="auto", depth=1, batch_size=batch)
    calc = calculator(problem, solver)
    return float(calc.fitted_solver().info["scale"])


def _best_time(fn: Callable[[], Any], repeat: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def floor_seconds(problem: Problem, setting: Setting, iterations: int) -> float | None:
    """The HVPs the solver's algorithm needs x the time of one (timed alone) + one gradient pass.

    exact: ``p`` HVPs (timed in blocks of ``min(p, 128)`` vectors); CG: ``iterations`` HVPs of
    the block of ``m`` test vectors; LiSSA: ``iterations`` (steps) HVPs of ``m`` vectors on the
    step's batch (full data, or a minibatch of ``batch_size``); Arnoldi: ``krylov``
    single-vector HVPs. The gradient pass is one per-example gradient over train and test.
    K-FAC / EK-FAC make no HVP: ``None``. The HVP is ``calc.operator.matmat`` (or its
    ``subsample``), i.e. infl's own, so a ratio below 1 means the solver found a cheaper route
    than these products (e.g. assembling a tiny Hessian once).
    """
    if setting.method in ("kfac", "ekfac"):
        return None
    calc = calculator(problem, infl.ConjugateGradient(damping=setting.damping))
    op = calc.operator
    dtype, p, m = problem.dtype, problem.p, problem.m
    data = infl.IndexedData((problem.x_train, problem.y_train))
    test = infl.IndexedData((problem.x_test, problem.y_test))
    t_grads = _best_time(
        lambda: (
            [calc.wrapper.train_grads(b) for _, b in data.chunks(CHUNK)]
            + [calc.wrapper.train_grads(b) for _, b in test.chunks(CHUNK)]
        ),
        repeat=1,
    )
    if setting.method == "exact":
        block = min(p, 128)
        vecs = torch.randn(block, p, dtype=dtype)
        return _best_time(lambda: op.matmat(vecs), repeat=1) * math.ceil(p / block) + t_grads
    if setting.method == "arnoldi":
        vec = torch.randn(1, p, dtype=dtype)
        return _best_time(lambda: op.matmat(vec), repeat=2) * setting.krylov + t_grads
    vecs = torch.randn(m, p, dtype=dtype)
    if setting.method == "lissa" and setting.batch_size is not None:
        gen = torch.Generator().manual_seed(0)
        batch = setting.batch_size
        t_step = _best_time(lambda: op.subsample(batch, gen).matmat(vecs), repeat=10)
    else:
        t_step = _best_time(lambda: op.matmat(vecs), repeat=2)
    return t_step * iterations + t_grads


def reference(problem: Problem, exact_scores: torch.Tensor | None, damping: float) -> torch.Tensor:
    """The exact answer: infl's dense float64 solve when it ran, else float64 CG to 1e-10."""
    if exact_scores is not None:
        return exact_scores
    big = Problem(
        problem.name,
        problem.fresh_model().double(),
        problem.x_train.double(),
        problem.y_train,
        problem.x_test.double(),
        problem.y_test,
    )
    solver = infl.ConjugateGradient(damping=damping, rtol=1e-10, max_iter=2000)
    return calculator(big, solver).influence((big.x_test, big.y_test)).detach()


def relative_error(scores: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest over test points of ``||s_j - ref_j|| / ||ref_j||`` (float64)."""
    a, b = scores.detach().double(), ref.detach().double()
    if a.shape != b.shape:
        return float("nan")
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def pearson(scores: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over test points of the Pearson correlation with the reference."""
    a = np.asarray(scores.detach().double())
    b = np.asarray(ref.detach().double())
    if a.shape != b.shape:
        return float("nan")
    return float(np.mean([metrics.pearson(u, v) for u, v in zip(a, b, strict=True)]))


# ---------------------------------------------------------------------------- one comparison
class PeerTimeout(Exception):
    """A peer's run passed ``--peer-timeout`` seconds and was stopped."""


def _alarm(signum: int, frame: Any) -> None:
    raise PeerTimeout


def _with_timeout(fn: Callable[[], Any], seconds: int) -> Any:
    """``fn()``, stopped by SIGALRM after ``seconds`` (0: no limit).

    The alarm interrupts Python code; a single long C++ call finishes before it is stopped.
    """
    if seconds <= 0:
        return fn()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# "equally accurate" (Pearson and largest relative error) is time_to_accuracy.as_accurate

SHORT = 2.0  # seconds: runs faster than this are repeated (for about this long) and the best kept
ONCE_MORE = 10.0  # seconds: runs faster than this (and not SHORT) are run twice, the best kept
MAX_REPEATS = 200  # the most repeats of a short run


def stochastic(setting: Setting) -> bool:
    """Whether every library's answer for ``setting`` depends on a random draw: minibatch
    LiSSA (the minibatches) and K-FAC / EK-FAC (the sampled labels of the true Fisher)."""
    if setting.method == "lissa":
        return setting.batch_size is not None
    return setting.method in ("kfac", "ekfac")


def seed_everything(seed: int) -> None:
    """Seed the global generators a peer may draw from (torch, NumPy, ``random``)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the legacy global generator is what a peer may use)
    torch.manual_seed(seed)


def _more_draws(
    run: dict[str, Any], draw: Callable[[int], torch.Tensor], seeds: int
) -> dict[str, Any]:
    """``run`` with ``seed_scores``: the scores of seeds ``1 .. seeds - 1`` (untimed), which
    :func:`finish` averages with the timed seed-0 run's accuracy."""
    if seeds > 1 and "scores" in run:
        run["seed_scores"] = [draw(seed) for seed in range(1, seeds)]
    return run


def _repeat_if_short(fn: Callable[[], tuple[torch.Tensor, dict[str, Any]]]) -> dict[str, Any]:
    """Run ``fn``; when it took under ``SHORT`` s, run it again until the repeats have taken
    ``SHORT`` s (at least twice, at most ``MAX_REPEATS`` times) and keep the best time; when
    it took under ``ONCE_MORE`` s, run it once more and keep the better.

    A first call pays one-time costs (lazy imports, torch.func tracing caches, allocator
    warm-up) that dominate sub-second runs, and the best of three runs of a job of a few
    milliseconds moved by 20-30 % between passes (the Iris rows). A peer's first run of a few
    seconds pays them too: pyDVL's three-iteration CG on the digits MLP took 5.6-17 s in a
    process's first call and 2.0-2.7 s in the next ones. Every library gets the same
    treatment. ``repeats`` records how many runs the best was taken from.
    """
    scores, run = fn()
    runs = 1
    if SHORT <= run["seconds"] < ONCE_MORE:
        _, again = fn()
        runs += 1
        if again["seconds"] < run["seconds"]:
            run = again
    elif run["seconds"] < SHORT:
        spent = 0.0
        while runs < 3 or (spent < SHORT and runs <= MAX_REPEATS):
            _, again = fn()
            runs += 1
            spent += again["seconds"]
            if again["seconds"] < run["seconds"]:
                run = again
    run["scores"] = scores
    run["repeats"] = runs
    return run


def compare(
    problem: Problem,
    name: str,
    setting: Setting,
    peers: list[Any],
    timeout: int,
    exact_max_p: int,
    with_variants: bool = False,
    seeds: int = 1,
) -> dict[str, Any]:
    """infl (and its ``variants`` when asked), then every peer with ``setting.method``.

    For a :func:`stochastic` setting every run is seeded (infl: the solver's ``seed``; a peer:
    :func:`seed_everything` before its run) and, with ``seeds > 1``, drawn again at seeds
    ``1 .. seeds - 1`` untimed: its accuracy is then the mean over the draws.
    """
    draws = seeds if stochastic(setting) else 1
    row: dict[str, Any] = {
        "model": problem.name,
        "p": problem.p,
        "n": problem.n,
        "m": problem.m,
        "dtype": str(problem.dtype).replace("torch.", ""),
        "solver": setting.label(),
        "method": name,
        "damping": setting.damping,
        "runs": {},
        "skipped": {},
    }
    if name == "lissa":
        row["scale"] = setting.scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options: dict[str, Variant] = {"": {}}
        if with_variants:
            options.update(variants(problem, setting))
        for label, variant in options.items():
            key = f"infl, {label}" if label else "infl"

            def infl_draw(seed: int, variant: Variant = variant) -> torch.Tensor:
                seeded = {**variant, "solver": {**variant.get("solver", {}), "seed": seed}}
                return run_infl(problem, setting, seeded)[0]

            try:
                row["runs"][key] = _more_draws(
                    _repeat_if_short(lambda variant=variant: run_infl(problem, setting, variant)),
                    infl_draw,
                    draws,
                )
            except Exception as err:
                traceback.print_exc(limit=3, file=sys.stderr)
                row["runs"][key] = {"error": f"{type(err).__name__}: {err}"[:300]}
        for peer in peers:
            why = peer.supports(problem, setting)
            if why is None and name == "exact" and problem.p > exact_max_p:
                why = (
                    f"peers' dense Hessians are not run above p = {exact_max_p:,} "
                    "(--peer-exact-max-p): pyDVL's took 186 s and 3.4 GB at p = 2,514, n = 200 "
                    "on the shared machine"
                )
            if why is not None:
                row["skipped"][peer.NAME] = why
                continue

            def run_peer(peer: Any = peer, seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
                seed_everything(seed)
                start = time.perf_counter()
                scores = peer.scores(problem, setting)
                return scores, {"seconds": time.perf_counter() - start}

            def peer_draw(seed: int, peer: Any = peer) -> torch.Tensor:
                return run_peer(peer, seed)[0]

            try:
                row["runs"][peer.NAME] = _with_timeout(
                    lambda: _more_draws(_repeat_if_short(run_peer), peer_draw, draws),
                    timeout * draws,
                )
            except PeerTimeout:
                row["runs"][peer.NAME] = {"error": f"stopped after {timeout} s", "timeout": timeout}
            except Exception as err:
                traceback.print_exc(limit=3, file=sys.stderr)
                row["runs"][peer.NAME] = {"error": f"{type(err).__name__}: {err}"[:300]}
    return row


def finish(
    row: dict[str, Any], problem: Problem, setting: Setting, ref: torch.Tensor | None
) -> None:
    """Accuracy against the reference, the fastest peer, infl's floor and its best option.

    A run with ``seed_scores`` (``--seeds``) gets the mean Pearson and relative error over its
    draws, and the draws' Pearsons as ``pearson_seeds``.

    ``best_infl``: the fastest infl run (default or a variant) as accurate as the fastest
    peer's (:func:`time_to_accuracy.as_accurate`): the ratio at equal accuracy, all at the
    setting's own budget. With ``--ladder`` runs (keys ``"<library> @ <budget>"``) also
    ``strictest`` (:func:`time_to_accuracy.strictest`).
    """
    for run in row["runs"].values():
        scores = run.pop("scores", None)
        if scores is not None and ref is None:
            run["pearson"] = run["relative_error"] = float("nan")
        elif scores is not None:
            draws = [scores, *run.pop("seed_scores", [])]
            run["pearson"] = float(np.mean([pearson(s, ref) for s in draws]))
            run["relative_error"] = float(np.mean([relative_error(s, ref) for s in draws]))
            if len(draws) > 1:
                run["pearson_seeds"] = [pearson(s, ref) for s in draws]
    ours = row["runs"].get("infl", {})
    own_budget = {k: v for k, v in row["runs"].items() if tta.SEPARATOR not in k}
    peers = {k: v for k, v in own_budget.items() if not k.startswith("infl") and "seconds" in v}
    if peers:
        fastest = min(peers, key=lambda k: peers[k]["seconds"])
        row["fastest_peer"] = fastest
        if "seconds" in ours:
            row["infl_over_fastest_peer"] = ours["seconds"] / peers[fastest]["seconds"]
        ok = {
            k: v
            for k, v in own_budget.items()
            if k.startswith("infl") and "seconds" in v and tta.as_accurate(v, peers[fastest])
        }
        if ok:
            best = min(ok, key=lambda k: ok[k]["seconds"])
            row["best_infl"] = best
            row["best_infl_over_fastest_peer"] = ok[best]["seconds"] / peers[fastest]["seconds"]
    if any(tta.SEPARATOR in k for k in row["runs"]):
        row["budget"] = tta.budget_label(setting)
        row["strictest"] = tta.strictest(row)
    if "seconds" in ours:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            floor = floor_seconds(problem, setting, ours["iterations"])
        if floor is not None:
            row["infl_floor_seconds"] = floor
            row["infl_over_floor"] = ours["seconds"] / floor


# ---------------------------------------------------------------------------- output
def _cell(run: dict[str, Any] | None) -> str:
    if run is None:
        return "—"
    if "timeout" in run:
        return f"> {run['timeout']} s (stopped)"
    if "error" in run:
        return "fails"
    err = run.get("relative_error", float("nan"))
    return f"{run['seconds']:.3g} s ({run['pearson']:.3f}; {err:.0e})"


def _ratio(ratio: float | None, who: str | None) -> str:
    if ratio is None:
        return "—"
    if ratio >= 1:
        return f"{ratio:.2g}× slower ({who})"
    return f"{1 / ratio:.2g}× faster ({who})"


def table(rows: list[dict[str, Any]], peer_names: list[str]) -> str:
    """Markdown: one row per (model, solver); infl, its option variants, then each peer."""
    variant_names = sorted(
        {
            k
            for row in rows
            for k in row["runs"]
            if k.startswith("infl, ") and tta.SEPARATOR not in k  # ladder runs: tta.all_runs
        }
    )
    head = [
        "model",
        "solver",
        "infl",
        *variant_names,
        *peer_names,
        "infl / fastest peer",
        "best infl at equal accuracy / fastest peer",
        "infl floor",
        "infl / floor",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        floor = row.get("infl_floor_seconds")
        best = row.get("best_infl")
        cells = [
            f"{row['model']} (p = {row['p']:,}, n = {row['n']:,}, {row['dtype']})",
            row["solver"],
            _cell(row["runs"].get("infl")),
            *(_cell(row["runs"].get(name)) for name in variant_names),
            *(_cell(row["runs"].get(name)) for name in peer_names),
            _ratio(row.get("infl_over_fastest_peer"), row.get("fastest_peer")),
            "—"
            if best is None
            else f"{_ratio(row['best_infl_over_fastest_peer'], row['fastest_peer'])} [{best}]",
            "—" if floor is None else f"{floor:.3g} s",
            "—" if floor is None else f"{row['infl_over_floor']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(rows: list[dict[str, Any]]) -> str:
    """One line per peer that was skipped or failed on a row, with the reason."""
    lines = []
    for row in rows:
        where = f"{row['model']}, {row['solver']}"
        for name, why in row.get("skipped", {}).items():
            if not why.startswith("no such method"):
                lines.append(f"- {name} on {where}: not run ({why})")
        for name, run in row["runs"].items():
            if "error" in run:
                lines.append(f"- {name} on {where}: {run['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and depths (validation)")
    parser.add_argument("--models", default="iris,mlp,cnn")
    parser.add_argument("--solvers", default=",".join(SOLVERS))
    parser.add_argument("--peers", default="pydvl,captum,dattri,kronfluence")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--peer-timeout",
        type=int,
        default=300,
        help="stop a peer's run after this many s (0: never)",
    )
    parser.add_argument(
        "--peer-exact-max-p",
        type=int,
        default=1_000,
        help="run peers' dense-Hessian solvers only up to this many parameters",
    )
    parser.add_argument(
        "--cnn-exact",
        action="store_true",
        help="also run the dense Hessian on the CNN (infl's then serves as the reference)",
    )
    parser.add_argument(
        "--lissa-depth", type=int, help="LiSSA depth T for every model (default: LISSA_DEPTH)"
    )
    parser.add_argument(
        "--cg-rtol",
        type=float,
        default=1e-10,
        help="CG's relative residual tolerance for every library (default 1e-10: run them all)",
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also run infl's opt-in speed options (float32 products, PCG) as extra columns",
    )
    parser.add_argument(
        "--ladder",
        action="store_true",
        help="also run every library's CG and LiSSA at smaller budgets and report the time to "
        "equal accuracy against every peer run (time_to_accuracy.py)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="draw every library's stochastic runs (minibatch LiSSA, K-FAC/EK-FAC with sampled "
        "labels) at this many seeds and report the mean accuracy (the time is seed 0's)",
    )
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    wanted = {s.strip().lower() for s in args.peers.split(",") if s.strip()}
    peers = []
    for peer in PEERS:
        if peer.NAME.lower() not in wanted:
            continue
        why = peer.available()
        if why is None:
            peers.append(peer)
        else:
            print(f"note: {peer.NAME} skipped: {why}", file=sys.stderr)
    solvers = [s for s in args.solvers.split(",") if s]
    unknown = sorted(set(solvers) - set(SOLVERS))
    if unknown:
        raise SystemExit(f"unknown solvers {unknown}: choose from {', '.join(SOLVERS)}")
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for model_name in args.models.split(","):
        problem = build_problem(model_name, args.quick)
        print(
            f"# {model_name}: p = {problem.p:,}, n = {problem.n:,}, m = {problem.m}",
            file=sys.stderr,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            all_settings = settings(
                problem,
                args.quick,
                functools.partial(lissa_scale, problem),
                args.lissa_depth,
                args.cnn_exact,
                args.cg_rtol,
            )
        todo = [(s, all_settings[s]) for s in solvers if s in all_settings]
        model_rows = []
        exact_scores = None
        for name, setting in todo:
            row = compare(
                problem,
                name,
                setting,
                peers,
                args.peer_timeout,
                args.peer_exact_max_p,
                args.variants,
                args.seeds,
            )
            for label, smaller in tta.ladder(setting) if args.ladder else []:
                sub = compare(
                    problem,
                    name,
                    smaller,
                    peers,
                    args.peer_timeout,
                    args.peer_exact_max_p,
                    args.variants,
                    args.seeds,
                )
                for key, run in sub["runs"].items():
                    row["runs"][f"{key}{tta.SEPARATOR}{label}"] = run
            if name == "exact" and "scores" in row["runs"]["infl"]:
                exact_scores = row["runs"]["infl"]["scores"]
            model_rows.append((row, setting))
            print(f"  {setting.label()}: done", file=sys.stderr, flush=True)
        ref: torch.Tensor | None = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ref = reference(problem, exact_scores, todo[0][1].damping if todo else 0.0)
            except Exception as err:
                print(f"note: no exact reference for {model_name}: {err}"[:300], file=sys.stderr)
        for row, setting in model_rows:
            finish(row, problem, setting, ref)
            rows.append(row)
        # each model's rows as soon as they are final (a long run keeps what it finished)
        print(table([r for r, _ in model_rows], [p.NAME for p in peers]), file=sys.stderr)
        print(f"  ({time.perf_counter() - started:.0f} s so far)", file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    names = [p.NAME for p in peers]
    print(table(rows, names))
    if notes(rows):
        print("\n" + notes(rows))
    if args.ladder:
        print("\nTime to equal accuracy (every peer run against infl's fastest as accurate):\n")
        print(tta.table(rows))
        print("\n" + tta.all_runs(rows))
    print(
        f"\nseconds (Pearson with the exact answer, mean over test points; largest relative "
        f"error over test points); "
        f"{args.threads} thread(s); total {time.perf_counter() - started:.0f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
