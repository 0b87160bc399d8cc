"""The fragility study's figures: trend lines of mean ± std over seeds, and Figs 1-3.

matplotlib is optional: :func:`write_figures` writes nothing without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from infl.studies.verdicts import group_rows

__all__ = ["SERIES_LABELS", "trend_figure", "write_figures"]

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
