"""Minibatch LiSSA on the digits CNN: independent draws against a cycled partition.

``LiSSA(sampling="partition")`` cuts the training set once into blocks of ``batch_size`` and
visits each once per epoch; every block keeps its gradient graph, so a step is one
double-backward pass instead of a forward, a backward and a double backward. This script
runs both samplings, with and without the control variate (``snapshot_every="auto"``), on
the CNN of ``compare_peers.py`` (same training, damping 0.01, the automatic minibatch scale,
batch 128, 2 test points), at several depths and seeds, and reports wall seconds (from the
calculator's construction to the scores) and the Pearson correlation with the exact answer
(float64 CG to 1e-10).

Run:  python benchmarks/bench_lissa_partition.py [--depths 100 500] [--seeds 3] [--float64]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import compare_peers as cp
import torch

import infl

BATCH = 128
DAMPING = 0.01


def run(problem: cp.Problem, scale: float, depth: int, seed: int, **options: Any) -> Any:
    """``(seconds, scores)`` of one LiSSA run; ``options``: solver fields and
    ``curvature_dtype``."""
    dtype = options.pop("curvature_dtype", None)
    solver = infl.LiSSA(
        damping=DAMPING,
        scale=scale,
        depth=depth,
        batch_size=BATCH,
        rtol=1e-300,  # the full depth
        seed=seed,
        **options,
    )
    start = time.perf_counter()
    calc = cp.calculator(problem, solver, curvature_dtype=dtype)
    scores = calc.influence((problem.x_test, problem.y_test))
    return time.perf_counter() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--float64", action="store_true", help="also float64 products")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    problem = cp.build_problem("cnn", quick=False)
    exact = cp.calculator(
        problem, infl.ConjugateGradient(damping=DAMPING, rtol=1e-10, max_iter=2000)
    ).influence((problem.x_test, problem.y_test))
    scale = cp.lissa_scale(problem, DAMPING, BATCH)
    print(f"digits CNN, p = {problem.p}, n = {len(problem.y_train)}, scale = {scale:.4g}")
    dtypes: list[torch.dtype | None] = [torch.float32] + ([None] if args.float64 else [])
    print("| depth | products | sampling | control variate | seconds (mean) | Pearson (per seed) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for depth in args.depths:
        for dtype in dtypes:
            for control in (False, True):
                for sampling in ("independent", "partition"):
                    options: dict[str, Any] = {"sampling": sampling, "curvature_dtype": dtype}
                    if control:
                        options["snapshot_every"] = "auto"
                    seconds, pearsons = [], []
                    for seed in range(args.seeds):
                        took, scores = run(problem, scale, depth, seed, **dict(options))
                        seconds.append(took)
                        pearsons.append(cp.pearson(scores, exact))
                    name = "float32" if dtype is not None else "float64"
                    per_seed = ", ".join(f"{r:.4f}" for r in pearsons)
                    print(
                        f"| {depth} | {name} | {sampling} | {'yes' if control else 'no'} | "
                        f"{statistics.mean(seconds):.2f} | {statistics.mean(pearsons):.4f} "
                        f"({per_seed}) |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
