"""Per-step cost of the fragility study's Iris part: training and retraining, per cell.

The full preset's Iris part (29 MLP configurations x 5 seeds) is, per cell, 60,000 full-batch
SGD steps to train θ* (``train_full_batch``, more when a dead initialisation is redrawn) and
21 warm-start removal retrains + the control run of 7,500 steps, run side by side on the
batched engine (``retrain_ground_truth(parallel_runs=32)``); the exact Hessian, LiSSA and the
metrics take a few percent. This script times both per step on every configuration (seed 0,
one thread), after a warm-up, and scales them to the preset's step counts:

* ``train``: ``--train-steps`` steps of ``train_full_batch`` from the configuration's
  initialisation;
* ``retrain``: ``retrain_ground_truth`` of the first 21 training points with ``--retrain-steps``
  fixed steps from a model trained 3,000 steps (per step it does not depend on the minimum).

It prints one row per configuration and the estimated seconds of one seed. To compare two
versions of infl (from the one that added ``fragility.iris_retrain_config`` on), run it with
each on ``PYTHONPATH`` back to back on an idle machine (the script imports whichever ``infl``
comes first), e.g.::

    PYTHONPATH=/path/to/old/src python benchmarks/bench_fragility_iris.py
    python benchmarks/bench_fragility_iris.py

Run:  python benchmarks/bench_fragility_iris.py [--train-steps 2000] [--retrain-steps 400]
      [--configs relu-d1-w5 tanh-d8-w5]
"""

from __future__ import annotations

import argparse
import time

import torch

from infl import Objective
from infl.retrain import retrain_ground_truth
from infl.studies import fragility
from infl.studies.datasets import load_iris
from infl.studies.models import mlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--retrain-steps", type=int, default=400)
    parser.add_argument(
        "--configs", nargs="*", default=None, help="e.g. relu-d1-w5 (default: all 29)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset = fragility.PRESETS["full"]
    split = load_iris(seed=0, dtype=torch.float64)
    test = (split.x_test[:1], split.y_test[:1])
    cells = [c for c in fragility.iris_cells(preset) if c.seed == 0]
    if args.configs:
        wanted = set(args.configs)
        cells = [c for c in cells if f"{c.activation}-d{c.depth}-w{c.width}" in wanted]
    total_train = total_retrain = 0.0
    print(f"{'cell':34s} {'train us/step':>14s} {'retrain us/step':>16s}")
    for cell in cells:
        model = mlp(4, 3, cell.width, cell.depth, cell.activation, seed=0).double()
        steps = args.train_steps
        fragility.train_full_batch(model, split.train, cell.weight_decay, 100, 0.05, 0.9)
        clock = time.perf_counter()
        fragility.train_full_batch(model, split.train, cell.weight_decay, steps, 0.05, 0.9)
        train = (time.perf_counter() - clock) / steps
        objective = Objective("cross_entropy", weight_decay=cell.weight_decay)
        config = fragility.iris_retrain_config(preset, args.retrain_steps)

        def retrain(model=model, objective=objective, config=config) -> None:
            retrain_ground_truth(
                model,
                objective,
                split.train,
                test,
                removals=list(range(21)),
                config=config,
                parallel_runs=32,
                progress=False,
            )

        retrain()  # warm-up (the engine's first evaluation checks itself against vmap)
        clock = time.perf_counter()
        retrain()
        per_retrain = (time.perf_counter() - clock) / args.retrain_steps
        total_train += train * preset.iris_train_steps
        total_retrain += per_retrain * preset.iris_retrain_steps
        print(f"{cell.cell_id:34s} {1e6 * train:14.0f} {1e6 * per_retrain:16.0f}", flush=True)
    print(
        f"one seed, scaled to {preset.iris_train_steps} training and "
        f"{preset.iris_retrain_steps} retraining steps: train {total_train:.0f} s, "
        f"retrain {total_retrain:.0f} s (one initialisation per cell)"
    )


if __name__ == "__main__":
    main()
