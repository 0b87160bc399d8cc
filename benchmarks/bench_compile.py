"""Does ``torch.compile`` (CPU inductor) make infl's curvature products cheaper, and when?

For compare_peers' trained models, one thread, per product setting:

* ``full``: the full-data product CG, Arnoldi and full-batch LiSSA repeat (all training
  examples, chunks of 256); infl's route is the operator's ``matmat``, which keeps each chunk's
  gradient graph from the second product on and pays one backward pass per vector;
* ``minibatch``: minibatch LiSSA's product on a fresh random batch of 128 per step (infl's
  ``operator.subsample(128).matmat``: a new graph per step, nothing to keep).

Each is timed three ways, best of ``--repeat`` after a warm-up: infl's product; infl's own
forward-over-reverse function (``vmap(jvp(grad(loss)))``, the one ``ModelWrapper`` builds)
run eagerly; and the same function under ``torch.compile(dynamic=False)``. The compile time is
the first call's (dynamo trace + inductor codegen + C++ build of every chunk shape), measured
with an empty inductor cache ("cold", a fresh ``TORCHINDUCTOR_CACHE_DIR``) and again after
``torch._dynamo.reset()`` with that cache filled ("warm": what a second run of the same model
pays). ``break-even`` is the number of products after which compiling pays for itself against
infl's route (compile seconds / seconds saved per product; "never" when it saves nothing).

``torch.compile`` cannot trace ``torch.autograd.grad`` with ``create_graph``, so infl's kept
double-backward graphs have no compiled counterpart; the comparison is the compiled
forward-over-reverse product against whatever infl does now.

Run:  python benchmarks/bench_compile.py --models cnn mlp [--float32] [--device cuda]
          [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peers import N_TEST, build_problem, calculator

import infl
from infl.second_order import functional_evaluation, hvp_forward_over_reverse

CHUNK = 256
MINIBATCH = 128


DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def best(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return min(times)


def _batches(calc: infl.InfluenceCalculator, setting: str) -> list[Any]:
    """The prepared batches one product of ``setting`` sums over."""
    wrapper = calc.wrapper
    if setting == "full":
        return [wrapper.prepare(b) for _, b in calc.train.chunks(CHUNK)]
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(len(calc.train), generator=generator)[:MINIBATCH]
    return [wrapper.prepare(calc.train.select(index))]


def _problem_calc(name: str, dtype_name: str) -> infl.InfluenceCalculator:
    """The calculator of compare_peers' model ``name``, model and data in ``dtype`` on
    :data:`DEVICE` (trained on the CPU first, as compare_peers trains it)."""
    problem = build_problem(name, quick=False)
    dtype = getattr(torch, dtype_name)
    copy = dataclasses.replace(
        problem,
        model=problem.fresh_model().to(DEVICE, dtype),
        x_train=problem.x_train.to(DEVICE, dtype),
        y_train=problem.y_train.to(DEVICE),
        x_test=problem.x_test.to(DEVICE, dtype),
        y_test=problem.y_test.to(DEVICE),
    )
    return calculator(copy, infl.ConjugateGradient(damping=0.01))


def _summed(
    calc: infl.InfluenceCalculator,
    fn: Callable[..., torch.Tensor],
    vectors: torch.Tensor,
    batches: list[Any],
) -> torch.Tensor:
    theta = calc.wrapper.flat_params.detach()
    with functional_evaluation():
        return sum((fn(vectors, theta, b) for b in batches), torch.zeros_like(vectors))


def measure_infl(
    calc: infl.InfluenceCalculator, setting: str, k: int, repeat: int
) -> dict[str, float]:
    """Seconds per product of ``k`` vectors: infl's route and its eager forward-over-reverse."""
    op = calc.operator
    vectors = torch.randn(k, calc.num_params, dtype=calc.wrapper.dtype, device=DEVICE)
    if setting == "full":
        infl_s = best(lambda: op.matmat(vectors), repeat)
    else:
        generator = torch.Generator().manual_seed(1)
        infl_s = best(lambda: op.subsample(MINIBATCH, generator).matmat(vectors), repeat)
    product = hvp_forward_over_reverse(calc.wrapper)
    batches = _batches(calc, setting)
    eager_s = best(lambda: _summed(calc, product, vectors, batches), repeat)
    return {"infl_s": infl_s, "eager_forward_over_reverse_s": eager_s}


