"""One minibatch HVP on the digits CNN: infl's subsampled operator against a kept graph.

Minibatch LiSSA on the digits CNN (batch 128) pays, per step, a forward pass, a backward pass
and the double backward of a fresh minibatch (``HessianOperator.subsample(...).matmat``). If
the minibatches were a fixed partition of the training set, cycled, each one's first
backward graph (``torch.autograd.grad(..., create_graph=True)``) could be kept, and a step
would be the double backward alone (``retain_graph=True``). This script measures both per
HVP, on the same trained ``small_cnn`` (2,514 parameters, 1,438 images), one thread, in
float32 and float64; it is the measurement behind that idea, not a solver of infl.

Run:  python benchmarks/bench_cached_minibatch_hvp.py [--reps 60]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

from infl import ConjugateGradient, InfluenceCalculator, Objective
from infl.studies.datasets import load_digits
from infl.studies.models import small_cnn
from infl.studies.training import train_minibatch

BATCH = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for dtype in (torch.float32, torch.float64):
        split = load_digits(seed=0, dtype=dtype, images=True)
        model = small_cnn(10, seed=0).to(dtype)
        train_minibatch(model, split.train, 1e-3, 3, 64, 0.05, 0)
        model.eval()
        objective = Objective("cross_entropy", weight_decay=1e-3)
        calc = InfluenceCalculator(
            model, objective, split.train, ConjugateGradient(damping=0.01), progress=False
        )
        params = list(model.parameters())
        p = sum(t.numel() for t in params)
        v = torch.randn(1, p, dtype=dtype, generator=torch.Generator().manual_seed(2))
        x, y = split.train
        blocks = len(y) // BATCH

        gen = torch.Generator().manual_seed(0)
        subsampled = [calc.operator.subsample(BATCH, gen) for _ in range(blocks)]
        for op in subsampled[:2]:
            op.matmat(v)
        clock = time.perf_counter()
        for i in range(args.reps):
            subsampled[i % blocks].matmat(v)
        fresh = (time.perf_counter() - clock) / args.reps

        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
        graphs = []
        for rows in order[: blocks * BATCH].view(blocks, BATCH):
            loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
            graphs.append(torch.autograd.grad(loss, params, create_graph=True))
        pieces = [
            piece.view_as(t)
            for piece, t in zip(v[0].split([t.numel() for t in params]), params, strict=True)
        ]
        for graph in graphs[:2]:
            torch.autograd.grad(graph, params, pieces, retain_graph=True)
        clock = time.perf_counter()
        for i in range(args.reps):
            torch.autograd.grad(graphs[i % blocks], params, pieces, retain_graph=True)
        kept = (time.perf_counter() - clock) / args.reps
        print(
            f"{dtype!s:14s} subsampled operator {1e3 * fresh:6.2f} ms/HVP, kept graph "
            f"{1e3 * kept:6.2f} ms/HVP, ratio {fresh / kept:.2f} ({blocks} graphs of {BATCH})"
        )


if __name__ == "__main__":
    main()
