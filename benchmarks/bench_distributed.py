"""Speed-up of N gloo ranks over one process: fitting and scoring on the digits MLP.

The digits MLP of ``bench_solvers.py`` (64→256→256→10, 85,002 parameters, float32, trained
once in this process with Adam, the same weights sent to every rank) and its 1,500 training
digits. For each world size (1, then 2 by default) the ranks are started with
``torch.multiprocessing.spawn`` and a gloo ``FileStore`` rendezvous, one thread each; every
rank builds an :class:`~infl.InfluenceCalculator` on the whole training set (it shards it)
and times, between barriers:

* ``fit``: the solver's fit (CG: nothing; EK-FAC: two passes over the data for the factors);
* ``score``: ``influence`` of 10 test digits against all training digits (CG: the inverse-HVP
  of the 10 test gradients, a fixed number of iterations so that every world size does the
  same work, then one training-gradient pass; EK-FAC: one training-gradient pass).

The world size of 1 runs the same script in one spawned process with no process group (the
single-process path). The speed-up is the ratio of the slowest rank's times, measured back to
back in one run; with N ranks on N free cores the best possible is N. ``CPU s/rank`` is the
busiest rank's CPU time (``time.process_time``) and ``work ratio`` the one-process CPU time
over it: how far the work itself is split, whatever else the machine runs. The ranks also
check their scores against the world size 1 scores (largest difference relative to the
largest score, float32: CG's iterates amplify the rounding of sums taken in another order).

Run:  python benchmarks/bench_distributed.py [--worlds 1 2] [--solvers cg ekfac] [--cg-iter 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits
from torch import nn

import infl

WEIGHT_DECAY = 1e-3
N_TRAIN = 1500
N_TEST = 10


def build() -> tuple[dict[str, torch.Tensor], Any, Any]:
    """The trained MLP's weights and the train / test digits."""
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=WEIGHT_DECAY)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:N_TRAIN]), y[:N_TRAIN]).backward()
        opt.step()
    train = (x[:N_TRAIN], y[:N_TRAIN])
    test = (x[N_TRAIN : N_TRAIN + N_TEST], y[N_TRAIN : N_TRAIN + N_TEST])
    return model.state_dict(), train, test


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def make_solver(name: str, cg_iter: int) -> infl.Solver:
    if name == "cg":  # an unreachable rtol: exactly cg_iter iterations whatever the world size
        return infl.ConjugateGradient(damping=0.01, rtol=1e-30, max_iter=cg_iter)
    if name == "ekfac":  # the empirical Fisher: the same factors as one process (no label draws)
        return infl.EKFAC(damping=0.01, fisher="empirical")
    raise SystemExit(f"unknown solver {name!r}: use cg or ekfac")


def worker(rank: int, world: int, store: str, payload: dict[str, Any], out: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # CG stops at max_iter on purpose
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = make_model()
    model.load_state_dict(payload["weights"])
    model.eval()
    objective = infl.Objective("cross_entropy", weight_decay=WEIGHT_DECAY)

    def sync() -> tuple[float, float]:
        if world > 1:
            dist.barrier()
        return time.perf_counter(), time.process_time()

    results: dict[str, Any] = {}
    for name in payload["solvers"]:
        calc = infl.InfluenceCalculator(
            model,
            objective,
            payload["train"],
            make_solver(name, payload["cg_iter"]),
            chunk_size=256,
            progress=False,
            check_minimum=False,
        )
        (t0, c0) = sync()
        calc.fitted_solver()
        (t1, _) = sync()
        scores = calc.influence(payload["test"])
        (t2, c2) = sync()
        results[name] = {"fit": t1 - t0, "score": t2 - t1, "cpu": c2 - c0, "scores": scores}
    torch.save(results, os.path.join(out, f"world{world}_rank{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--solvers", nargs="+", default=["cg", "ekfac"])
    parser.add_argument("--cg-iter", type=int, default=10)
    args = parser.parse_args()
    weights, train, test = build()
    payload = {
        "weights": weights,
        "train": train,
        "test": test,
        "solvers": args.solvers,
        "cg_iter": args.cg_iter,
    }
    timings: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            store = os.path.join(tmp, f"store{world}")
            mp.spawn(worker, args=(world, store, payload, tmp), nprocs=world, join=True)
            ranks = [
                torch.load(os.path.join(tmp, f"world{world}_rank{r}.pt")) for r in range(world)
            ]
            timings[world] = ranks
    base = args.worlds[0]
    print(f"digits MLP (85,002 parameters), n = {N_TRAIN}, m = {N_TEST}, 1 thread per rank")
    print(
        f"{'solver':8} {'ranks':>5} {'fit s':>8} {'score s':>8} {'total s':>8} {'speed-up':>8} "
        f"{'CPU s/rank':>10} {'work ratio':>10} {'max rel. diff':>13}"
    )
    for name in args.solvers:
        ref = timings[base][0][name]
        ref_total = ref["fit"] + ref["score"]
        for world in args.worlds:
            ranks = timings[world]
            fit = max(r[name]["fit"] for r in ranks)
            score = max(r[name]["score"] for r in ranks)
            cpu = max(r[name]["cpu"] for r in ranks)
            gap = max(
                float((r[name]["scores"] - ref["scores"]).abs().max() / ref["scores"].abs().max())
                for r in ranks
            )
            print(
                f"{name:8} {world:>5} {fit:>8.2f} {score:>8.2f} {fit + score:>8.2f} "
                f"{ref_total / (fit + score):>8.2f} {cpu:>10.2f} {ref['cpu'] / cpu:>10.2f} "
                f"{gap:>13.1e}"
            )


if __name__ == "__main__":
    main()
