"""Aggregate fragility-study cells over seeds and write CSV, JSON, figures and a report.

Every number in the report is computed here from the cell rows of this run; the paper's
numbers are the only constants, and each sits beside ours with a verdict.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infl.store import write_atomic

COLLAPSE_MARGIN = 0.05
"""A run whose test accuracy is within this of chance (1/C) is *collapsed* (a dead network):
its influence numbers say nothing about influence functions, so it is excluded from means and
counted separately."""


@dataclass(frozen=True)
class Stat:
    """Mean ± std of one metric over the usable seeds of one configuration."""

    mean: float
    std: float
    count: int

    def __str__(self) -> str:
        if self.count == 0 or math.isnan(self.mean):
            return "n/a"
        if self.count == 1:
            return f"{self.mean:.3f}"
        return f"{self.mean:.3f} ± {self.std:.3f}"


def stat(values: Iterable[float]) -> Stat:
    """Mean and sample standard deviation of the finite values."""
    arr = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return Stat(math.nan, math.nan, 0)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return Stat(float(arr.mean()), std, int(arr.size))


def is_collapsed(row: dict[str, Any], num_classes: int) -> bool:
    """Whether a run ended at chance accuracy (see :data:`COLLAPSE_MARGIN`)."""
    return bool(row["test_accuracy"] <= 1.0 / num_classes + COLLAPSE_MARGIN)


@dataclass
class Group:
    """The seeds of one configuration."""

    key: tuple[Any, ...]
    rows: list[dict[str, Any]]
    usable: list[dict[str, Any]] = field(default_factory=list)

    def stat(self, metric: str) -> Stat:
        return stat(float(r[metric]) for r in self.usable if metric in r)

    @property
    def collapsed(self) -> int:
        return len(self.rows) - len(self.usable)


def group_rows(
    rows: Sequence[dict[str, Any]], keys: Sequence[str], num_classes: int
) -> dict[tuple[Any, ...], Group]:
    """Group rows by ``keys`` (seeds pooled); mark collapsed runs."""
    groups: dict[tuple[Any, ...], Group] = {}
    for row in rows:
        key = tuple(row[k] for k in keys)
        group = groups.setdefault(key, Group(key, []))
        group.rows.append(row)
        if not is_collapsed(row, num_classes):
            group.usable.append(row)
    return groups


# ---------------------------------------------------------------------------------- verdicts
INCONCLUSIVE = "inconclusive"
"""Prefix of a verdict whose seed spread is too wide to support or contradict the paper."""


def is_inconclusive(verdict: str) -> bool:
    """Whether ``verdict`` is an *inconclusive* one (see :func:`verdict_trend`)."""
    return verdict.startswith(INCONCLUSIVE)


def difference(first: Stat, last: Stat) -> Stat:
    """``last - first`` with the seed spread of a difference, :math:`\\sqrt{s_1^2 + s_2^2}`."""
    return Stat(
        last.mean - first.mean, math.hypot(first.std, last.std), min(first.count, last.count)
    )


def _covers_zero(diff: Stat) -> bool:
    """Whether ``mean ± std`` contains 0 (never for a zero spread: one seed says nothing)."""
    return diff.std > 0 and abs(diff.mean) <= diff.std


def verdict_value(ours: Stat, paper: float, tolerance: float = 0.1) -> str:
    """Compare our mean ± std with the paper's value.

    *Inconclusive* when our spread covers 0 (``|mean| <= std``) while the paper's value is
    farther than ``tolerance`` from 0: a sign we cannot establish cannot agree with one.
    Otherwise it *agrees* when the paper's value lies within max(tolerance, 2 std) of our
    mean, and *differs* beyond that.
    """
    if ours.count == 0:
        return "no usable runs"
    if _covers_zero(ours) and abs(paper) > tolerance:
        return (
            f"{INCONCLUSIVE} (spread covers 0: ours is {ours.mean:+.2f} ± {ours.std:.2f}, "
            f"the paper {paper:g})"
        )
    slack = max(tolerance, 2 * ours.std)
    diff = ours.mean - paper
    if abs(diff) <= slack:
        return "agrees"
    return f"differs: ours is {'higher' if diff > 0 else 'lower'} by {abs(diff):.2f}"


def verdict_difference(diff: Stat, margin: float = 0.05) -> str:
    """A difference the paper found positive: agrees when ``mean > margin``.

    *Inconclusive* when its spread covers 0 (``|mean| <= std``, ``std`` the spread of the
    difference from :func:`difference`).
    """
    if diff.count == 0:
        return "no usable runs"
    if _covers_zero(diff):
        return f"{INCONCLUSIVE} (spread covers 0: {diff.mean:+.2f} ± {diff.std:.2f})"
    return "agrees" if diff.mean > margin else f"differs: no clear gain ({diff.mean:+.2f})"


def verdict_trend(first: Stat, last: Stat, expected: str, margin: float = 0.05) -> str:
    """Compare the direction from ``first`` to ``last`` with ``expected`` (falls/grows).

    The change ``last - first`` has the seed spread :math:`\\sqrt{s_1^2 + s_2^2}`. When that
    spread covers 0 (``|change| <= spread``) the verdict is *inconclusive*: more seeds could
    show either direction. Otherwise the trend *falls* or *grows* when the change exceeds
    ``margin`` (else it is *flat*), and *agrees* when that is ``expected``.
    """
    if first.count == 0 or last.count == 0:
        return "no usable runs"
    diff = difference(first, last)
    change = diff.mean
    if _covers_zero(diff):
        return f"{INCONCLUSIVE} (spread covers 0: change {change:+.2f} ± {diff.std:.2f})"
    if change < -margin:
        ours = "falls"
    elif change > margin:
        ours = "grows"
    else:
        ours = "flat"
    return "agrees" if ours == expected else f"differs: ours {ours} ({change:+.2f})"


# ---------------------------------------------------------------------------------- tables
@dataclass
class Comparison:
    """One line of the report: what is compared, our number, the paper's, the verdict."""

    section: str
    setting: str
    ours: str
    paper: str
    verdict: str


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


