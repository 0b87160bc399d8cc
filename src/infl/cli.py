"""The ``infl`` command (also ``python -m infl``).

Subcommands:

* ``infl fragility`` — rerun Basu et al. (ICLR 2021) and compare with the paper;
* ``infl fading`` — how influence fades with training time (Schioppa et al. 2023);
* ``infl correct`` — correct mis-predicted digits with influence, against two controls;
* ``infl benchmark`` — every solver and attribution baseline on digits: time, LDS, LOO, AUC;
* ``infl audit`` — can influence scores be trusted for *your* model (``--spec`` file)?

Every subcommand writes to an output directory and resumes from it when rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from infl import __version__
from infl.distributed import launched_rank
from infl.errors import InflError


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"infl: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _horizons(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated step counts like 10,100,1000, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values) or list(values) != sorted(set(values)):
        raise argparse.ArgumentTypeError(
            f"horizons must be positive and strictly increasing, got {text!r}"
        )
    return values


def build_parser() -> argparse.ArgumentParser:
    """The ``infl`` argument parser."""
    parser = _Parser(prog="infl", description="Influence functions, checked against retraining.")
    parser.add_argument("--version", action="version", version=f"infl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    frag = sub.add_parser(
        "fragility",
        help="rerun Basu, Pope & Feizi (ICLR 2021) and compare with the paper",
        description="Rerun the fragility study (Iris exact-Hessian MLPs and a small CNN) and "
        "write CSV/JSON results, PNG figures and a markdown report beside the paper's numbers. "
        "Presets: quick (~5 min on 2 CPU cores), full (~10 h on 2 cores with --workers 2; use "
        "--parts to run Iris (~28 min) and the CNN separately).",
    )
    preset = frag.add_mutually_exclusive_group()
    preset.add_argument(
        "--quick",
        action="store_const",
        const="quick",
        dest="preset",
        help="the quick preset (default)",
    )
    preset.add_argument(
        "--full",
        action="store_const",
        const="full",
        dest="preset",
        help="the full preset (the paper's step counts, 5 seeds)",
    )
    frag.add_argument("--out", help="results directory (default: results/fragility-PRESET)")
    frag.add_argument("--seeds", type=_positive_int, help="number of seeds (overrides preset)")
    frag.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="cells run in this many processes (default 1)",
    )
    frag.add_argument(
        "--parts",
        default="iris,cnn",
        help="comma-separated experiments to run: iris, cnn (default both)",
    )
    frag.add_argument("--data-dir", help="directory with real MNIST IDX or CIFAR-10 files")
    frag.add_argument(
        "--dataset",
        choices=("digits", "mnist", "cifar10"),
        default=None,
        help="CNN data: digits (shipped, default), mnist or cifar10 (need --data-dir)",
    )
    frag.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    frag.add_argument("--no-progress", action="store_true", help="no progress bars")

    fade = sub.add_parser(
        "fading",
        help="how influence fades with training time (Schioppa et al. 2023)",
        description="Retrain after each removal and a control run for several horizons, and "
        "report the correlation of predicted and actual effects and the parameter divergence.",
    )
    fade.add_argument("--out", default="results/fading", help="results directory")
    fade.add_argument(
        "--models", default="iris,digits", help="comma-separated: iris (MLP), digits (CNN)"
    )
    fade.add_argument(
        "--horizons",
        type=_horizons,
        default=(10, 100, 1000, 10000),
        help="Iris MLP horizons in steps (default 10,100,1000,10000)",
    )
    fade.add_argument(
        "--cnn-horizons",
        type=_horizons,
        default=(10, 100, 1000),
        help="digits CNN horizons in steps (default 10,100,1000)",
    )
    fade.add_argument("--workers", type=_positive_int, default=1)
    fade.add_argument("--no-progress", action="store_true")

    corr = sub.add_parser(
        "correct",
        help="correct mis-predicted digits by fine-tuning on influential examples",
        description="For every mis-predicted test digit of the digits CNN, fine-tune on the "
        "most helpful training examples by influence, by gradient similarity, and at random; "
        "report success rates, median steps and held-out accuracy change.",
    )
    corr.add_argument("--out", default="results/correct", help="results directory")
    corr.add_argument("--k", type=_positive_int, default=10, help="examples to fine-tune on")
    corr.add_argument("--lr", type=float, default=0.02, help="fine-tuning learning rate")
    corr.add_argument("--max-steps", type=_positive_int, default=50, help="step budget")
    corr.add_argument("--max-examples", type=_positive_int, help="cap on test points")
    corr.add_argument(
        "--no-figures",
        action="store_true",
        help="skip figures/correction.png (success rate and median steps per ranking)",
    )
    corr.add_argument("--no-progress", action="store_true")

    bench = sub.add_parser(
        "benchmark",
        help="every solver and attribution baseline on digits: time, LDS, LOO, mislabel AUC",
        description="Train softmax regression and a small MLP on digits with flipped labels, "
        "run every inverse-HVP solver and attribution baseline, and write benchmark.md/.csv/"
        ".json and figures: time, LDS, correlation with leave-one-out (and PBRF) retraining, "
        "mislabel-detection AUC. Presets: quick (~2 min on 2 CPU cores, default), full.",
    )
    bench_preset = bench.add_mutually_exclusive_group()
    for name, text in (("quick", "the quick preset (default)"), ("full", "the full preset")):
        bench_preset.add_argument(
            f"--{name}", action="store_const", const=name, dest="preset", help=text
        )
    bench.add_argument("--out", help="results directory (default: results/benchmark-PRESET)")
    bench.add_argument(
        "--models", default="logreg,mlp", help="comma-separated: logreg, mlp (default both)"
    )
    bench.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")

    aud = sub.add_parser(
        "audit",
        help="can influence scores be trusted for your model? evidence and verdicts",
        description="Audit influence scores on your model: curvature, solver agreement, "
        "sensitivity and a budgeted retraining check, ending in a verdict per test point. "
        "The --spec file defines setup() returning (model, objective, train_data, test_data); "
        "see docs/audit.md.",
    )
    aud.add_argument("--spec", required=True, help="Python file defining setup()")
    aud.add_argument("--out", default="results/audit", help="output directory")
    aud.add_argument(
        "--budget-minutes", type=float, default=5.0, help="wall-clock budget (default 5)"
    )
    aud.add_argument("--num-test", type=_positive_int, default=2, help="test points to audit")
    aud.add_argument(
        "--test-indices",
        default=None,
        help="comma-separated test points to audit, e.g. 3,7 (instead of --num-test)",
    )
    aud.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    aud.add_argument(
        "--fresh",
        action="store_true",
        help="delete the evidence kept in OUT/evidence and start over (default: resume it, "
        "refusing evidence of other settings)",
    )
    aud.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _fragility(args: argparse.Namespace) -> int:
    from infl.studies.fragility import PRESETS, run_fragility

    name = args.preset or "quick"
    preset = PRESETS[name]
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    bad = sorted(set(parts) - {"iris", "cnn"})
    if bad or not parts:
        raise InflError(f"--parts takes iris and/or cnn, got {args.parts!r}")
    dataset = args.dataset or ("digits" if args.data_dir is None else None)
    if dataset is None:
        raise InflError("--data-dir needs --dataset mnist or --dataset cifar10")
    if dataset != "digits" and args.data_dir is None:
        raise InflError(f"--dataset {dataset} needs --data-dir pointing at the files")
    changes: dict[str, Any] = {"cnn_dataset": dataset, "data_dir": args.data_dir}
    if args.seeds:
        changes["seeds"] = tuple(range(args.seeds))
    shipped = preset
    preset = dataclasses.replace(preset, **changes)
    out = args.out or f"results/fragility-{name}"
    minutes = shipped.expected_minutes_for(parts) * len(preset.seeds) / max(1, len(shipped.seeds))
    print(
        f"infl fragility: preset {name}, {' and '.join(parts)} ({len(preset.seeds)} seeds, "
        f"expected ~{minutes:.3g} min on 2 CPU cores with --workers 2), results in {out}"
    )
    run = run_fragility(
        preset,
        out,
        parts=parts,
        workers=args.workers,
        progress=not args.no_progress,
        figures=not args.no_figures,
    )
    print(
        f"done in {run.minutes:.1f} min: {run.agree} of {run.judged} comparisons agree with "
        f"the paper; report: {out}/report.md"
    )
    return 0


def _fading(args: argparse.Namespace) -> int:
    from infl.studies.over_time import FadingSettings, run_fading_study

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if not models or set(models) - {"iris", "digits"}:
        raise InflError(f"--models takes iris and/or digits, got {args.models!r}")
    settings = FadingSettings(horizons=args.horizons, cnn_horizons=args.cnn_horizons)
    results = run_fading_study(
        args.out, settings, models=models, workers=args.workers, progress=not args.no_progress
    )
    for res in results:
        print(f"\n{res['model']}:\n{res['table']}")
    print(f"\ntables and figures in {args.out}")
    return 0


def _correct(args: argparse.Namespace) -> int:
    from infl.studies.over_time import CorrectionSettings, run_correction_study

    if not args.lr > 0:
        raise InflError(f"--lr must be positive, got {args.lr}")
    settings = CorrectionSettings(
        k=args.k, lr=args.lr, max_steps=args.max_steps, max_examples=args.max_examples
    )
    result = run_correction_study(
        args.out, settings, progress=not args.no_progress, figures=not args.no_figures
    )
    print(result["table"])
    figures = "".join(f", {args.out}/{name}" for name in result["figures"])
    print(f"\nresults in {args.out}: correction.md, correction.csv{figures}")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from infl.studies.benchmark import MODELS, PRESETS, run_benchmark

    name = args.preset or "quick"
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if not models or set(models) - set(MODELS):
        raise InflError(f"--models takes logreg and/or mlp, got {args.models!r}")
    out = args.out or f"results/benchmark-{name}"
    preset = PRESETS[name]
    print(
        f"infl benchmark: preset {name} (expected ~{preset.expected_minutes:g} min on 2 CPU "
        f"cores), results in {out}"
    )
    run = run_benchmark(
        preset, out, models=models, progress=not args.no_progress, figures=not args.no_figures
    )
    print(run.table)
    print(f"\ndone in {run.seconds:.0f} s: {out}/benchmark.md, benchmark.csv, benchmark.json")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from infl.audit import audit, load_spec

    if not args.budget_minutes > 0:
        raise InflError(f"--budget-minutes must be positive, got {args.budget_minutes}")
    indices = None
    if args.test_indices is not None:
        try:
            indices = [int(t) for t in args.test_indices.split(",") if t.strip()]
        except ValueError:
            raise InflError(
                f"--test-indices takes comma-separated integers, got {args.test_indices!r}"
            ) from None
        if not indices:
            raise InflError("--test-indices names no test point")
    model, objective, train_data, test_data = load_spec(args.spec)
    report = audit(
        model,
        objective,
        train_data,
        test_data,
        num_test=args.num_test,
        test_indices=indices,
        budget_minutes=args.budget_minutes,
        store=os.path.join(args.out, "evidence"),
        fresh=args.fresh,
        progress=not args.no_progress,
    )
    path = report.write(args.out, figures=not args.no_figures)
    print(report.verdict_table())
    print(f"\nverdict: {report.verdict} ({report.settings['seconds']} s); report: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``infl`` command; returns the exit status.

    Under ``torchrun`` the command runs on rank 0 alone and the other ranks exit at once (0),
    so one process writes the output directory and prints (see docs/distributed.md).
    """
    rank, world = launched_rank()
    if rank > 0:
        return 0
    if world > 1:
        print(
            f"infl: launched with {world} processes: the command runs on rank 0 only (its "
            "retraining is spread over processes by --workers)",
            file=sys.stderr,
        )
    args = build_parser().parse_args(argv)
    handlers = {
        "fragility": _fragility,
        "fading": _fading,
        "correct": _correct,
        "benchmark": _benchmark,
        "audit": _audit,
    }
    try:
        return handlers[args.command](args)
    except InflError as err:
        message = " ".join(str(err).split())
        print(f"infl: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "infl: interrupted; finished work is saved, rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
