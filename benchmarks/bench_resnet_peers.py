"""K-FAC / EK-FAC on a 1.2M-parameter ResNet, infl beside kronfluence: kronfluence's own ground.

``compare_peers.py`` compares the libraries on models of 43 to 85k parameters, where fixed
costs weigh most. This puts infl's ``KFAC`` / ``EKFAC`` beside kronfluence's (the peer built
for large models) on ``small_resnet(width=64)`` from ``infl.studies.models``: 1,224,906
parameters in its convolutions and linear head (the GroupNorm parameters are frozen, since
kronfluence covers only ``nn.Conv2d`` and ``nn.Linear``), synthetic CIFAR-shaped data
(``bench_resnet.synthetic``), ``n`` training and 10 test points, damping ``1e-3``, one thread,
float32. Each library runs from its constructor to the ``[10, n]`` scores, with the adapters of
``compare_peers.py``, alternating ``--repeat`` times: infl with ``--chunk`` examples per
chunk (default ``auto``, infl's default, which picks 64 on this model on a CPU: see
``infl.chunking``), kronfluence with batches of ``--peer-batch`` (default 512, at most ``n``).
The model is untrained, so this measures cost, and the two libraries' scores are compared
with each other (Pearson, mean over test points) rather than with an exact answer. Run it
from the peers' virtualenv (README.md):

    python benchmarks/bench_resnet_peers.py [--n 256] [--solvers ekfac kfac] [--repeat 2]
                                            [--chunk auto] [--peer-batch 512]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_resnet
import compare_peers as cp
from peers import kronfluence_peer
from peers.common import Problem, Setting

from infl import metrics
from infl.studies.models import small_resnet

DAMPING = 1e-3
N_TEST = 10


def problem(n: int) -> Problem:
    model = small_resnet(10, width=64, seed=0).eval()
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            module.requires_grad_(False)
    x, y = bench_resnet.synthetic(n, 0)
    xt, yt = bench_resnet.synthetic(N_TEST, 1)
    return Problem("resnet", model, x, y, xt, yt)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--solvers", nargs="+", default=["ekfac", "kfac"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--chunk", default="auto", help="infl's chunk_size: 'auto' or a number")
    parser.add_argument("--peer-batch", type=int, default=kronfluence_peer.BATCH)
    args = parser.parse_args(argv)
    chunk = args.chunk if args.chunk == "auto" else int(args.chunk)
    kronfluence_peer.BATCH = args.peer_batch
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    if kronfluence_peer.available() is not None:
        raise SystemExit(f"kronfluence: {kronfluence_peer.available()}; see README.md")
    prob = problem(args.n)
    print(
        f"# small_resnet(width=64): p = {prob.p:,}, n = {prob.n}, m = {prob.m}, one thread; "
        f"infl chunk_size={chunk!r}, kronfluence batch {min(prob.n, args.peer_batch)}"
    )
    print("| solver | infl s | kronfluence s | kronfluence / infl | Pearson(infl, kronfluence) |")
    print("| --- | --- | --- | --- | --- |")
    for method in args.solvers:
        setting = Setting(method, DAMPING)
        for _ in range(args.repeat):
            ours, run = cp.run_infl(prob, setting, {"chunk_size": chunk})
            infl_s = run["seconds"]
            start = time.perf_counter()
            theirs = kronfluence_peer.scores(prob, setting)
            peer_s = time.perf_counter() - start
            agree = sum(metrics.pearson(ours[j], theirs[j]) for j in range(prob.m)) / prob.m
            print(
                f"| {method} | {infl_s:.1f} | {peer_s:.1f} | {peer_s / infl_s:.2f} | {agree:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
