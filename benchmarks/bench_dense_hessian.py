"""The dense Hessian: ``p`` products against the Gauss-Newton matrix plus a few layers' columns.

``HessianOperator.to_dense`` assembles the Hessian as the Gauss-Newton matrix plus the HVP
columns of the layers that the residual term couples (``infl.structured_hessian``). This
times both routes on the same trained model, one after the other, each on a fresh operator
(so that neither reuses the other's kept graphs), float64, one thread:

* ``products``: ``LinearOperator.to_dense``, ``p`` Hessian-vector products in blocks of 256;
* ``structured``: ``infl.structured_hessian.assemble_hessian`` with ``min_params=0``.

and reports the products each made, the seconds, their ratio and the largest difference
between the two matrices relative to the largest entry.

Models: compare_peers' Iris MLP (``iris``: 4-5-3, ReLU, p = 43, all 120 examples) and
digits CNN (``cnn``: conv 120, conv 1,744, linear 650 parameters, ReLU and max-pooling) on
its first ``--n`` training examples, and digits MLPs 64-w-10 with ReLU (``mlp-w``) or tanh
(``tanh-w``) trained here for 300 L-BFGS steps.

With ``--ggn`` it times the dense Gauss-Newton matrix of the MLPs instead: from per-example
Kronecker factors (``infl.linear_ggn``, infl's route for ``nn.Linear`` models) against
per-example output Jacobians (the general route).

Run:  python benchmarks/bench_dense_hessian.py [--models cnn mlp-16 tanh-16] [--n 1438]
      [--ggn] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peers import _train, build_problem

import infl
from infl import second_order, structured_hessian
from infl.operators import HessianOperator, LinearOperator
from infl.studies import datasets


def problem(name: str, n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The trained model ``name`` and its first ``n`` training examples (float64)."""
    if name in ("cnn", "iris"):
        prob = build_problem(name, quick=False, n_train=n)
        return prob.fresh_model(), prob.x_train, prob.y_train
    kind, width = name.split("-")
    split = datasets.load_digits(seed=0, dtype=torch.float64)
    torch.manual_seed(0)
    act: nn.Module = nn.ReLU() if kind == "mlp" else nn.Tanh()
    model = nn.Sequential(nn.Linear(64, int(width)), act, nn.Linear(int(width), 10)).double()
    x, y = split.x_train[:n], split.y_train[:n]
    _train(model, x, y, steps=300, lbfgs=True)
    return model.eval(), x, y


def operator(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> HessianOperator:
    wrapper = infl.ModelWrapper(model, infl.Objective("cross_entropy", weight_decay=0.0))
    return HessianOperator(wrapper, infl.IndexedData((x, y)), chunk_size=256)


def row(name: str, n: int) -> dict[str, object]:
    model, x, y = problem(name, n)
    plain_op = operator(model, x, y)
    start = time.perf_counter()
    plain = LinearOperator.to_dense(plain_op)
    plain_s = time.perf_counter() - start
    new_op = operator(model, x, y)
    start = time.perf_counter()
    matrix, record = structured_hessian.assemble_hessian(new_op, min_params=0)
    new_s = time.perf_counter() - start
    return {
        "model": name,
        "p": plain_op.size,
        "n": len(y),
        "groups": ", ".join(f"{g or '-'}: {size}" for g, size in record.groups),
        "columns of": ", ".join(record.column_groups) or "-",
        "method": record.method,
        "products (plain)": plain_op.num_matvecs,
        "products (structured)": record.products,
        "plain s": round(plain_s, 3),
        "structured s": round(new_s, 3),
        "speed-up": round(plain_s / new_s, 2),
        "max diff / max": float((matrix - plain).abs().max() / plain.abs().max()),
    }


def ggn_row(name: str, n: int) -> dict[str, object]:
    """The dense Gauss-Newton matrix of an ``nn.Linear`` model: per-example Kronecker factors
    (``infl.linear_ggn``, what infl takes) against per-example output Jacobians (the general
    route, forced by switching the factors off)."""
    model, x, y = problem(name, n)
    wrapper = infl.ModelWrapper(model, infl.Objective("cross_entropy", weight_decay=0.0))
    data = infl.IndexedData((x, y))
    start = time.perf_counter()
    kronecker = wrapper.ggn_matrix(data, 256)
    kronecker_s = time.perf_counter() - start
    factors = second_order._linear_dense_ggn
    second_order._linear_dense_ggn = lambda *args: None  # type: ignore[assignment]
    try:
        start = time.perf_counter()
        jacobians = wrapper.ggn_matrix(data, 256)
        jacobians_s = time.perf_counter() - start
    finally:
        second_order._linear_dense_ggn = factors  # type: ignore[assignment]
    assert kronecker is not None
    assert jacobians is not None
    return {
        "model": name,
        "p": wrapper.num_params,
        "n": len(y),
        "Jacobians s": round(jacobians_s, 3),
        "Kronecker factors s": round(kronecker_s, 3),
        "speed-up": round(jacobians_s / kronecker_s, 2),
        "max diff / max": float((kronecker - jacobians).abs().max() / jacobians.abs().max()),
    }


def _print_table(rows: list[dict[str, object]]) -> None:
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for r in rows:
        cells = [f"{v:.1e}" if k == "max diff / max" else str(v) for k, v in r.items()]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp-16", "tanh-16"])
    parser.add_argument("--n", type=int, default=1438)
    parser.add_argument(
        "--ggn", action="store_true", help="time the dense Gauss-Newton matrix instead (MLPs)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        rows.append(ggn_row(name, args.n) if args.ggn else row(name, args.n))
        print(rows[-1], flush=True)
    _print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
