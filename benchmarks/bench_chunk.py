"""Time of one curvature product against ``chunk_size`` (examples per autograd pass).

The products of an ``InfluenceCalculator``'s operator run over the training set in chunks of
``chunk_size`` examples, each chunk's gradient graph kept between products while memory allows.
Bigger chunks mean fewer, larger matrix products but a working set that may leave the cache.
This times ``operator.matmat`` for ``k`` vectors at several chunk sizes on the models of
``compare_peers.py`` (trained as there), after three warm-up products.

Usage::

    python benchmarks/bench_chunk.py                       # mlp and cnn, chunks 128..n, k 1, 10
    python benchmarks/bench_chunk.py --models mlp --chunks 256,1438 --k 10
"""

from __future__ import annotations

import argparse
import time
import warnings

import compare_peers as cp
import torch

import infl


def product_seconds(problem: cp.Problem, chunk: int, k: int, reps: int) -> float:
    calc = infl.InfluenceCalculator(
        problem.fresh_model(),
        cp.objective(),
        (problem.x_train, problem.y_train),
        infl.ConjugateGradient(damping=0.1),
        chunk_size=chunk,
        progress=False,
        check_minimum=False,
    )
    operator = calc.operator
    vectors = torch.randn(k, operator.size, dtype=problem.dtype)
    for _ in range(3):
        operator.matmat(vectors)
    start = time.perf_counter()
    for _ in range(reps):
        operator.matmat(vectors)
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--chunks", default="128,256,512,0", help="0: the whole training set")
    parser.add_argument("--k", default="1,10", help="vectors per product")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print("| model | chunk_size | k | ms per product | vs chunk 256 |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        problem = cp.build_problem(name, quick=False)
        chunks = [int(c) or problem.n for c in args.chunks.split(",")]
        for k in (int(v) for v in args.k.split(",")):
            base = product_seconds(problem, 256, k, args.reps)
            for chunk in chunks:
                seconds = base if chunk == 256 else product_seconds(problem, chunk, k, args.reps)
                print(f"| {name} | {chunk} | {k} | {seconds * 1e3:.1f} | {base / seconds:.2f}× |")


if __name__ == "__main__":
    main()
