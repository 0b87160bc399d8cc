"""EK-FAC on a CIFAR-shaped GroupNorm ResNet (>= 1M parameters): time and peak memory versus n.

The model is ``infl.studies.models.small_resnet(width=64)`` (1,227,594 parameters; GroupNorm
weights and biases take the stated Fisher-diagonal fallback, ``unsupported="diagonal"``), on
synthetic CIFAR-shaped data (3x32x32, 10 classes, a fixed random linear teacher so that the
labels depend on the inputs). The model is not trained: this measures cost, not fidelity.

For each n, in a fresh process: EK-FAC fit (factor pass, eigendecompositions, eigenvalue pass)
and the scores of all n training points against 100 test points; peak RSS of the process.
Peak memory should stay flat as n grows (the data are streamed in chunks; scores are
``[100, n]``), and time should grow linearly.

Run:  python benchmarks/bench_resnet.py [--n 1000 2000 4000] [--chunk 64]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
import warnings
from typing import Any

import torch

import infl
from infl.studies.models import count_parameters, small_resnet

N_TEST = 100


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    teacher = torch.randn(3 * 32 * 32, 10, generator=torch.Generator().manual_seed(1234))
    y = (x.reshape(n, -1) @ teacher).argmax(1)
    return x, y


def run(n: int, chunk: int, queue: Any) -> None:
    torch.set_num_threads(2)
    model = small_resnet(10, width=64, seed=0).eval()
    train, test = synthetic(n, 0), synthetic(N_TEST, 1)
    objective = infl.Objective("cross_entropy", weight_decay=5e-4)
    solver = infl.EKFAC(unsupported="diagonal", chunk_size=chunk)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", infl.InflWarning)  # an untrained model: not a minimum
        calc = infl.InfluenceCalculator(
            model,
            objective,
            train,
            solver,
            chunk_size=chunk,
            cache_bytes=0,
            progress=False,
            check_minimum=False,
        )
        start = time.perf_counter()
        fitted = calc.fitted_solver()
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        scores = calc.influence(test)
        score_s = time.perf_counter() - start
    queue.put(
        {
            "n": n,
            "params": count_parameters(model),
            "fit_seconds": round(fit_s, 1),
            "score_seconds": round(score_s, 1),
            "damping": float(fitted.damping),
            "scores_shape": list(scores.shape),
            "finite": bool(torch.isfinite(scores).all()),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--chunk", type=int, default=64)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    for n in args.n:
        queue = ctx.Queue()
        proc = ctx.Process(target=run, args=(n, args.chunk, queue))
        proc.start()
        print(json.dumps(queue.get()), flush=True)
        proc.join()


if __name__ == "__main__":
    main()
