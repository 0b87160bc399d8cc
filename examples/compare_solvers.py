"""Compare every inverse-HVP solver and attribution baseline on digits (a couple of minutes).

Runs the quick preset of ``infl benchmark``: softmax regression and a small MLP trained on
digits with 10% flipped labels; each method is scored on time, the linear datamodeling score,
correlation with leave-one-out (and PBRF) retraining, and mislabel-detection AUC. Writes
``benchmark.md``, ``benchmark.csv``, ``benchmark.json`` and ``figures/benchmark_*.png``.

    python examples/compare_solvers.py [OUT_DIR]

Rerunning with the same directory resumes (finished rows and retrains are loaded).
"""

from __future__ import annotations

import sys

from infl.studies.benchmark import PRESETS, run_benchmark


def main(out_dir: str = "results/compare_solvers") -> None:
    run = run_benchmark(PRESETS["quick"], out_dir, progress=False)
    print(run.table)
    print(f"\n{run.seconds:.0f} s; tables and figures ({', '.join(run.figures)}) in {out_dir}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
