"""float32 curvature products on a float64 model (``curvature_dtype=float32``): time and error.

The problem is compare_peers' CNN (``build_problem("cnn", quick=False)``: infl's ``small_cnn``,
float64, p = 2,514, n = 1,438 digits images, 2 test points, damping 0.01, chunk 256) and its
solver settings: CG 100 (``rtol=1e-10``), LiSSA with minibatches of 128 and depth 500 (the
scale infl's ``scale="auto"`` picks for that batch size, estimated once, untimed, the same for
both precisions; the same seed, so the same minibatches), Arnoldi rank 50 / Krylov 100.

Each solver runs with ``curvature_dtype=None`` (float64 products) and ``torch.float32``,
alternately and back to back in one process with one thread; a run is the calculator's
construction plus ``influence(test)`` (the twin's construction is inside the float32 runs).
Printed per solver: the best time of ``--repeats`` runs of each, their ratio, and the largest
relative error over test points of each one's scores against the float64 reference (float64
CG to ``rtol=1e-10``, ``max_iter=2000``), and of float32 against float64. The line before the
table is one product of 2 vectors over all 1,438 examples in each precision.

``cg300`` is CG with ``max_iter=300`` (float64 CG converges at 72 iterations either way; the
float32 products need about 126 inner iterations to meet ``rtol=1e-10``, more than CG 100's
cap): the comparison at equal accuracy.

Run:  python benchmarks/bench_mixed_precision.py [--repeats 2] [--solvers cg,cg300,lissa,arnoldi]
          [--cache /tmp/bench_mixed_precision] [--json out.json]
(the trained CNN is cached; about 6 minutes with 2 repeats on a quiet machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import infl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peers import (  # the benchmarks folder is not a package
    DAMPING,
    build_problem,
    infl_solver,
    lissa_scale,
    reference,
    settings,
)
from compare_peers import calculator as peer_calculator
from peers.common import Problem


def calculator(
    problem: Problem, solver: infl.Solver, dtype: torch.dtype | None
) -> infl.InfluenceCalculator:
    """compare_peers' calculator, with ``curvature_dtype=dtype``."""
    return peer_calculator(problem, solver, curvature_dtype=dtype)


def load_problem(cache: Path) -> Problem:
    path = cache / "cnn_problem.pt"
    if path.exists():
        problem: Problem = torch.load(path, weights_only=False)
        return problem
    problem = build_problem("cnn", quick=False)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(problem, path)
    return problem


def max_rel_err(scores: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest relative error over test points (rows): max_j |s_j - r_j| / |r_j|."""
    return float(((scores - ref).norm(dim=1) / ref.norm(dim=1)).max())


def product_seconds(problem: Problem, dtype: torch.dtype | None, repeats: int = 3) -> float:
    """Best time of one product of 2 vectors over all training examples."""
    op = calculator(problem, infl.ConjugateGradient(), dtype).operator
    full = op.full_precision if isinstance(op, infl.MixedPrecisionOperator) else op
    full.dense = False  # type: ignore[attr-defined]
    vectors = torch.randn(2, problem.p, dtype=torch.float64)
    op.matmat(vectors)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        op.matmat(vectors)
        best = min(best, time.perf_counter() - start)
    return best


def run(problem: Problem, solver: infl.Solver, dtype: torch.dtype | None) -> tuple[float, Any]:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", infl.InflWarning)
        calc = calculator(problem, solver, dtype)
        scores = calc.influence((problem.x_test, problem.y_test))
    seconds = time.perf_counter() - start
    result = calc.inverse_hvp((problem.x_test, problem.y_test))
    facts = {
        key: result.info[key]
        for key in ("refinement_steps", "inner_iterations", "full_precision_matvecs")
        if key in result.info
    }
    facts["iterations"] = int(result.iterations)
    return seconds, (scores.detach(), facts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--solvers", default="cg,cg300,lissa,arnoldi")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/bench_mixed_precision"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problem = load_problem(args.cache)
    damping = DAMPING["cnn"]
    ref = reference(problem, None, damping)
    t64, t32 = product_seconds(problem, None), product_seconds(problem, torch.float32)
    print(
        f"one product (2 vectors, n = {len(problem.y_train)}): float64 {t64:.3f} s, "
        f"float32 {t32:.3f} s, ratio {t64 / t32:.2f}x   [threads={args.threads}]",
        flush=True,
    )
    table = settings(problem, False, lambda lam, batch: lissa_scale(problem, lam, batch))
    rows = []
    header = f"{'solver':<16}{'float64 s':>10}{'float32 s':>10}{'ratio':>7}"
    header += f"{'err64':>10}{'err32':>10}{'32 vs 64':>10}  float32 run"
    print(header)
    table["cg300"] = dataclasses.replace(table["cg"], max_iter=300)
    for name in args.solvers.split(","):
        setting = table[name]
        solver = infl_solver(setting)
        best = {None: float("inf"), torch.float32: float("inf")}
        out: dict[Any, Any] = {}
        for _ in range(args.repeats):
            for dtype in (None, torch.float32):
                seconds, out[dtype] = run(problem, solver, dtype)
                best[dtype] = min(best[dtype], seconds)
        s64, s32 = out[None][0], out[torch.float32][0]
        row = {
            "solver": name,
            "float64_s": best[None],
            "float32_s": best[torch.float32],
            "ratio": best[None] / best[torch.float32],
            "err64": max_rel_err(s64, ref),
            "err32": max_rel_err(s32, ref),
            "err32_vs_64": max_rel_err(s32, s64),
            "float64_facts": out[None][1],
            "float32_facts": out[torch.float32][1],
        }
        rows.append(row)
        print(
            f"{name:<16}{row['float64_s']:>10.2f}{row['float32_s']:>10.2f}{row['ratio']:>6.2f}x"
            f"{row['err64']:>10.1e}{row['err32']:>10.1e}{row['err32_vs_64']:>10.1e}  "
            f"{row['float32_facts']}",
            flush=True,
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"product": [t64, t32], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
