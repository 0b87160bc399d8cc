"""Wall time of 100 warm-start leave-one-out retrains of a small MLP, workers=1 vs workers=2.

Model: iris (150 flowers, 4 features z-scored, 3 classes), MLP 4-16-3 with tanh, float64,
cross-entropy with weight_decay=1e-3, trained to ||grad J|| <= 1e-6 with L-BFGS. Protocol per
retrain: warm start from theta*, ``--steps`` full-batch SGD steps (lr 0.1), no early stop.
workers=1 runs in this process with one torch thread (each worker process uses one too).

Run:  python benchmarks/bench_retrain.py [--retrains 100] [--steps 500]
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_iris
from torch import nn

from infl import Objective
from infl.ground_truth import retrain_ground_truth


def setup() -> tuple[nn.Module, Objective, tuple[torch.Tensor, torch.Tensor]]:
    X, y = load_iris(return_X_y=True)
    X = torch.tensor((X - X.mean(0)) / X.std(0))
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    objective = Objective("cross_entropy", weight_decay=1e-3)
    opt = torch.optim.LBFGS(
        model.parameters(),
        max_iter=2000,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=0,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective.per_example_loss(model, (X, y)).mean() + 5e-4 * sum(
            (p**2).sum() for p in model.parameters()
        )
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval(), objective, (X, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrains", type=int, default=100)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    model, objective, (X, y) = setup()
    removals = list(range(args.retrains))
    kw = {
        "optimizer": "sgd",
        "lr": 0.1,
        "max_steps": args.steps,
        "grad_tol": None,
        "progress": False,
    }
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
            **kw,
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
