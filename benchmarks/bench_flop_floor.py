"""How close one infl curvature product runs to this machine's matrix-multiply rate.

A solver's time is (products it needs) x (cost of one). ``compare_peers.py`` compares the
first factor's outcome; this script bounds the second. For one product of ``k`` vectors over
all training data (``calc.operator.matmat``, infl's own route, kept gradient graphs included,
as CG and Arnoldi use it), it counts the floating-point operations of the matrix
multiplications and convolutions with ``torch.utils.flop_counter.FlopCounterMode`` (the
dominant ones; element-wise work is not counted), times the product, and reports the achieved
rate next to the rate of one plain matrix product of the layer's shape
(``[chunk, width] @ [width, width]``, the largest GEMM in the product). If the product runs at
a fraction ``f`` of the GEMM rate, no implementation of the same products can make it more
than ``1/f`` times faster on this machine: beating a peer that needs as many products by 3x
then needs fewer products, not cheaper ones.

Run:  python benchmarks/bench_flop_floor.py --model mlp --k 10   (iris | cnn | mlp), one thread
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hvp_routes import best
from compare_peers import CHUNK, build_problem, calculator

import infl


def gemm_rate(rows: int, inner: int, cols: int, dtype: torch.dtype) -> float:
    """FLOP/s of one ``[rows, inner] @ [inner, cols]`` product (best of 5)."""
    a = torch.randn(rows, inner, dtype=dtype)
    b = torch.randn(inner, cols, dtype=dtype)
    return 2 * rows * inner * cols / best(lambda: a @ b, repeat=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mlp", choices=["iris", "cnn", "mlp"])
    parser.add_argument("--k", type=int, default=10, help="vectors per product")
    args = parser.parse_args()
    torch.set_num_threads(1)
    problem = build_problem(args.model, quick=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calc = calculator(problem, infl.ConjugateGradient(damping=0.1))
    op = calc.operator
    vectors = torch.randn(args.k, problem.p, dtype=problem.dtype)
    op.matmat(vectors)
    op.matmat(vectors)  # the second product keeps the gradient graphs (GradientGraphs)
    counter = FlopCounterMode(display=False)
    with counter:
        op.matmat(vectors)
    flops = counter.get_total_flops()
    seconds = best(lambda: op.matmat(vectors), repeat=5)
    widths = [q.shape for q in problem.model.parameters() if q.dim() == 2]
    width = max(min(shape) for shape in widths) if widths else 64
    peak = gemm_rate(min(CHUNK, problem.n), width, width, problem.dtype)
    rate = flops / seconds
    print(
        f"{args.model}: p = {problem.p:,}, n = {problem.n:,}, k = {args.k}, "
        f"{str(problem.dtype).replace('torch.', '')}, one thread"
    )
    print(f"  one product: {seconds * 1e3:.1f} ms, {flops / 1e9:.3f} GFLOP (matmul/conv)")
    print(f"  achieved {rate / 1e9:.2f} GFLOP/s; GEMM [{min(CHUNK, problem.n)}, {width}] @ "
          f"[{width}, {width}]: {peak / 1e9:.2f} GFLOP/s")  # fmt: skip
    print(f"  fraction of the GEMM rate: {rate / peak:.2f} (bound on any speed-up: "
          f"{peak / rate:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
