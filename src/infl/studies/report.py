"""Aggregate fragility-study cells over seeds and write CSV, JSON, figures and a report.

Every number in the report is computed here from the cell rows of this run; the paper's
numbers are the only constants, and each sits beside ours with a verdict. The seed
statistics and verdict rules live in :mod:`infl.studies.verdicts`, the figures in
:mod:`infl.studies.figures`; their names stay importable from here.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infl.store import write_atomic
from infl.studies.figures import SERIES_LABELS, trend_figure, write_figures
from infl.studies.verdicts import (
    COLLAPSE_MARGIN,
    INCONCLUSIVE,
    Comparison,
    Group,
    Stat,
    difference,
    group_rows,
    is_collapsed,
    is_inconclusive,
    stat,
    verdict_difference,
    verdict_trend,
    verdict_value,
)

__all__ = [
    "COLLAPSE_MARGIN",
    "DEPTH_TRENDS",
    "INCONCLUSIVE",
    "SERIES_LABELS",
    "SUMMARY_METRICS",
    "Comparison",
    "Group",
    "Stat",
    "cnn_comparisons",
    "difference",
    "group_rows",
    "iris_comparisons",
    "is_collapsed",
    "is_inconclusive",
    "render_markdown",
    "stat",
    "summary_rows",
    "trend_figure",
    "verdict_difference",
    "verdict_trend",
    "verdict_value",
    "write_figures",
    "write_report",
]


# ---------------------------------------------------------------------------------- tables
def _fmt_setting(**kw: Any) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in kw.items())


DEPTH_TRENDS: tuple[tuple[str, str, str, str, str], ...] = (
    # (section, metric, what it is, the paper's finding, the direction that agrees)
    ("depth", "spearman", "Spearman", "falls (sharply past depth 5)", "falls"),
    ("curvature", "top_eigenvalue", "top Hessian eigenvalue", "grows with depth", "grows"),
    (
        "LiSSA",
        "lissa_vs_exact_spearman",
        "Spearman(LiSSA, exact)",
        "stochastic estimates drift from exact with depth",
        "falls",
    ),
    (
        "Taylor gap",
        "taylor_gap_spearman",
        "Spearman(predicted, retrained ‖Δθ‖)",
        "falls with depth",
        "falls",
    ),
)


def iris_comparisons(rows: Sequence[dict[str, Any]], wd: float) -> list[Comparison]:
    """Our Iris numbers beside Basu et al. §5.1."""
    out: list[Comparison] = []
    groups = group_rows(rows, ("activation", "depth", "width", "weight_decay"), 3)
    with_wd = groups.get(("relu", 1, 5, wd))
    without = groups.get(("relu", 1, 5, 0.0))
    for label, group, paper in (("with", with_wd, 0.97), ("without", without, 0.508)):
        if group is not None:
            s = group.stat("spearman")
            out.append(
                Comparison(
                    "weight decay",
                    f"ReLU, depth 1, width 5, {label} weight decay: Spearman",
                    str(s),
                    f"{paper}",
                    verdict_value(s, paper),
                )
            )
    if with_wd is not None and without is not None:
        gain = difference(without.stat("spearman"), with_wd.stat("spearman"))
        out.append(
            Comparison(
                "weight decay",
                "Spearman with minus without weight decay",
                # the spread with two decimals, as in the verdicts: it is derived, not a
                # per-configuration number of summary.csv
                f"{gain.mean:+.3f} (spread ± {gain.std:.2f})"
                if gain.std > 0
                else f"{gain.mean:+.3f}",
                "with > without (+0.46)",
                verdict_difference(gain),
            )
        )
    for act in sorted({r["activation"] for r in rows}):
        depths = sorted(
            {
                r["depth"]
                for r in rows
                if r["activation"] == act and r["width"] == 5 and r["weight_decay"] == wd
            }
        )
        if len(depths) >= 2:
            first, last = groups[(act, depths[0], 5, wd)], groups[(act, depths[-1], 5, wd)]
            span = f"at depth {depths[0]} → {depths[-1]}"
            for section, metric, label, finding, expected in DEPTH_TRENDS:
                a, b = first.stat(metric), last.stat(metric)
                out.append(
                    Comparison(
                        section,
                        f"{act}: {label} {span}",
                        f"{a} → {b}",
                        finding,
                        verdict_trend(a, b, expected),
                    )
                )
        widths = sorted(
            {
                r["width"]
                for r in rows
                if r["activation"] == act and r["depth"] == 1 and r["weight_decay"] == wd
            }
        )
        lo = 8 if 8 in widths[:-1] else (widths[0] if widths else 0)
        if len(widths) >= 2:
            s0 = groups[(act, 1, lo, wd)].stat("spearman")
            s1 = groups[(act, 1, widths[-1], wd)].stat("spearman")
            paper_width = "0.82 → 0.56 (width 8 → 50)" if act == "relu" else "falls"
            out.append(
                Comparison(
                    "width",
                    f"{act}: Spearman at width {lo} → {widths[-1]}",
                    f"{s0} → {s1}",
                    paper_width,
                    verdict_trend(s0, s1, "falls"),
                )
            )
    return out


def cnn_comparisons(rows: Sequence[dict[str, Any]]) -> list[Comparison]:
    """Our CNN numbers beside Basu et al. §5.2."""
    out: list[Comparison] = []
    groups = group_rows(rows, ("weight_decay",), 10)
    decays = sorted(groups)
    if not decays:
        return out
    zero = groups.get((0.0,))
    positive = [d for d in decays if d[0] > 0]
    if zero is not None and positive:
        best = max(positive, key=lambda d: groups[d].stat("spearman_top").mean)
        s0, s1 = zero.stat("spearman_top"), groups[best].stat("spearman_top")
        out.append(
            Comparison(
                "CNN",
                f"Spearman (top points) without → with weight decay {best[0]:g}",
                f"{s0} → {s1}",
                "weight decay needed for good estimates",
                verdict_trend(s0, s1, "grows"),
            )
        )
    small = [d for d in positive if d[0] <= 0.01]
    large = [d for d in positive if d[0] > 0.01]
    if small and large:
        s0 = groups[small[-1]].stat("spearman_top")
        s1 = groups[large[-1]].stat("spearman_top")
        out.append(
            Comparison(
                "CNN",
                f"Spearman (top points) at weight decay {small[-1][0]:g} → {large[-1][0]:g}",
                f"{s0} → {s1}",
                "falls once weight decay exceeds 0.01",
                verdict_trend(s0, s1, "falls"),
            )
        )
    for d in decays:
        g = groups[d]
        out.append(
            Comparison(
                "CNN",
                f"weight decay {d[0]:g}: Spearman top / 30th percentile",
                f"{g.stat('spearman_top')} / {g.stat('spearman_percentile')}",
                "—",
                "measured only",
            )
        )
    return out


# ---------------------------------------------------------------------------------- outputs
SUMMARY_METRICS = (
    "init_attempts",
    "test_accuracy",
    "pearson",
    "spearman",
    "spearman_raw",
    "top_eigenvalue",
    "num_negative_eigenvalues",
    "lissa_vs_exact_spearman",
    "lissa_spearman",
    "taylor_gap_spearman",
    "taylor_gap_median_ratio",
    "pearson_top",
    "spearman_top",
    "pearson_percentile",
    "spearman_percentile",
    "damping",
)


def summary_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration: mean/std of each metric over its usable seeds."""
    out: list[dict[str, Any]] = []
    iris = [r for r in rows if r["experiment"] == "iris"]
    cnn = [r for r in rows if r["experiment"] == "cnn"]
    for experiment, part, keys, classes in (
        ("iris", iris, ("activation", "depth", "width", "weight_decay"), 3),
        ("cnn", cnn, ("dataset", "weight_decay"), 10),
    ):
        for key, group in group_rows(part, keys, classes).items():
            record: dict[str, Any] = {"experiment": experiment, **dict(zip(keys, key, strict=True))}
            record["seeds"] = len(group.rows)
            record["collapsed_seeds"] = group.collapsed
            for metric in SUMMARY_METRICS:
                if any(metric in r for r in group.rows):
                    s = group.stat(metric)
                    record[f"{metric}_mean"] = s.mean
                    record[f"{metric}_std"] = s.std
            out.append(record)
    return out


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, list)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def render_markdown(
    comparisons: Sequence[Comparison],
    summary: Sequence[dict[str, Any]],
    *,
    preset: str,
    seeds: int,
    minutes: float,
    figures: Sequence[str],
    cnn_dataset: str,
) -> str:
    """The report: our numbers beside the paper's, section by section, and a plain verdict."""
    agree = sum(c.verdict == "agrees" for c in comparisons)
    judged = sum(c.verdict != "measured only" for c in comparisons)
    unclear = sum(is_inconclusive(c.verdict) for c in comparisons)
    lines = [
        "# Influence functions in deep learning are fragile — our rerun",
        "",
        f"Preset `{preset}`, {seeds} seeds per cell, {minutes:.1f} minutes of wall time in this "
        "run. Basu, Pope & Feizi (ICLR 2021) is *the paper*; every number under *ours* was "
        "computed by this run (mean ± std over seeds; runs that collapsed to chance accuracy "
        "are excluded and counted in `summary.csv`).",
        "",
        f"**{agree} of {judged} comparisons agree with the paper**"
        + (f"; {unclear} inconclusive (the seed spread covers 0)." if unclear else "."),
        "",
    ]
    if cnn_dataset == "digits":
        lines += [
            "The CNN experiment uses scikit-learn's 8x8 digits (1,438 training images) as the "
            "offline stand-in for the paper's 10% of MNIST, with a 2,514-parameter CNN.",
            "",
        ]
    section = None
    for c in comparisons:
        if c.section != section:
            section = c.section
            lines += [
                "",
                f"## {section}",
                "",
                "| setting | ours | paper | verdict |",
                "| --- | --- | --- | --- |",
            ]
        lines.append(f"| {c.setting} | {c.ours} | {c.paper} | {c.verdict} |")
    lines += ["", "## All configurations", "", _summary_table(summary), ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{f}](figures/{f})" for f in figures] + [""]
    lines += [
        "## How to read the verdicts",
        "",
        "A number *agrees* when the paper's value lies within max(0.1, 2 std) of our mean; a "
        "trend agrees when ours moves the same way by more than 0.05. A verdict is "
        "*inconclusive* when the seed spread covers 0: for a trend or a difference, when "
        "|change| ≤ √(std₁² + std₂²), the spread of the difference of two means; for a number, "
        "when |mean| ≤ std while the paper's value is more than 0.1 from 0. Such a result "
        "neither supports nor contradicts the paper; more seeds can decide it. Differences "
        "are expected "
        "where our protocol is smaller than the paper's (fewer steps in the quick preset, the "
        "digits stand-in for MNIST) and, as Epifano et al. (2023) found, from seed variance.",
    ]
    return "\n".join(lines) + "\n"


