"""The scoring pass of an ``nn.Linear`` model: training gradients formed, or multiplied directly.

Scoring needs ``V g_i`` for ``k`` vectors (inverse-HVPs, a low-rank basis) and the minimum
check needs ``sum g_i`` and ``sum |g_i|^2``. On compare_peers' trained 85k-parameter digits MLP
(float32, n = 1,438, chunks of 256, one thread, best of ``--repeat``), per pass over the
training data:

* ``formed``: the ``[b, p]`` gradients of each chunk (``ModelWrapper.train_grads``, the
  batched ``nn.Linear`` path), then ``V @ G^T`` / their sums;
* ``direct``: ``ModelWrapper.train_grad_products`` / ``train_grad_moments``, from each
  layer's inputs and output gradients without forming ``[b, p]`` (here for every ``k``; the
  library takes it while ``2 k O <= p``, ``O`` the layers' summed output widths:
  ``LinearPerExampleGradients.products_pay``);
* ``cached``: ``V @ G^T`` with all ``[n, p]`` already in memory (what a filled cache costs per
  query; filling it costs the ``formed`` pass and ``n p`` values).

Run:  python benchmarks/bench_scoring.py [--k 1 10 50 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hvp_routes import best
from compare_peers import CHUNK, build_problem, calculator

import infl
from infl.model_checks import gradient_moments


def products_row(
    wrapper: infl.ModelWrapper,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    everything: torch.Tensor,
    k: int,
    repeat: int,
) -> dict[str, float | str]:
    """Seconds of one pass of ``V g_i`` for ``k`` vectors: formed, direct, from the cache."""
    vectors = torch.randn(k, wrapper.num_params, dtype=wrapper.dtype)
    formed = best(lambda: [vectors @ wrapper.train_grads(b).T for b in batches], repeat)
    direct = best(lambda: [wrapper.train_grad_products(b, vectors) for b in batches], repeat)
    cached = best(lambda: vectors @ everything.T, repeat)
    return {"pass": f"products, k = {k}", "formed": formed, "direct": direct, "cached": cached}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 10, 50, 100])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    problem = build_problem("mlp", quick=False)
    calc = calculator(problem, infl.ConjugateGradient(damping=0.1))
    wrapper = calc.wrapper
    batches = [wrapper.prepare(b) for _, b in calc.train.chunks(CHUNK)]
    wrapper.train_grad_products(batches[0], torch.zeros(1, calc.num_params))  # the check
    assert wrapper.has_linear_shortcut
    pays = wrapper._linear_grads.products_pay
    limit = calc.num_params // (2 * wrapper._linear_grads.output_width)
    print(f"# the library multiplies directly up to k = {limit}")
    wrapper._linear_grads.products_pay = lambda k, p: True  # type: ignore[method-assign]
    everything = torch.cat([wrapper.train_grads(b) for b in batches])
    rows = [products_row(wrapper, batches, everything, k, args.repeat) for k in args.k]
    formed = best(
        lambda: list(gradient_moments((0, wrapper.train_grads(b)) for b in batches)), args.repeat
    )
    direct = best(lambda: [wrapper.train_grad_moments(b) for b in batches], args.repeat)
    rows.append({"pass": "moments (minimum check)", "formed": formed, "direct": direct})
    wrapper._linear_grads.products_pay = pays  # type: ignore[method-assign]
    print(f"# digits MLP, p = {calc.num_params:,}, n = {calc.num_train:,}, float32, one thread")
    print("| pass | formed | direct | formed / direct | cached [n, p] |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        cached_cell = f"{r['cached']:.3f} s" if "cached" in r else "—"
        print(f"| {r['pass']} | {r['formed']:.3f} s | {r['direct']:.3f} s | "
              f"{r['formed'] / r['direct']:.1f}× | {cached_cell} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
