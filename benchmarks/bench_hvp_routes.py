"""Every route to one Hessian-vector product, on compare_peers' models: is any below autograd's?

For ``k`` vectors over all training data (chunks of 256), one thread, best of 3, per route:

* ``loop``: ``torch.autograd.grad`` double backward, one backward pass of the gradient graph
  per vector (infl's default for ``p >= 1000`` or ``k <= 4``);
* ``is_grads_batched``: the same graph, one vmapped backward pass for all ``k`` vectors;
* ``vmap(vjp(grad))`` (reverse over reverse in ``torch.func``, pyDVL's route) and
  ``vmap(jvp(grad))`` (forward over reverse);
* ``retained``: the gradient graph built once and kept, each product one backward pass of it
  (what a solver could save per iteration by keeping the graph of the full data);
* ``float32``: the ``loop`` route on a float32 copy (float64 models only);
* ``infl, kept graph`` and ``infl, chain by hand``: infl's full-data ``HessianOperator``
  after its warm-up products, with ``second_order="reverse-over-reverse"`` (the kept
  double-backward graphs) and with the default, which on an ``nn.Sequential`` of
  ``nn.Linear`` layers and element-wise activations (Iris, digits MLP) runs the chain's
  products by hand (``infl.chain_hvp``); ``infl GGN, ...``: the same for the
  ``GaussNewtonOperator`` (``torch.func`` ``jvp`` and ``vjp`` against the chain by hand);
  all timed alternately, ``--repeat`` times each (the ratio column is against ``loop``).

Run:  python benchmarks/bench_hvp_routes.py --model mlp --k 10   (iris | cnn | mlp)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

import infl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peers import build_problem

CHUNK = 256


def best(fn: Callable[[], object], repeat: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def routes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> dict[str, float]:
    names = [n for n, _ in model.named_parameters()]
    params = {n: q.detach() for n, q in model.named_parameters()}
    vectors = {n: torch.randn(k, *q.shape, dtype=q.dtype) for n, q in params.items()}
    chunks = [(x[s : s + CHUNK], y[s : s + CHUNK]) for s in range(0, len(y), CHUNK)]

    def loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xb,))
        return torch.nn.functional.cross_entropy(out, yb, reduction="sum")

    theta = [q.clone().requires_grad_(True) for q in params.values()]

    def gradient_graph(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        value = loss(dict(zip(names, theta, strict=True)), xb, yb)
        return torch.autograd.grad(value, theta, create_graph=True)

    def autograd_route(batched: bool, kept: list[tuple[torch.Tensor, ...]] | None) -> None:
        for i, (xb, yb) in enumerate(chunks):
            g = kept[i] if kept is not None else gradient_graph(xb, yb)
            if batched:
                torch.autograd.grad(
                    g, theta, [vectors[n] for n in names], is_grads_batched=True, retain_graph=True
                )
            else:
                for j in range(k):
                    torch.autograd.grad(g, theta, [vectors[n][j] for n in names], retain_graph=True)

    def functorch_route(forward: bool) -> None:
        for xb, yb in chunks:

            def g(p: dict[str, torch.Tensor], xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> dict:
                return grad(loss)(p, xb, yb)

            if forward:
                vmap(lambda v: jvp(g, (params,), (v,))[1])(vectors)
            else:
                pull = vjp(g, params)[1]
                vmap(lambda v, pull=pull: pull(v)[0])(vectors)

    kept = [gradient_graph(xb, yb) for xb, yb in chunks]
    return {
        "loop": best(lambda: autograd_route(False, None)),
        "is_grads_batched": best(lambda: autograd_route(True, None)),
        "vmap(vjp(grad))": best(lambda: functorch_route(False)),
        "vmap(jvp(grad))": best(lambda: functorch_route(True)),
        "retained": best(lambda: autograd_route(False, kept)),
    }


def infl_routes(model: torch.nn.Module, problem: object, k: int, repeat: int) -> dict[str, float]:
    """infl's operator, kept graph against the chain by hand, timed alternately."""
    data = infl.IndexedData((problem.x_train, problem.y_train))  # type: ignore[attr-defined]
    operators: dict[str, infl.LinearOperator] = {}
    routes = (
        ("infl, kept graph", "reverse-over-reverse", infl.HessianOperator),
        ("infl, chain by hand", "auto", infl.HessianOperator),
        ("infl GGN, torch.func", "forward-over-reverse", infl.GaussNewtonOperator),
        ("infl GGN, chain by hand", "auto", infl.GaussNewtonOperator),
    )
    for name, mode, kind in routes:
        wrapper = infl.ModelWrapper(model, infl.Objective("cross_entropy"), second_order=mode)
        operators[name] = kind(wrapper, data, chunk_size=CHUNK, dense=False)
    p = sum(q.numel() for q in model.parameters())
    vectors = torch.randn(k, p, dtype=next(model.parameters()).dtype)
    for op in operators.values():
        op.matmat(vectors)
        op.matmat(vectors)  # graphs and primal passes are kept from the second product on
    times: dict[str, list[float]] = {name: [] for name in operators}
    for _ in range(repeat):
        for name, op in operators.items():
            start = time.perf_counter()
            op.matmat(vectors)
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mlp", choices=["iris", "cnn", "mlp"])
    parser.add_argument("--k", type=int, default=2, help="vectors per product")
    parser.add_argument("--repeat", type=int, default=20, help="alternate infl runs, each")
    args = parser.parse_args()
    torch.set_num_threads(1)
    problem = build_problem(args.model, quick=False)
    model = problem.fresh_model()
    times = routes(model, problem.x_train, problem.y_train, args.k)
    times.update(infl_routes(model, problem, args.k, args.repeat))
    if problem.dtype == torch.float64:
        low = routes(
            problem.fresh_model().float(), problem.x_train.float(), problem.y_train, args.k
        )
        times["float32 (loop)"] = low["loop"]
    base = times["loop"]
    print(f"{args.model}: p = {problem.p:,}, n = {problem.n:,}, k = {args.k}, one thread")
    for name, seconds in times.items():
        print(f"  {name:18s} {seconds * 1e3:9.2f} ms   {base / seconds:5.2f}x the loop's speed")


if __name__ == "__main__":
    main()
