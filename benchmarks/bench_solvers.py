"""Speed and memory of removal effects for every solver on an 85k-parameter MLP.

MLP 64→256→256→10 (85,002 parameters, float32) trained on scikit-learn's digits; removal
effects of all training points on 10 test points, per solver. For each run we print

* wall seconds and the peak resident memory of a fresh process doing only that run;
* the *overhead ratio*: total time / (time the maths requires), where the maths is the
  operator applications the solver made (each timed alone on the same model and data) plus
  one per-example gradient pass over the training data and the test gradients. 1.0 means
  infl adds nothing on top of the HVPs and gradients; the target is ≤ 1.3.

Run:  python benchmarks/bench_solvers.py            (~3 minutes on 2 CPU cores)
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
from sklearn.datasets import load_digits
from torch import nn

import infl
from infl.data import IndexedData
from infl.model import ModelWrapper

WEIGHT_DECAY = 1e-3
DAMPING = 0.01
N_TRAIN = 1500
N_TEST = 10


def build() -> tuple[
    nn.Module, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=WEIGHT_DECAY)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:N_TRAIN]), y[:N_TRAIN]).backward()
        opt.step()
    model.eval()
    return (
        model,
        (x[:N_TRAIN], y[:N_TRAIN]),
        (x[N_TRAIN : N_TRAIN + N_TEST], y[N_TRAIN : N_TRAIN + N_TEST]),
    )


def make_solver(name: str) -> infl.Solver:
    if name == "cg":
        return infl.ConjugateGradient(damping=DAMPING, rtol=1e-12, max_iter=100)
    if name == "lissa":
        return infl.LiSSA(damping=DAMPING, scale="auto", depth=1000, batch_size=100, rtol=1e-12)
    if name == "exact":
        return infl.ExactHessian(damping=DAMPING)
    raise ValueError(name)


def timed(fn: Any, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_one(name: str, cache_bytes: int, queue: mp.Queue) -> None:
    torch.set_num_threads(2)
    model, train, test = build()
    objective = infl.Objective("cross_entropy", weight_decay=WEIGHT_DECAY)
    calc = infl.InfluenceCalculator(
        model,
        objective,
        train,
        make_solver(name),
        chunk_size=256,
        cache_bytes=cache_bytes,
        progress=False,
    )
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", infl.InflWarning)
        try:
            effects = calc.removal_effect(test)
        except infl.InflError as err:
            queue.put({"solver": name, "error": str(err).split(":")[0]})
            return
    total = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = calc.inverse_hvp(test)

    # The maths this run needed, each piece timed alone on the same model and data.
    wrapper = ModelWrapper(model, objective)
    data = IndexedData(train)
    t_grads = timed(lambda: [wrapper.train_grads(b) for _, b in data.chunks(256)], repeat=1)
    t_test = timed(lambda: calc.test_grads(test), repeat=1)
    vecs = torch.randn(N_TEST, wrapper.num_params)
    t_block = timed(lambda: wrapper.hvp(data, vecs, 256))  # one full-data pass, 10 vectors
    t_one = timed(lambda: wrapper.hvp(data, vecs[:1], 256))  # one full-data pass, 1 vector
    if name == "lissa":
        gen = torch.Generator().manual_seed(0)
        op = infl.HessianOperator(wrapper, data, 256)
        t_step = timed(lambda: op.subsample(100, gen).matmat(vecs))  # one minibatch step
        single_matvecs = calc.operator.num_matvecs - N_TEST  # power iteration for scale="auto"
        passes = result.iterations + single_matvecs + 1
        t_ops = result.iterations * t_step + single_matvecs * t_one + t_block
    else:
        passes = result.iterations
        t_ops = passes * t_block
    queue.put(
        {
            "solver": name,
            "cache": "cached [n,p]" if cache_bytes else "streamed",
            "seconds": round(total, 2),
            "peak_rss_mb": round(peak_mb),
            "rss_before_mb": round(base_rss / 1024),
            "iterations": result.iterations,
            "operator_passes": passes,
            "ideal_seconds": round(t_ops + t_grads + t_test, 2),
            "overhead_ratio": round(total / (t_ops + t_grads + t_test), 3),
            "ratio_if_each_hvp_were_separate": round(
                total / (calc.operator.num_matvecs * t_one + t_grads + t_test), 3
            ),
            "max_residual": float(result.residual_norms.max()),
            "effects_finite": bool(torch.isfinite(effects).all()),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--solvers", default="exact,cg,lissa")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    configs = [(s, 1 << 30) for s in args.solvers.split(",")] + [("cg", 0)]
    for name, cache in configs:
        queue: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=run_one, args=(name, cache, queue))
        proc.start()
        row = queue.get()
        proc.join()
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