def measure_compiled(
    calc: infl.InfluenceCalculator, setting: str, k: int, repeat: int
) -> dict[str, float]:
    """The first compiled call's seconds, then seconds per compiled product (this process)."""
    vectors = torch.randn(k, calc.num_params, dtype=calc.wrapper.dtype, device=DEVICE)
    batches = _batches(calc, setting)
    product = hvp_forward_over_reverse(calc.wrapper)
    reference = _summed(calc, product, vectors, batches)
    compiled = torch.compile(product, dynamic=False)
    _sync()
    start = time.perf_counter()
    result = _summed(calc, compiled, vectors, batches)
    _sync()
    compile_s = time.perf_counter() - start
    compiled_s = best(lambda: _summed(calc, compiled, vectors, batches), repeat)
    error = float((result - reference).norm() / reference.norm())
    return {"compile_s": compile_s, "compiled_s": compiled_s, "relative_difference": error}


def _child(case: list[str], repeat: int, cache: str) -> dict[str, float]:
    """:func:`measure_compiled` in a fresh process whose inductor cache is ``cache``."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    command = [sys.executable, __file__, "--child", *case, "--repeat", str(repeat)]
    command += ["--device", str(DEVICE)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(name: str, dtype: str, setting: str, k: int, repeat: int) -> dict[str, Any]:
    """One row: infl and eager here, compiled in two child processes sharing a new cache
    (the first compiles from nothing, "cold"; the second finds the first's cache, "warm")."""
    row: dict[str, Any] = measure_infl(_problem_calc(name, dtype), setting, k, repeat)
    case = [name, dtype, setting, str(k)]
    cache = tempfile.mkdtemp(prefix="infl-bench-compile-")
    cold, warm = _child(case, repeat, cache), _child(case, repeat, cache)
    compiled_s = min(cold["compiled_s"], warm["compiled_s"])
    saved = row["infl_s"] - compiled_s
    row.update(
        compiled_s=compiled_s,
        compile_cold_s=cold["compile_s"],
        compile_warm_s=warm["compile_s"],
        speedup_over_infl=row["infl_s"] / compiled_s,
        break_even_cold=math.ceil(cold["compile_s"] / saved) if saved > 0 else "never",
        break_even_warm=math.ceil(warm["compile_s"] / saved) if saved > 0 else "never",
        relative_difference=cold["relative_difference"],
    )
    return row


def cases(name: str, float32: bool) -> list[tuple[str, str, int]]:
    """``(dtype, setting, k)`` for one model: its own dtype, and float32 when asked."""
    dtypes = ["float32"] if name == "mlp" else ["float64"] + (["float32"] if float32 else [])
    out = []
    for dtype in dtypes:
        m = N_TEST[name]
        out += [(dtype, "full", m), (dtype, "full", 1)]
        if name != "iris":  # Iris's LiSSA is full-batch
            out.append((dtype, "minibatch", m))
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = [
        "model",
        "product",
        "k",
        "infl",
        "eager fwd-over-rev",
        "compiled",
        "infl / compiled",
        "compile cold / warm",
        "break-even cold / warm (products)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['k']} | {r['infl_s'] * 1e3:.3g} ms | "
            f"{r['eager_forward_over_reverse_s'] * 1e3:.3g} ms | {r['compiled_s'] * 1e3:.3g} ms | "
            f"{r['speedup_over_infl']:.2f} | {r['compile_cold_s']:.1f} s / "
            f"{r['compile_warm_s']:.1f} s | {r['break_even_cold']} / {r['break_even_warm']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["iris", "cnn", "mlp"])
    parser.add_argument("--float32", action="store_true", help="also float32 copies of f64 models")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(1)
    if args.child:
        name, dtype, setting, k = args.child
        calc = _problem_calc(name, dtype)
        print(json.dumps(measure_compiled(calc, setting, int(k), args.repeat)))
        return
    rows = []
    for name in args.models:
        for dtype, setting, k in cases(name, args.float32):
            row = {"model": f"{name} ({dtype})", "setting": setting, "k": k}
            row.update(measure(name, dtype, setting, k, args.repeat))
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
