"""A job at infl's defaults on compare_peers' models: the constructor (with its minimum check)
to the scores of a first test batch, then a second batch.

``compare_peers.py`` builds its calculators with ``check_minimum=False``, as the peers have no
such check. A user does not: the minimum check runs one pass of training gradients at
construction, and what it keeps (the ``[n, p]`` gradients, or an ``nn.Linear`` model's layer
factors, ``infl.factor_cache``) decides what the scoring passes cost. This times that whole
job per model and solver: ``first`` is the constructor, the fit and the first batch's scores,
``second`` the scores of another batch from the same calculator (its solve and its scoring
pass). Each cell is the median of ``--repeat`` runs, one thread.

Run:  python benchmarks/bench_default_jobs.py [--models iris mlp] [--solvers exact ekfac ...]
      [--repeat 5] [--fisher true|empirical]

Compare two checkouts by ``PYTHONPATH=<checkout>/src``, alternating, on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_peers as cp
from peers.common import Problem

import infl


def job(problem: Problem, solver: infl.Solver) -> tuple[float, float, torch.Tensor]:
    """``(seconds to the first scores, seconds for the second batch's, first scores)``."""
    half = len(problem.y_test) // 2 or 1
    first_batch = (problem.x_test[:half], problem.y_test[:half])
    second_batch = (problem.x_test[half:], problem.y_test[half:])
    start = time.perf_counter()
    calc = infl.InfluenceCalculator(
        problem.fresh_model(),
        cp.objective(),
        (problem.x_train, problem.y_train),
        solver,
        progress=False,
        chunk_size=cp.CHUNK,
    )
    scores = calc.influence(first_batch)
    middle = time.perf_counter()
    if len(second_batch[1]):
        calc.influence(second_batch)
    return middle - start, time.perf_counter() - middle, scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["iris", "mlp"])
    parser.add_argument("--solvers", nargs="+", default=["exact", "cg", "kfac", "ekfac"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--fisher", choices=("true", "empirical"), default="true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the minimum check's warning, once per job
    print("| model | solver | first batch (s) | second batch (s) | sum of first scores |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.models:
        problem = cp.build_problem(name, quick=False)
        settings = cp.settings(problem, False, lambda lam, b: 1.0)
        for solver_name in args.solvers:
            if solver_name not in settings:
                continue
            options = {"fisher": args.fisher} if solver_name in ("kfac", "ekfac") else {}
            solver = cp.infl_solver(settings[solver_name], None, **options)
            firsts, seconds = [], []
            scores = job(problem, solver)[2]  # warm-up
            for _ in range(args.repeat):
                first, second, _ = job(problem, solver)
                firsts.append(first)
                seconds.append(second)
            print(
                f"| {name} | {solver_name} | {statistics.median(firsts):.4f} | "
                f"{statistics.median(seconds):.4f} | {float(scores.sum()):.10g} |"
            )


if __name__ == "__main__":
    main()
