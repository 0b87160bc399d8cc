"""Gradient store at growing n: build time, query time for 100 test points, peak RSS.

Two models, neither trained (this measures cost, not fidelity):

* ``mlp``: the digits MLP ``infl.studies.models.mlp(64, 10, width=256, depth=2)``
  (85,002 parameters) on digits-shaped data: the shipped digits' training images resampled
  with replacement to ``n`` examples, plus N(0, 0.05^2) pixel noise;
* ``resnet``: ``small_resnet(10, width=64)`` (1,227,594 parameters, GroupNorm) on synthetic
  CIFAR-shaped data (3x32x32, labels from a fixed random linear teacher), as in
  ``bench_resnet.py``.

For each (model, n), in a fresh process: an EK-FAC fit (``unsupported="diagonal"`` for the
GroupNorm parameters), then ``GradientStore.build`` (one pass of per-example gradients
projected to ``k`` dims by the seeded JL matrix, written to disk chunk by chunk), then a query
batch of 100 test points scored against all n from the store (``influence``: test gradients,
one EK-FAC solve, projection, ``[100, k] x [k, n]``) and, for comparison, the streamed
``calc.top_k`` that recomputes every training gradient. Columns: seconds of each step, the
store's size on disk and the process's peak RSS (``ru_maxrss``). Time should grow linearly in
n and the peak RSS stay flat (nothing ``[n, p]`` is held; the store is on disk).

Run:  python benchmarks/bench_scaling.py [--model mlp resnet] [--n 1000 10000] [--dim 512]
          [--chunk 128] [--dtype float16] [--mixed-precision bfloat16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import infl
from infl.studies.datasets import load_digits
from infl.studies.models import count_parameters, mlp, small_resnet

N_TEST = 100


def digits_like(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` digits training images resampled with replacement, plus small pixel noise."""
    x, y = load_digits(seed=0).train
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.shape[0], (n,), generator=gen)
    return x[idx] + 0.05 * torch.randn(n, x.shape[1], generator=gen), y[idx]


def cifar_like(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    teacher = torch.randn(3 * 32 * 32, 10, generator=torch.Generator().manual_seed(1234))
    return x, (x.reshape(n, -1) @ teacher).argmax(1)


def run(name: str, n: int, args: argparse.Namespace, queue: Any) -> None:
    torch.set_num_threads(args.threads)
    if name == "mlp":
        model = mlp(64, 10, width=256, depth=2, seed=0).eval()
        train, test = digits_like(n, 0), digits_like(N_TEST, 1)
    else:
        model = small_resnet(10, width=64, seed=0).eval()
        train, test = cifar_like(n, 0), cifar_like(N_TEST, 1)
    objective = infl.Objective("cross_entropy", weight_decay=5e-4)
    root = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    row: dict[str, Any] = {"model": name, "n": n, "params": count_parameters(model)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", infl.InflWarning)  # untrained: not a minimum
            calc = infl.InfluenceCalculator(
                model,
                objective,
                train,
                infl.EKFAC(unsupported="diagonal", chunk_size=args.chunk),
                chunk_size=args.chunk,
                cache_bytes=0,
                memory_budget=args.budget_mb << 20,
                progress=False,
                check_minimum=False,
            )
            start = time.perf_counter()
            calc.fitted_solver()
            row["fit_s"] = round(time.perf_counter() - start, 1)
            start = time.perf_counter()
            store = infl.GradientStore.build(
                calc,
                root / "grads",
                dim=args.dim,
                dtype=args.dtype,
                mixed_precision=args.mixed_precision,
                projection_bytes=args.projection_mb << 20,
            )
            row["build_store_s"] = round(time.perf_counter() - start, 1)
            start = time.perf_counter()
            scores = store.influence(test)
            row["query_100_from_store_s"] = round(time.perf_counter() - start, 2)
            if not args.skip_recompute:
                start = time.perf_counter()
                calc.top_k(test, 10)
                row["query_100_recomputed_s"] = round(time.perf_counter() - start, 1)
        row.update(
            {
                "dim": args.dim,
                "dtype": args.dtype,
                "mixed_precision": args.mixed_precision,
                "store_mb": round((root / "grads" / "grads.npy").stat().st_size / 2**20, 1),
                "finite": bool(torch.isfinite(scores).all()),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            }
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    queue.put(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", default=["mlp", "resnet"], choices=["mlp", "resnet"])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--mixed-precision", default=None)
    parser.add_argument("--budget-mb", type=int, default=1024)
    parser.add_argument("--projection-mb", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-recompute", action="store_true")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    for name in args.model:
        for n in args.n:
            queue = ctx.Queue()
            proc = ctx.Process(target=run, args=(name, n, args, queue))
            proc.start()
            print(json.dumps(queue.get()), flush=True)
            proc.join()


if __name__ == "__main__":
    main()
