"""How fast can exact influence on the Iris MLP be? infl, pyDVL and no library at all.

Issue 12 asks for every solver to be 3x faster than the fastest peer. On compare_peers'
Iris MLP (4-5-3, ReLU, p = 43, n = 120, float64, 2 test points) the exact job takes a few
milliseconds in every library, and this measures where the bound is: the same algorithm
written out by hand with plain autograd and no library (a fresh copy of the model, the
Hessian of the summed loss by one batched double-backward pass, per-example gradients of
the two ``nn.Linear`` layers from one backward pass, ``eigh``, two matrix products), beside
infl's ``InfluenceCalculator(..., ExactHessian)`` and pyDVL's ``DirectInfluence`` (when
importable: run it from the peers' virtualenv, see README.md). Each job runs ``--repeat`` times,
interleaved, one thread; the table gives the median and the fastest run, and the ratio of the
medians to pyDVL's.

Run:  python benchmarks/bench_iris_exact_floor.py [--repeat 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_peers as cp
from peers.common import Problem


def by_hand(problem: Problem, damping: float) -> Callable[[], torch.Tensor]:
    """The exact job with plain autograd: ``-∇ℓ_testᵀ (H + λI)⁻¹ ∇ℓ_train`` ``[m, n]``."""
    x, y, xt, yt = problem.x_train, problem.y_train, problem.x_test, problem.y_test

    def job() -> torch.Tensor:
        model = problem.fresh_model()
        params = list(model.parameters())
        sizes = [q.numel() for q in params]
        shapes = [q.shape for q in params]
        theta = torch.cat([q.detach().reshape(-1) for q in params]).requires_grad_(True)

        def layers(t: torch.Tensor) -> list[torch.Tensor]:
            return [c.view(s) for c, s in zip(torch.split(t, sizes), shapes, strict=True)]

        w1, b1, w2, b2 = layers(theta)
        loss = F.cross_entropy(
            F.linear(torch.relu(F.linear(x, w1, b1)), w2, b2), y, reduction="sum"
        )
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        eye = torch.eye(theta.numel(), dtype=theta.dtype)
        (hessian,) = torch.autograd.grad(g, theta, eye, is_grads_batched=True)
        hessian = hessian / len(y)

        def per_example(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            w1, b1, w2, b2 = layers(theta.detach())
            z = F.linear(inputs, w1, b1).requires_grad_(True)
            a = torch.relu(z)
            o = F.linear(a, w2, b2)
            go, gz = torch.autograd.grad(F.cross_entropy(o, targets, reduction="sum"), [o, z])
            outer = [(gz[:, :, None] * inputs[:, None, :]).flatten(1), gz]
            outer += [(go[:, :, None] * a.detach()[:, None, :]).flatten(1), go]
            return torch.cat(outer, dim=1)

        values, vectors = torch.linalg.eigh(hessian)
        ihvp = ((per_example(xt, yt) @ vectors) / (values + damping)) @ vectors.T
        return -(ihvp @ per_example(x, y).T)

    return job


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    problem = cp.build_problem("iris", quick=False)
    setting = cp.settings(problem, False, lambda lam, b: 1.0)["exact"]
    jobs: dict[str, Callable[[], torch.Tensor]] = {
        "by hand": by_hand(problem, setting.damping),
        "infl": lambda: cp.run_infl(problem, setting)[0],
    }
    try:
        from peers import pydvl_peer

        if pydvl_peer.available() is None:
            jobs["pyDVL"] = lambda: pydvl_peer.scores(problem, setting)
    except ImportError:
        pass
    reference = jobs["infl"]()
    for name, job in jobs.items():
        difference = float((job() - reference).abs().max() / reference.abs().max())
        print(f"{name}: largest difference from infl / largest score = {difference:.1e}")
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(args.repeat):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["pyDVL"]) if "pyDVL" in times else None
    print("| job | median ms | fastest ms | pyDVL / job (medians) |")
    print("| --- | --- | --- | --- |")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        ratio = f"{base / median:.2f}" if base else "—"
        print(f"| {name} | {median * 1e3:.2f} | {min(seconds) * 1e3:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
