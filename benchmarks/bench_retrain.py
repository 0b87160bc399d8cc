"""Retraining wall time: workers=1 vs workers=2, and sequential vs batched (vmapped) SGD.

Default (``--workers``): 100 warm-start leave-one-out retrains of a small MLP, workers=1 vs
workers=2. Model: iris (150 flowers, 4 features z-scored, 3 classes), MLP 4-16-3 with tanh,
float64, cross-entropy with weight_decay=1e-3, trained to ||grad J|| <= 1e-6 with L-BFGS.
Protocol per retrain: warm start from theta*, ``--steps`` full-batch SGD steps (lr 0.1), no
early stop. workers=1 runs in this process with one torch thread (each worker process uses
one too), sequentially (``parallel_runs=1``).

``--fragility``: the retraining of the fragility study's quick preset, each retrain alone
through torch.optim (``parallel_runs=1``) vs. the default ``parallel_runs=None`` (groups of 32
under torch.func.vmap when a trial gradient says that is faster), one torch thread:

* Iris cell: ``mlp(4, 3, width=5, depth=4)`` (133 parameters, float64, relu) trained with
  3000 full-batch SGD steps, 21 removals (+ control) x 1000 steps (lr 0.05, momentum 0.9).
* CNN cell: ``small_cnn`` (2,514 parameters, float32) on the shipped 8x8 digits (1,438
  training images), 31 removals (+ control) x 60 steps (lr 0.05, momentum 0.9).

Run:  python benchmarks/bench_retrain.py [--retrains 100] [--steps 500]
      python benchmarks/bench_retrain.py --fragility
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from sklearn.datasets import load_iris
from torch import nn

from infl import Objective, RetrainConfig, fit_to_minimum
from infl.retrain import retrain_ground_truth


def setup() -> tuple[nn.Module, Objective, tuple[torch.Tensor, torch.Tensor]]:
    X, y = load_iris(return_X_y=True)
    X = torch.tensor((X - X.mean(0)) / X.std(0))
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    objective = Objective("cross_entropy", weight_decay=1e-3)
    fit_to_minimum(model, objective, (X, y), grad_tol=1e-6)
    return model.eval(), objective, (X, y)


def fragility_cases() -> dict[str, tuple[Any, ...]]:
    """(model, objective, train, test, removals, protocol) of the Iris and CNN cells."""
    from infl.studies.datasets import load_digits
    from infl.studies.datasets import load_iris as load_iris_split
    from infl.studies.fragility import train_full_batch, train_minibatch
    from infl.studies.models import mlp, small_cnn

    iris = load_iris_split(seed=0, dtype=torch.float64)
    net = mlp(4, iris.num_classes, 5, 4, "relu", seed=0).double()
    train_full_batch(net, iris.train, 1e-3, 3000, 0.05, 0.9)
    iris_case = (
        net.eval(),
        Objective("cross_entropy", weight_decay=1e-3),
        iris.train,
        (iris.x_test[:1], iris.y_test[:1]),
        list(range(21)),
        {"max_steps": 1000, "lr": 0.05},
    )
    digits = load_digits(seed=0, images=True)
    cnn = small_cnn(digits.num_classes, seed=0)
    train_minibatch(cnn, digits.train, 0.005, 8, 64, 0.05, 0)
    cnn_case = (
        cnn.eval(),
        Objective("cross_entropy", weight_decay=0.005),
        digits.train,
        (digits.x_test[:3], digits.y_test[:3]),
        list(range(0, 310, 10)),
        {"max_steps": 60, "lr": 0.05},
    )
    return {"iris": iris_case, "cnn": cnn_case}


def fragility() -> None:
    torch.set_num_threads(1)
    for name, (model, objective, train, test, removals, protocol) in fragility_cases().items():
        config = RetrainConfig(
            init="warm", optimizer="sgd", momentum=0.9, grad_tol=None, **protocol
        )
        times: dict[int | None, float] = {}
        results = {}
        for parallel_runs in (1, None):
            start = time.perf_counter()
            results[parallel_runs] = retrain_ground_truth(
                model,
                objective,
                train,
                test,
                removals,
                config=config,
                parallel_runs=parallel_runs,
                progress=False,
            )
            times[parallel_runs] = time.perf_counter() - start
        diff = float((results[1].raw_change - results[None].raw_change).abs().max())
        scale = float(results[1].raw_change.abs().max())
        print(
            f"{name}: {len(removals)} retrains (+1 control) x {protocol['max_steps']} steps: "
            f"sequential {times[1]:.2f} s, batched {times[None]:.2f} s, speed-up "
            f"{times[1] / times[None]:.1f}x (max |raw_change diff| {diff:.2g}, max "
            f"|raw_change| {scale:.2g})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrains", type=int, default=100)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--fragility", action="store_true")
    args = parser.parse_args()
    if args.fragility:
        fragility()
        return
    model, objective, (X, y) = setup()
    removals = list(range(args.retrains))
    config = RetrainConfig(optimizer="sgd", lr=0.1, max_steps=args.steps, grad_tol=None)
    times = {}
    results = {}
    for workers in (1, 2):
        start = time.perf_counter()
        results[workers] = retrain_ground_truth(
            model,
            objective,
            (X, y),
            (X[:10], y[:10]),
            removals,
            workers=workers,
            num_threads=1 if workers == 1 else None,
            config=config,
            parallel_runs=1,
            progress=False,
        )
        times[workers] = time.perf_counter() - start
        print(
            f"workers={workers}: {args.retrains} retrains (+1 control) x {args.steps} steps "
            f"in {times[workers]:.2f} s",
            flush=True,
        )
    same = torch.allclose(results[1].raw_change, results[2].raw_change, atol=1e-12)
    print(f"speed-up workers=2 vs 1: {times[1] / times[2]:.2f}x (identical results: {same})")


if __name__ == "__main__":
    main()
