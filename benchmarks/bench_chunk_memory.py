"""K-FAC / EK-FAC on a 1.2M-parameter ResNet at several ``chunk_size``: time, kernel time, memory.

On a CPU, glibc serves every block of 32 MiB or more by a fresh ``mmap`` that it unmaps on
free, so a chunk whose activations are that large gets fresh pages, faulted in and zeroed by
the kernel, for every tensor of every pass (``infl.chunking``). This runs infl's ``KFAC`` /
``EKFAC`` on ``small_resnet(width=64)`` (the model of ``bench_resnet_peers.py``: GroupNorm
frozen, synthetic CIFAR-shaped data, 10 test points, damping 1e-3, float32, one thread), from
the constructor to the ``[10, n]`` scores, once per process (a fresh process per run, so
that no run inherits another's heap), the settings alternating ``--repeat`` times. Each row:
wall seconds, user and kernel (system) CPU seconds, minor page faults and peak RSS.
``--malloc-env`` adds a run at 256 per chunk in a process started with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=64 GiB MALLOC_TOP_PAD_=1 GiB`` (glibc keeps
freed memory for reuse, whatever its size).

Run:  python benchmarks/bench_chunk_memory.py [--n 1024] [--solvers kfac ekfac]
          [--chunks auto 256] [--repeat 1] [--malloc-env]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
MALLOC_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
    "MALLOC_TOP_PAD_": str(1 << 30),
}


def one_run(method: str, n: int, chunk: str) -> dict[str, float | int | str]:
    """One run in this process: the measurements of :func:`main`'s table."""
    import torch

    sys.path.insert(0, str(HERE))
    import bench_resnet_peers as brp
    import compare_peers as cp

    import infl

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    prob = brp.problem(n)
    solver = (infl.KFAC if method == "kfac" else infl.EKFAC)(damping=brp.DAMPING)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    calc = infl.InfluenceCalculator(
        prob.fresh_model(),
        cp.objective(),
        (prob.x_train, prob.y_train),
        solver,
        chunk_size=chunk if chunk == "auto" else int(chunk),
        progress=False,
        check_minimum=False,
    )
    calc.influence((prob.x_test, prob.y_test))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "chunk": calc.chunk_size,
        "seconds": seconds,
        "user": after.ru_utime - before.ru_utime,
        "system": after.ru_stime - before.ru_stime,
        "faults": after.ru_minflt - before.ru_minflt,
        "peak_mb": after.ru_maxrss // 1024,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--solvers", nargs="+", default=["kfac", "ekfac"])
    parser.add_argument("--chunks", nargs="+", default=["auto", "256"])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--malloc-env", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("SOLVER", "N", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        method, n, chunk = args.one
        print(json.dumps(one_run(method, int(n), chunk)))
        return
    runs = [(chunk, False) for chunk in args.chunks]
    if args.malloc_env:
        runs.append(("256", True))
    print(f"# small_resnet(width=64), n = {args.n}, one thread, a fresh process per run")
    columns = "solver | chunk_size | malloc env | seconds | user s | system s | faults | peak MB"
    print(f"| {columns} |")
    print("| --- " * 8 + "|")
    for method in args.solvers:
        for _ in range(args.repeat):
            for chunk, malloc in runs:
                env = {**os.environ, **(MALLOC_ENV if malloc else {})}
                command = [sys.executable, __file__, "--one", method, str(args.n), chunk]
                out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                label = f"{chunk} → {r['chunk']}" if chunk == "auto" else chunk
                print(
                    f"| {method} | {label} | {'yes' if malloc else 'no'} | {r['seconds']:.1f} | "
                    f"{r['user']:.1f} | {r['system']:.1f} | {r['faults']:,} | {r['peak_mb']:,} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
