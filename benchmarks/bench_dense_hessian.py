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

With ``--closed-form`` it times, for the ``nn.Sequential`` MLPs (``iris``, ``mlp-w``,
``tanh-w``), the closed form that ``HessianOperator.to_dense`` takes for them
(``infl.sequential_hessian``) against ``p`` products and the structured route; the closed
form's gates (``MAX_ROWS`` on ``K + 2`` plus the widths of the smooth activations, and
``p < 1000``) are lifted here so that every model is timed.

With ``--ggn`` it times the dense Gauss-Newton matrix of the MLPs instead: from per-example
Kronecker factors (``infl.linear_ggn``, infl's route for ``nn.Linear`` models) against
per-example output Jacobians (the general route).

Run:  python benchmarks/bench_dense_hessian.py [--models cnn mlp-16 tanh-16] [--n 1438]
      [--closed-form] [--ggn] [--json out.json]
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
from infl import second_order, sequential_hessian, structured_hessian
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


def _best_of(job, repeat: int) -> tuple[object, float]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = job()
        best = min(best, time.perf_counter() - start)
    return out, best


def closed_form_row(name: str, n: int, repeat: int) -> dict[str, object]:
    """The closed form against ``p`` products and the structured route (best of ``repeat``,
    each on a fresh operator)."""
    model, x, y = problem(name, n)
    plain, plain_s = _best_of(lambda: LinearOperator.to_dense(operator(model, x, y)), repeat)
    _, structured_s = _best_of(
        lambda: structured_hessian.assemble_hessian(operator(model, x, y), min_params=0), repeat
    )

    def closed() -> torch.Tensor:
        op = operator(model, x, y)
        found = sequential_hessian.sequential_hessian(
            op.wrapper, op.data, op.chunk_size, max_rows=10**9
        )
        assert found is not None
        return found[0]

    matrix, closed_s = _best_of(closed, repeat)
    assert isinstance(plain, torch.Tensor)
    assert isinstance(matrix, torch.Tensor)
    widths = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    smooth = not any(isinstance(m, nn.ReLU) for m in model.modules())
    return {
        "model": name,
        "p": plain.shape[0],
        "n": len(y),
        "K + 2 + smooth widths": widths[-1] + 2 + (sum(widths[:-1]) if smooth else 0),
        "products s": round(plain_s, 4),
        "structured s": round(structured_s, 4),
        "closed form s": round(closed_s, 4),
        "products / closed form": round(plain_s / closed_s, 2),
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
    parser.add_argument(
        "--closed-form",
        action="store_true",
        help="time the closed form of nn.Sequential MLPs against the products (MLPs, iris)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="best of (--closed-form)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        if args.closed_form:
            rows.append(closed_form_row(name, args.n, args.repeat))
        else:
            rows.append(ggn_row(name, args.n) if args.ggn else row(name, args.n))
        print(rows[-1], flush=True)
    _print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
