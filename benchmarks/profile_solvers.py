"""Where the time goes: each infl solver on the Iris MLP and the digits CNN, broken down.

The problems, damping and solver settings are those of ``compare_peers.py``, except that LiSSA's
depth is cut to ``--lissa-depth`` (500 by default: the breakdown is per step and does not depend
on it) and the CNN is trained on its first ``--cnn-n`` (150) examples so that its dense Hessian
fits the time of a shared machine. Each run (calculator construction + the ``[m, n]`` scores)
is done:

1. **plain**, timed (best of 3 when a run takes under 2 s): the total wall seconds reported;
2. under **cProfile**: the share of the wall time spent inside infl's building blocks
   (inclusive; a block nested in another is counted in the inner one only, see ``BLOCKS``):
   per-sample gradients (``ModelWrapper.per_example_grads``), dense Hessian assembly
   (``LinearOperator.to_dense``), other Hessian-vector products (``LinearOperator.matmat``
   outside ``to_dense``), K-FAC/EK-FAC factor passes (``kronecker_stream.stream``), and the rest
   (solver bookkeeping, linear algebra, scoring GEMMs); each share is applied to the plain time;
3. under **torch.profiler** (CPU; only runs under ``TORCH_PROFILER_MAX_SECONDS``, since the
   profiler keeps every op event in memory): the self time of all ``aten::`` operators (the
   arithmetic and its dispatch) as a share of the profiled wall time; the remainder is Python:
   torch.func transforms (vmap/jvp/grad wrappers, rebuilt closures), infl's bookkeeping, tqdm.
   Host syncs are counted as calls of ``aten::item`` / ``aten::_local_scalar_dense`` (each blocks on
   a tensor's value; on CPU the cost is the Python round trip, on GPU a device sync).

Profilers slow Python-heavy code more than kernels, so the shares are indicative; the plain total
is the number to compare.

Run:  python benchmarks/profile_solvers.py [--models iris,cnn] [--solvers exact,cg,...]
          [--lissa-depth 500] [--threads 1] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import math
import pstats
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_peers as cp
from peers.common import Problem, Setting

# (label, file suffix, function name): inclusive cProfile time of these functions. Listed from
# the innermost out: a later block's time excludes the earlier blocks' time spent inside it
# when the earlier block is *only* ever called from within it (checked per run, see _blocks).
BLOCKS: tuple[tuple[str, str, str], ...] = (
    ("per-sample grads", "infl/model.py", "per_example_grads"),
    ("dense assembly", "infl/operators.py", "to_dense"),
    ("HVPs", "infl/operators.py", "matmat"),
    ("K-FAC factor passes", "infl/solvers/kronecker_stream.py", "stream"),
)
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense")
# torch.profiler keeps every op event in memory: on the CNN's dense Hessian it passed 18 GB and
# was killed, so runs longer than this are profiled with cProfile only
TORCH_PROFILER_MAX_SECONDS = 10.0


def _run(problem: Problem, setting: Setting) -> Callable[[], Any]:
    def go() -> Any:
        calc = cp.calculator(problem, cp.infl_solver(setting))
        return calc.influence((problem.x_test, problem.y_test))

    return go


def _cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    """Inclusive seconds of the outermost function ``name`` in a file ending with ``suffix``.

    Overrides share a name and call each other (``TrainingDataOperator.to_dense`` calls
    ``LinearOperator.to_dense``), so the largest inclusive time is taken, not the sum.
    """
    best = 0.0
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in raw.items():
        if func == name and filename.replace("\\", "/").endswith(suffix):
            best = max(best, ct)
    return best


def _blocks(stats: pstats.Stats, wall: float) -> dict[str, float]:
    """Share of the wall time in each block, inner blocks subtracted from outer ones."""
    inclusive = {label: _cumulative(stats, suffix, fn) for label, suffix, fn in BLOCKS}
    shares = {}
    # HVPs inside the dense assembly belong to "dense assembly"
    hvp = max(inclusive["HVPs"] - inclusive["dense assembly"], 0.0)
    shares["per-sample grads"] = inclusive["per-sample grads"]
    shares["dense assembly"] = inclusive["dense assembly"]
    shares["HVPs"] = hvp
    # K-FAC passes compute their own per-example quantities (hooks), not per_example_grads
    shares["K-FAC factor passes"] = inclusive["K-FAC factor passes"]
    shares["other"] = max(wall - sum(shares.values()), 0.0)
    return {k: v / wall for k, v in shares.items()}


def profile_one(problem: Problem, setting: Setting) -> dict[str, Any]:
    """Plain time, cProfile shares and torch.profiler aten share for one solver."""
    run = _run(problem, setting)
    plain = math.inf
    for _ in range(3):  # best of 3 for short runs: first-call costs are not what we are after
        start = time.perf_counter()
        run()
        plain = min(plain, time.perf_counter() - start)
        if plain > 2.0:
            break

    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    run()
    prof.disable()
    cprofile_wall = time.perf_counter() - start
    shares = _blocks(pstats.Stats(prof), cprofile_wall)

    record: dict[str, Any] = {
        "model": problem.name,
        "solver": setting.label(),
        "seconds": plain,
        "shares": shares,
        "cprofile_slowdown": cprofile_wall / plain,
    }
    if plain > TORCH_PROFILER_MAX_SECONDS:
        return record
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as tprof:
        run()
    torch_wall = time.perf_counter() - start
    aten_self = 0.0
    syncs = 0
    sync_time = 0.0
    for event in tprof.key_averages():
        if event.key.startswith("aten::"):
            aten_self += event.self_cpu_time_total / 1e6
        if event.key in SYNC_OPS:
            syncs += event.count if event.key == "aten::item" else 0
            sync_time += event.self_cpu_time_total / 1e6
    record.update(
        aten_share=min(aten_self / torch_wall, 1.0),
        host_syncs=syncs,
        sync_share=sync_time / torch_wall,
        torch_profiler_slowdown=torch_wall / plain,
    )
    return record


def table(rows: list[dict[str, Any]]) -> str:
    labels = ["per-sample grads", "dense assembly", "HVPs", "K-FAC factor passes", "other"]
    head = [
        "model",
        "solver",
        "total s",
        *labels,
        "aten ops (arithmetic)",
        "Python + torch.func",
        "host syncs",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        cells = [row["model"], row["solver"], f"{row['seconds']:.3g}"]
        for label in labels:
            share = row["shares"][label]
            cells.append("—" if share < 0.005 else f"{100 * share:.0f} %")
        if "aten_share" in row:
            cells.append(f"{100 * row['aten_share']:.0f} %")
            cells.append(f"{100 * (1 - row['aten_share']):.0f} %")
            cells.append(f"{row['host_syncs']:,}")
        else:  # not run under torch.profiler (TORCH_PROFILER_MAX_SECONDS)
            cells += ["n/a", "n/a", "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="iris,cnn")
    parser.add_argument("--solvers", default=",".join(cp.SOLVERS))
    parser.add_argument("--lissa-depth", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the --quick models of compare_peers")
    parser.add_argument(
        "--cnn-n",
        type=int,
        default=150,
        help="training examples of the CNN (the dense Hessian's cost grows with n; 0: all 1,438)",
    )
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for model_name in args.models.split(","):
        n_train = args.cnn_n if model_name == "cnn" and args.cnn_n > 0 else None
        problem = cp.build_problem(model_name, args.quick, n_train)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            all_settings = cp.settings(
                problem,
                args.quick,
                functools.partial(cp.lissa_scale, problem),
                cnn_exact=True,
            )
        for name in args.solvers.split(","):
            if name not in all_settings:
                continue
            setting = all_settings[name]
            if name == "lissa":
                setting = Setting(
                    "lissa",
                    setting.damping,
                    depth=args.lissa_depth,
                    batch_size=setting.batch_size,
                    scale=setting.scale,
                )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows.append(profile_one(problem, setting))
            print(f"  {model_name} {setting.label()}: done", file=sys.stderr, flush=True)
    print(table(rows))
    print(
        f"\nshares of the wall time; blocks from cProfile, aten/Python split from torch.profiler; "
        f"{args.threads} thread(s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
