"""How fast can influence on the Iris MLP be? infl, the fastest peer and no library at all.

Issue 12 asks for every solver to be 3x faster than the fastest peer. On compare_peers'
Iris MLP (4-5-3, ReLU, p = 43, n = 120, float64, 2 test points) a job takes a few
milliseconds in every library, and this measures where the bound is: the same algorithm
written out by hand with plain autograd and no library, beside infl and the fastest peer
(when importable: run it from the peers' virtualenv, see README.md).

* ``--solver exact``: a fresh copy of the model, the Hessian of the summed loss by one
  batched double-backward pass, per-example gradients of the two ``nn.Linear`` layers from
  one backward pass, ``eigh``, two matrix products; infl's ``ExactHessian`` against pyDVL's
  ``DirectInfluence``.
* ``--solver ekfac``: EK-FAC with the empirical Fisher (the data's labels, as dattri's
  ``IFAttributorEKFAC`` estimates it): one forward and one backward pass give each layer's
  inputs and output gradients, the Kronecker factors and their ``eigh``, the eigenvalues
  re-fitted in those eigenbases (each example's gradient is one outer product here, so its
  squared rotation is an outer product of squares), the test and training gradients
  rotated, scaled and contracted; infl's ``EKFAC(fisher="empirical")`` against dattri.

Each job runs ``--repeat`` times, interleaved, one thread; the table gives the median and
the fastest run, and the ratio of the medians to the peer's.

Run:  python benchmarks/bench_iris_exact_floor.py [--solver exact|ekfac] [--repeat 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def by_hand_ekfac(problem: Problem, damping: float) -> Callable[[], torch.Tensor]:
    """EK-FAC (empirical Fisher) with plain autograd: ``-∇ℓ_testᵀ F̃⁻¹ ∇ℓ_train`` ``[m, n]``.

    Per layer ``l`` with inputs ``ā`` (a column of ones appended for the bias) and output
    gradients ``g`` of the per-example losses: ``A = āᵀā / n = Q_A diag Q_Aᵀ``, ``S = gᵀg / n
    = Q_S diag Q_Sᵀ``, ``Λ = ((g Q_S)²)ᵀ (ā Q_A)² / n`` and the layer's inverse
    ``Q_S [(Q_Sᵀ G Q_A) / (Λ + λ)] Q_Aᵀ`` for a gradient ``G = g āᵀ``."""
    x, y, xt, yt = problem.x_train, problem.y_train, problem.x_test, problem.y_test
    n = len(y)

    def records(
        w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
        inputs: torch.Tensor, targets: torch.Tensor,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        z = F.linear(inputs, w1, b1).requires_grad_(True)
        a = torch.relu(z)
        o = F.linear(a, w2, b2)
        go, gz = torch.autograd.grad(F.cross_entropy(o, targets, reduction="sum"), [o, z])
        ones = inputs.new_ones(len(inputs), 1)
        return [(torch.cat([inputs, ones], 1), gz), (torch.cat([a.detach(), ones], 1), go)]

    def job() -> torch.Tensor:
        model = problem.fresh_model()
        w1, b1, w2, b2 = (q.detach() for q in model.parameters())
        train = records(w1, b1, w2, b2, x, y)
        test = records(w1, b1, w2, b2, xt, yt)
        scores = torch.zeros(len(yt), n, dtype=x.dtype)
        for (a, g), (at, gt) in zip(train, test, strict=True):
            q_a = torch.linalg.eigh(a.T @ a / n)[1]
            q_s = torch.linalg.eigh(g.T @ g / n)[1]
            ra, rg = a @ q_a, g @ q_s
            eigenvalues = (rg * rg).T @ (ra * ra) / n
            inverse = (gt @ q_s)[:, :, None] * (at @ q_a)[:, None, :] / (eigenvalues + damping)
            scores -= torch.einsum("jkl,ik,il->ji", inverse, rg, ra)
        return scores

    return job


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solver", choices=("exact", "ekfac"), default="exact")
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    problem = cp.build_problem("iris", quick=False)
    setting = cp.settings(problem, False, lambda lam, b: 1.0)[args.solver]
    peer: Any
    if args.solver == "exact":
        hand, solver_options = by_hand(problem, setting.damping), {}
        from peers import pydvl_peer as peer
    else:
        hand, solver_options = by_hand_ekfac(problem, setting.damping), {"fisher": "empirical"}
        from peers import dattri_peer as peer
    jobs: dict[str, Callable[[], torch.Tensor]] = {
        "by hand": hand,
        # what compare_peers.py times: the constructor to the scores (run_infl then also
        # solves again, untimed, for its record of iterations)
        "infl": lambda: (
            cp.calculator(problem, cp.infl_solver(setting, None, **solver_options))
            .influence((problem.x_test, problem.y_test))
            .detach()
        ),
    }
    if peer.available() is None:
        jobs[peer.NAME] = lambda: peer.scores(problem, setting)
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
    base = statistics.median(times[peer.NAME]) if peer.NAME in times else None
    print(f"| job | median ms | fastest ms | {peer.NAME} / job (medians) |")
    print("| --- | --- | --- | --- |")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        ratio = f"{base / median:.2f}" if base else "—"
        print(f"| {name} | {median * 1e3:.2f} | {min(seconds) * 1e3:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
