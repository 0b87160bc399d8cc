"""Cost of one curvature product, a dense Hessian and per-example gradients: this tree vs another.

Measures, on the three models of issue 12 (Iris MLP 4-5-3, p = 43, float64, n = 120; the
digits CNN of the fragility study, p = 2,514, float64; the digits MLP 64-256-256-10,
p = 85,002, float32; digits n = 1,437):

* ``hvp_k1_full`` / ``hvp_k2_full``: one Hessian-vector product of 1 / 2 vectors over all
  training data (what one CG iteration costs on 1 / 2 right-hand sides);
* ``hvp_k1_batch32``: one HVP on a 32-example minibatch (one LiSSA step);
* ``ggn_k1_full``: one Gauss-Newton-vector product over all data;
* ``train_grads``: per-example training gradients of all data (the scoring pass);
* ``dense`` (Iris only): the dense Hessian and its eigendecomposition (``ExactHessian.fit``);
* ``cg100`` (Iris only): 100 CG iterations on 2 right-hand sides at damping 0.01.

Each code tree is imported in its own subprocess (``--base`` names the other tree's ``src``, e.g.
a ``git worktree`` of an older commit); the subprocesses alternate (base, this, base, this, ...)
and each figure is the minimum over rounds and repetitions of the process CPU time, single
threaded, so that a shared machine disturbs the ratio as little as possible. Timings are not
asserted anywhere.

Usage::

    git worktree add --detach /tmp/base_hvp <commit>
    python benchmarks/bench_hvp.py --base /tmp/base_hvp/src [--rounds 2] [--models iris,cnn,mlp]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1] / "src"


def _best(fn: Any, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def measure(models: list[str], reps: int) -> dict[str, float]:
    """Run in a subprocess whose ``sys.path`` starts with the tree under test."""
    import torch

    torch.set_num_threads(1)
    out: dict[str, float] = {}
    for name in models:
        out.update(_measure_model(name, reps))
    return out


def _measure_model(name: str, reps: int) -> dict[str, float]:
    import warnings

    import torch

    from infl import ConjugateGradient, ExactHessian, HessianOperator, IndexedData, Objective
    from infl.model import ModelWrapper
    from infl.studies.datasets import load_digits, load_iris
    from infl.studies.fragility import train_full_batch
    from infl.studies.models import mlp, small_cnn

    if name == "iris":
        split = load_iris(seed=0, dtype=torch.float64)
        model = mlp(4, 3, 5, 1, "relu", seed=0).double()
        train_full_batch(model, split.train, 1e-3, 2000, 0.05, 0.9)
    elif name == "cnn":
        split = load_digits(seed=0, images=True)
        model = small_cnn(10, seed=0).double()
    else:
        split = load_digits(seed=0)
        model = mlp(64, 10, 256, 2, seed=0)
    model.eval()
    wrapper = ModelWrapper(model, Objective("cross_entropy", weight_decay=1e-3))
    data = IndexedData(split.train)
    batch = data.select(range(32))
    gen = torch.Generator().manual_seed(0)
    v1 = torch.randn(1, wrapper.num_params, generator=gen).to(wrapper.dtype)
    v2 = torch.randn(2, wrapper.num_params, generator=gen).to(wrapper.dtype)
    few = reps if name == "iris" else max(1, reps // 2)
    out = {
        f"{name}/hvp_k1_full": _best(lambda: wrapper.hvp(data, v1, 256), few),
        f"{name}/hvp_k2_full": _best(lambda: wrapper.hvp(data, v2, 256), few),
        f"{name}/hvp_k1_batch32": _best(lambda: wrapper.hvp(batch, v1, 256), reps),
        f"{name}/ggn_k1_full": _best(lambda: wrapper.ggn_vp(data, v1, 256), few),
        f"{name}/train_grads": _best(
            lambda: [g for _, g in wrapper.iter_train_grads(data, 256)], few
        ),
    }
    if name != "iris":
        return out

    def dense() -> None:
        operator = HessianOperator(wrapper, data, chunk_size=256)
        ExactHessian(damping=1e-3, pseudo_inverse=True).fit(operator)

    def cg100() -> None:
        operator = HessianOperator(wrapper, data, chunk_size=256)
        solver = ConjugateGradient(damping=0.01, rtol=1e-30, atol=1e-300, max_iter=100)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 100 iterations, converged or not
            solver.solve(operator, v2)

    out["iris/dense"] = _best(dense, reps)
    out["iris/cg100"] = _best(cg100, reps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="src folder of the tree to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--models", default="iris,cnn,mlp")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = args.models.split(",")
    if args.child is not None:
        sys.path.insert(0, args.child)
        print(json.dumps(measure(models, args.reps)))
        return
    best: dict[str, dict[str, float]] = {"base": {}, "this": {}}
    for _ in range(args.rounds):
        for label, src in (("base", args.base), ("this", str(HERE))):
            cmd = [sys.executable, __file__, "--base", args.base, "--child", src,
                   "--models", args.models, "--reps", str(args.reps)]  # fmt: skip
            result = json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                               check=True).stdout.splitlines()[-1])  # fmt: skip
            for key, value in result.items():
                best[label][key] = min(value, best[label].get(key, float("inf")))
    print(f"{'measurement':28s} {'base s':>10s} {'this s':>10s} {'speed-up':>9s}")
    for key in best["this"]:
        b, t = best["base"][key], best["this"][key]
        print(f"{key:28s} {b:10.4f} {t:10.4f} {b / t:8.2f}x")


if __name__ == "__main__":
    main()
