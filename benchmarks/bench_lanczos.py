"""Lanczos top-k on the ~85k-parameter digits MLP: torch-native Lanczos vs. SciPy's eigsh.

The model is 64 -> 256 -> 256 -> 10 (ReLU, float32, p = 85,002) trained briefly with Adam on
sklearn's digits (1,797 examples). Both methods see the same matrix-free
:class:`~infl.operators.HessianOperator` (one HVP = one pass over all 1,797 examples) and the
same tolerance; eigsh gets the operator through a :class:`scipy.sparse.linalg.LinearOperator`
(a NumPy round trip per product). Reported: wall time, HVPs, and the eigenvalues found.

Run::

    python benchmarks/bench_lanczos.py            # k = 5, tol = 1e-6
    python benchmarks/bench_lanczos.py --k 10 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from infl import HessianOperator, IndexedData, ModelWrapper, Objective
from infl.diagnostics import eigsh_extremes, lanczos


def digits_mlp(seed: int = 0, epochs: int = 10) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    xt = torch.tensor(x, dtype=torch.float32) / 16.0
    yt = torch.tensor(y)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(yt), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval(), (xt, yt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, data = digits_mlp()
    op = HessianOperator(ModelWrapper(model, Objective("cross_entropy")), IndexedData(data), 512)
    print(f"digits MLP: p={op.size}, n={len(data[1])}, torch threads={torch.get_num_threads()}")
    v = torch.randn(1, op.size)
    op.matmat(v)  # warm-up (first torch.func call compiles/imports)
    start = time.perf_counter()
    for _ in range(3):
        op.matmat(v)
    hvp_s = (time.perf_counter() - start) / 3
    print(f"one HVP (full data): {hvp_s * 1e3:.1f} ms")
    for name, fn in (("torch lanczos", lanczos), ("scipy eigsh", eigsh_extremes)):
        times = []
        for _ in range(args.repeats):
            before = op.num_matvecs
            start = time.perf_counter()
            res = fn(op, args.k, which="largest", tol=args.tol, seed=0)
            times.append(time.perf_counter() - start)
            hvps = op.num_matvecs - before
        best = min(times)
        top = ", ".join(f"{float(t):.7g}" for t in res.largest)
        print(
            f"{name:<14} top-{args.k}: {best:7.2f} s  {hvps:4d} HVPs "
            f"({best / max(hvps, 1) * 1e3:.0f} ms/HVP incl. overhead), converged={res.converged}"
            f"\n    eigenvalues [{top}]"
        )


if __name__ == "__main__":
    main()