SERIES_LABELS: dict[str, str] = {
    "pearson": "Pearson r: predicted vs. retrained change of the test loss",
    "spearman": "Spearman ρ: the same, by rank",
    "top_eigenvalue": "λ_max, the top eigenvalue of the Hessian of J",
    "lissa_vs_exact_spearman": "Spearman ρ: LiSSA vs. exact influence",
    "taylor_gap_spearman": "Spearman ρ: predicted vs. retrained ‖Δθ‖ (Taylor gap)",
    "spearman_top": "Spearman ρ at the highest-influence training points",
    "spearman_percentile": "Spearman ρ at the 30th-percentile training points",
}
"""What each line of a trend figure is (the legend entry of each metric)."""


def trend_figure(
    x: Sequence[float],
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    note: str | None = None,
    correlation: bool = True,
    categorical: bool = False,
    log_x: bool = False,
) -> Any:
    """Lines of mean ± std against a swept setting, with the legend under the axes.

    Parameters
    ----------
    x
        The swept values (depth, width, weight decay, horizon, ...).
    series
        Legend label → ``(means, stds)``, aligned with ``x``; a zero or NaN std draws no bar.
        The series are nudged sideways a little so that their error bars do not overlap.
    xlabel, ylabel, title
        Axis labels (with units) and the title.
    note
        The legend's title, e.g. what the error bars are.
    correlation
        The y axis is a correlation: fixed limits around [-1, 1] and a line at 0.
    categorical
        Place the ``x`` values at equal spacing, labelled with their values (for sweeps such
        as weight decay ``0, 0.001, 0.01, 0.1`` that no numeric axis shows well).
    log_x
        A logarithmic x axis (ignored when ``categorical``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.6), layout="constrained")
    ax = fig.add_subplot()
    xs = np.arange(len(x), dtype=float) if categorical else np.asarray(x, dtype=float)
    if categorical:
        ax.set_xticks(xs, [f"{v:g}" for v in x])
    elif log_x:
        ax.set_xscale("log")
    k = len(series)
    span = 1.0 if categorical or len(xs) < 2 else float(xs.max() - xs.min())
    lows = [-0.05]
    for i, (label, (means, stds)) in enumerate(series.items()):
        offset = (i - (k - 1) / 2) * (0.06 if categorical else 0.015)
        px = xs * 10**offset if log_x and not categorical else xs + offset * span
        ys = np.asarray(means, dtype=float)
        err = np.nan_to_num(np.asarray(stds, dtype=float), nan=0.0)
        if err.any():
            ax.errorbar(px, ys, yerr=err, marker="o", markersize=4, capsize=3, label=label)
        else:
            ax.plot(px, ys, marker="o", markersize=4, label=label)
        if np.isfinite(ys).any():
            lows.append(float(np.nanmin(ys - err)))
    if correlation:
        ax.set_ylim(max(-1.1, min(lows) - 0.05), 1.1)
        ax.axhline(0.0, color="0.6", linewidth=0.8, linestyle="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=8, title=note, title_fontsize=8, frameon=False)
    return fig


def _trend_figure(
    rows: Sequence[dict[str, Any]],
    x_key: str,
    fixed: dict[str, Any],
    metrics: Sequence[str],
    xlabel: str,
    ylabel: str,
    title: str,
    correlation: bool = True,
    categorical: bool = False,
) -> Any:
    groups = group_rows(
        [r for r in rows if all(r[k] == v for k, v in fixed.items())],
        (x_key,),
        3 if rows and rows[0]["experiment"] == "iris" else 10,
    )
    xs = sorted(groups)
    if len(xs) < 2:
        return None
    series = {}
    counts = []
    for m in metrics:
        stats = [groups[x].stat(m) for x in xs]
        counts += [s.count for s in stats if s.count]
        series[SERIES_LABELS.get(m, m)] = ([s.mean for s in stats], [s.std for s in stats])
    lo, hi = (min(counts), max(counts)) if counts else (0, 0)
    seeds = f"{lo}" if lo == hi else f"{lo}–{hi}"
    return trend_figure(
        [x[0] for x in xs],
        series,
        xlabel=xlabel,
        ylabel=ylabel,
        title=title,
        note=f"points: mean over {seeds} seeds; bars: ± 1 std (collapsed runs excluded)",
        correlation=correlation,
        categorical=categorical,
    )


def write_figures(rows: Sequence[dict[str, Any]], out: Path, iris_wd: float) -> list[str]:
    """The analogues of the paper's Figs 1–3; returns the file names written."""
    try:
        import matplotlib  # noqa: F401

        from infl.plotting import plot_predicted_vs_actual
    except ImportError:  # pragma: no cover - matplotlib is optional
        return []
    figures: dict[str, Any] = {}
    iris = [r for r in rows if r["experiment"] == "iris"]
    cnn = [r for r in rows if r["experiment"] == "cnn"]
    for wd, name in ((iris_wd, "with"), (0.0, "without")):
        match = [
            r
            for r in iris
            if (r["activation"], r["depth"], r["width"], r["weight_decay"]) == ("relu", 1, 5, wd)
        ]
        if match:
            r = match[0]
            figures[f"fig1_iris_{name}_weight_decay.png"] = plot_predicted_vs_actual(
                r["predicted"],
                r["actual"],
                title=f"Iris, ReLU depth 1 width 5, {name} weight decay (seed {r['seed']})",
            )
    specs: list[tuple[str, dict[str, Any]]] = []
    for act in sorted({r["activation"] for r in iris}):
        depth_sweep = {
            "rows": iris,
            "x_key": "depth",
            "xlabel": "depth (hidden layers)",
            "fixed": {"activation": act, "weight_decay": iris_wd, "width": 5},
        }
        width_sweep = {
            "rows": iris,
            "x_key": "width",
            "xlabel": "width (units per hidden layer)",
            "fixed": {"activation": act, "weight_decay": iris_wd, "depth": 1},
        }
        specs += [
            (
                f"fig2_iris_depth_{act}.png",
                {
                    **depth_sweep,
                    "metrics": ("pearson", "spearman"),
                    "ylabel": "correlation (predicted vs. retrained)",
                    "title": f"Iris {act}, width 5: influence vs. retraining, by depth",
                },
            ),
            (
                f"fig2_iris_width_{act}.png",
                {
                    **width_sweep,
                    "metrics": ("pearson", "spearman"),
                    "ylabel": "correlation (predicted vs. retrained)",
                    "title": f"Iris {act}, depth 1: influence vs. retraining, by width",
                },
            ),
            (
                f"fig3_iris_eigenvalue_depth_{act}.png",
                {
                    **depth_sweep,
                    "metrics": ("top_eigenvalue",),
                    "ylabel": "λ_max (loss per unit parameter²)",
                    "title": f"Iris {act}, width 5: curvature by depth",
                    "correlation": False,
                },
            ),
            (
                f"fig3_iris_lissa_taylor_depth_{act}.png",
                {
                    **depth_sweep,
                    "metrics": ("lissa_vs_exact_spearman", "taylor_gap_spearman"),
                    "ylabel": "Spearman ρ",
                    "title": f"Iris {act}, width 5: LiSSA vs. exact, and the Taylor gap",
                },
            ),
        ]
    if cnn:
        specs.append(
            (
                "fig3_cnn_weight_decay.png",
                {
                    "rows": cnn,
                    "x_key": "weight_decay",
                    "fixed": {},
                    "metrics": ("spearman_top", "spearman_percentile"),
                    "xlabel": "weight decay λ (as in torch.optim.SGD)",
                    "ylabel": "Spearman ρ (predicted vs. retrained)",
                    "title": "CNN: influence vs. retraining, by weight decay",
                    "categorical": True,
                },
            )
        )
    for name, spec in specs:
        fig = _trend_figure(**spec)
        if fig is not None:
            figures[name] = fig
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for name, fig in figures.items():
        fig.savefig(out / "figures" / name, dpi=110)
    return sorted(figures)


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
