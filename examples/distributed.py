"""Influence scores with the training set sharded over torch.distributed ranks.

Every rank loads the same model and the *whole* training set; the InfluenceCalculator sees
that torch.distributed is initialised and works on its rank's contiguous shard: Hessian-vector
products are all-reduced, each rank scores its shard's columns and the [m, n] scores are
gathered, so every rank holds what one process would have computed, up to rounding (sums
taken in another order; about 1e-9 relative here, at CG's rtol=1e-8). Only rank 0 prints.
Run it with one process and you get the same numbers (that is the check at the end).

Run:  torchrun --nproc_per_node=2 examples/distributed.py      (gloo on CPU, 30 s or more)
      python examples/distributed.py                            (one process, same code)
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

import infl
from infl.studies.datasets import load_digits

WEIGHT_DECAY = 1e-3


def trained_model(x: torch.Tensor, y: torch.Tensor, objective: infl.Objective) -> nn.Module:
    """The same model on every rank: a fixed seed and full-batch L-BFGS (deterministic).

    In real use, train once and load the same checkpoint on every rank.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    infl.fit_to_minimum(model, objective, (x, y), grad_tol=1e-6, max_iter=2000)
    return model.eval()


def main() -> None:
    launched = "WORLD_SIZE" in os.environ  # set by torchrun
    if launched:
        torch.set_num_threads(1)  # one core per rank
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if launched else 0

    split = load_digits(seed=0, test_fraction=0.5, dtype=torch.float64)  # 899 training digits
    train = (split.x_train, split.y_train)
    test = (split.x_test[:5], split.y_test[:5])
    objective = infl.Objective("cross_entropy", weight_decay=WEIGHT_DECAY)
    model = trained_model(*train, objective)

    calc = infl.InfluenceCalculator(
        model,
        objective,
        train,  # the whole training set on every rank: the calculator shards it
        infl.ConjugateGradient(damping=0.01, rtol=1e-8, max_iter=300),
        progress=False,
    )
    scores = calc.influence(test)  # [5, 899] on every rank, in global order
    helpful, _ = calc.top_k(test, 3, by="helpful")  # global training indices

    if rank == 0:  # only rank 0 reports
        print(
            f"{calc.group.world_size} rank(s); rank 0 holds training examples "
            f"{calc.shard.start}..{calc.shard.stop - 1} of {calc.num_train}"
        )
        print("the 3 most helpful training digits per test digit:", helpful.tolist())
        # the check: one process, all the data, the same numbers
        alone = infl.InfluenceCalculator(
            model,
            calc.objective,
            train,
            calc.solver,
            progress=False,
            check_minimum=False,
            distributed=False,
        )
        gap = float((alone.influence(test) - scores).abs().max() / scores.abs().max())
        print(f"largest relative difference from one process: {gap:.1e}")
    if launched:
        dist.barrier()  # rank 0's check runs alone; the others wait for it before leaving
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