def _summary_table(summary: Sequence[dict[str, Any]]) -> str:
    head = "| experiment | configuration | seeds (collapsed) | accuracy | Pearson | Spearman |"
    lines = [head, "| --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        if s["experiment"] == "iris":
            config = _fmt_setting(
                act=s["activation"], depth=s["depth"], width=s["width"], wd=float(s["weight_decay"])
            )
            p, sp = "pearson", "spearman"
        else:
            config = _fmt_setting(data=s["dataset"], wd=float(s["weight_decay"]))
            p, sp = "pearson_top", "spearman_top"
        cells = [_pm(s, m) for m in ("test_accuracy", p, sp)]
        lines.append(
            f"| {s['experiment']} | {config} | {s['seeds']} ({s['collapsed_seeds']}) | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def _pm(record: dict[str, Any], metric: str) -> str:
    mean, std = record.get(f"{metric}_mean", math.nan), record.get(f"{metric}_std", math.nan)
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return (
        f"{mean:.3f} ± {std:.3f}"
        if record["seeds"] - record["collapsed_seeds"] > 1
        else (f"{mean:.3f}")
    )


def write_report(
    rows: Sequence[dict[str, Any]],
    out: Path,
    *,
    preset: str,
    seeds: int,
    minutes: float,
    iris_wd: float,
    cnn_dataset: str,
    figures: bool = True,
) -> list[Comparison]:
    """Write ``cells.csv``, ``summary.csv``, ``results.json``, figures and ``report.md``."""
    iris = [r for r in rows if r["experiment"] == "iris"]
    cnn = [r for r in rows if r["experiment"] == "cnn"]
    comparisons = iris_comparisons(iris, iris_wd) + cnn_comparisons(cnn)
    summary = summary_rows(rows)
    names = write_figures(rows, out, iris_wd) if figures else []
    write_atomic(out / "cells.csv", _csv(rows))
    write_atomic(out / "summary.csv", _csv(summary))
    write_atomic(
        out / "results.json",
        json.dumps(
            {
                "cells": list(rows),
                "summary": summary,
                "comparisons": [c.__dict__ for c in comparisons],
            },
            indent=1,
            default=float,
        ),
    )
    write_atomic(
        out / "report.md",
        render_markdown(
            comparisons,
            summary,
            preset=preset,
            seeds=seeds,
            minutes=minutes,
            figures=names,
            cnn_dataset=cnn_dataset,
        ),
    )
    return comparisons
