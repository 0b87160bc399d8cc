"""The audit's figures, one per piece of evidence, drawn only from the report's stored numbers.

Like :mod:`infl.plotting`, every function builds a :class:`matplotlib.figure.Figure` without
``pyplot`` (no global state, no display) and needs the optional ``plot`` extra
(``pip install 'infl[plot]'``). :func:`write_figures` saves them under ``figures/`` and returns,
per report section, the path and a one-line reading that quotes only numbers stored in
``audit.json``; without matplotlib it draws nothing and says why.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from infl.audit import thresholds as th
from infl.audit.report import AuditReport, show
from infl.audit.verdict import LEVELS
from infl.store import write_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "agreement_figure",
    "convergence_figure",
    "curvature_figure",
    "retraining_figure",
    "sensitivity_figure",
    "verdicts_figure",
    "write_figures",
]

#: Colours of the check levels in the verdicts figure (pass, caution, not trustworthy, n/a).
LEVEL_COLORS: dict[str, str] = {
    LEVELS[0]: "#7fc97f",
    LEVELS[1]: "#fdc086",
    LEVELS[2]: "#f0027f",
    LEVELS[3]: "#d9d9d9",
}


def _figure(figsize: tuple[float, float], cols: int = 1) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(1, cols, squeeze=False)[0]
    return fig, list(axes)


def _floats(values: list[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def curvature_figure(numbers: dict[str, Any]) -> Figure:
    """Extreme eigenvalues of :math:`H` (bars) and of :math:`H + \\lambda I` (dots).

    The computed largest and smallest eigenvalues are drawn as bars by rank (negative ones
    red) on a symmetric-log axis, each shifted by the damping used as a dot; a dashed line at
    :math:`-\\lambda_{pd}` (minus the smallest positive-definite damping) shows which
    eigenvalues a damping below it would leave negative, and a dotted one at minus the
    damping used.

    Parameters
    ----------
    numbers
        The curvature section's numbers (``largest``, ``smallest``, ``damping_used``,
        ``min_pd_damping``, ``user_damping``).
    """
    fig, (ax,) = _figure((6.5, 4.0))
    largest = _floats(numbers.get("largest", []))
    smallest = _floats(numbers.get("smallest", []))[::-1]
    size = int(numbers.get("size") or 0)
    overlap = largest.size + smallest.size - size if size else 0
    if overlap > 0:  # few parameters: the two lists share eigenvalues; draw each once
        values = np.concatenate([largest, smallest[overlap:]])
        labels = [f"rank {i + 1}" for i in range(values.size)]
    else:
        values = np.concatenate([largest, smallest])
        labels = [f"top {i + 1}" for i in range(largest.size)]
        labels += [f"bottom {smallest.size - i}" for i in range(smallest.size)]
    x = np.arange(values.size)
    used = float(numbers.get("damping_used") or 0.0)
    colors = ["tab:red" if v < 0 else "tab:blue" for v in values]
    ax.bar(x, values, color=colors, alpha=0.7, label="eigenvalue of H")
    ax.plot(x, values + used, "o", color="black", markersize=4, label="of H + damping*I")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    pd = numbers.get("min_pd_damping")
    if pd:
        ax.axhline(-float(pd), color="tab:red", linestyle="--", linewidth=0.9,
                   label=f"-(smallest PD damping) = -{show(pd)}")  # fmt: skip
    if used > 0:
        ax.axhline(-used, color="black", linestyle=":", linewidth=0.9,
                   label=f"-(damping used) = -{show(numbers.get('damping_used'))}")  # fmt: skip
    user = numbers.get("user_damping")
    if user is not None and user != numbers.get("damping_used"):
        ax.axhline(-float(user), color="tab:orange", linestyle="-.", linewidth=0.9,
                   label=f"-(your damping) = -{show(user)}")  # fmt: skip
    finite = values[np.isfinite(values)]
    scale = max(float(np.abs(finite).max()) if finite.size else 1.0, used, 1e-300)
    if finite.size and (finite.min() <= 0 or finite.max() > 1e3 * finite.min() or pd):
        ax.set_yscale("symlog", linthresh=max(scale * 1e-4, 1e-300))
    ax.set_xticks(x, labels, rotation=60, fontsize=7)
    ax.set_ylabel("eigenvalue")
    ax.set_title(
        f"Curvature ({numbers.get('method')}): lambda_max {show(numbers.get('lambda_max'))}, "
        f"lambda_min {show(numbers.get('lambda_min'))}, "
        f"{show(numbers.get('negative_count'))} negative",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    return fig


def agreement_figure(numbers: dict[str, Any]) -> Figure | None:
    """Cosine matrix of the solvers' inverse-HVPs, and each solver's Spearman and top-k overlap.

    Left: the smallest cosine (over the audited points) between every pair of solvers'
    inverse-HVPs, the reference included. Right: each compared solver's smallest cosine, mean
    score Spearman and smallest top-k overlap with the reference, with
    :data:`~infl.audit.thresholds.AGREEMENT_COSINE` dashed. ``None`` when no solver besides
    the reference ran.
    """
    matrix = numbers.get("cosine_matrix") or {}
    names = list(matrix.get("solvers", []))
    rows = numbers.get("solvers", [])
    if len(names) < 2 or not rows:
        return None
    fig, (left, right) = _figure((10.0, 4.0), cols=2)
    cos = np.array([_floats(r) for r in matrix["min_cosine"]])
    image = left.imshow(cos, vmin=-1.0, vmax=1.0, cmap="RdBu")
    for i in range(len(names)):
        for j in range(len(names)):
            text = "n/a" if np.isnan(cos[i, j]) else f"{cos[i, j]:.3f}"
            left.text(j, i, text, ha="center", va="center", fontsize=7)
    left.set_xticks(range(len(names)), names, rotation=45, fontsize=8)
    left.set_yticks(range(len(names)), names, fontsize=8)
    left.set_title("smallest cosine of inverse-HVPs over the audited points", fontsize=9)
    fig.colorbar(image, ax=left, shrink=0.8)
    x = np.arange(len(rows))
    width = 0.27
    bars = (
        ("min_cosine", "smallest cosine of inverse-HVPs"),
        ("mean_spearman", "mean score Spearman"),
        ("min_top_k_overlap", f"smallest top-{numbers.get('top_k')} overlap"),
    )
    for i, (key, label) in enumerate(bars):
        right.bar(x + (i - 1) * width, _floats([r[key] for r in rows]), width, label=label)
    right.axhline(th.AGREEMENT_COSINE, color="0.3", linestyle="--", linewidth=0.8,
                  label=f"cosine threshold {th.AGREEMENT_COSINE}")  # fmt: skip
    right.set_xticks(x, [r["solver"] for r in rows], fontsize=8)
    lowest = np.nanmin([*_floats([r[key] for r in rows for key, _ in bars]), 0.0])
    right.set_ylim(min(-0.05, float(lowest) - 0.05), 1.05)
    right.set_title(f"against the reference ({numbers.get('reference')})", fontsize=9)
    right.legend(fontsize=7, loc="lower left")
    return fig


def convergence_figure(numbers: dict[str, Any]) -> Figure | None:
    """Per-iteration traces of the iterative solves (one line per audited point), log scale.

    CG's relative residual and LiSSA's relative increment per iteration, from the solver
    agreement section's ``traces``. ``None`` when no solver was iterative.
    """
    traces = numbers.get("traces") or {}
    if not traces:
        return None
    fig, (ax,) = _figure((6.0, 4.0))
    for i, (name, trace) in enumerate(traces.items()):
        steps = np.asarray(trace["iteration"], dtype=np.float64)
        for j, values in enumerate(trace["values"]):
            ys = _floats(values)
            ys = np.where(np.isfinite(ys) & (ys > 0), ys, np.nan)
            ax.plot(steps, ys, color=f"C{i % 10}", linewidth=1.0, alpha=0.8,
                    label=f"{name} ({trace['quantity']})" if j == 0 else None)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("relative residual / relative increment")
    ax.set_title("Convergence of the iterative solvers", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def sensitivity_figure(numbers: dict[str, Any]) -> Figure:
    """Top-k overlap with the reference across the damping grid, and with the other curvature.

    Left: per audited point, the overlap at each grid damping (log axis) and 1 at the damping
    used. Right: per point, the Hessian vs Gauss-Newton overlap. :data:`~infl.audit.
    thresholds.STABILITY_CAUTION` is dashed on both.
    """
    fig, (left, right) = _figure((10.0, 3.8), cols=2)
    points = numbers.get("points", [])
    grid = _floats(numbers.get("damping_grid", []))
    used = numbers.get("damping")
    for i, row in enumerate(points):
        xs = list(grid)
        ys = list(_floats(row["grid_overlaps"]))
        if used is not None and (float(used) > 0 or not np.all(grid > 0)):
            xs.append(float(used))
            ys.append(1.0)
        order = np.argsort(xs)
        left.plot(np.asarray(xs)[order], np.asarray(ys)[order], marker="o", color=f"C{i % 10}",
                  label=f"test point {row['test_index']}")  # fmt: skip
    if used is not None and float(used) > 0:
        left.axvline(float(used), color="0.6", linestyle=":", linewidth=0.8)
    if grid.size and np.all(grid > 0):
        left.set_xscale("log")
    left.axhline(th.STABILITY_CAUTION, color="0.3", linestyle="--", linewidth=0.8)
    left.set_ylim(-0.05, 1.05)
    left.set_xlabel("damping")
    left.set_ylabel(f"top-{numbers.get('top_k')} overlap with the damping used")
    left.set_title("rank stability across the damping grid", fontsize=9)
    left.legend(fontsize=7)
    labels = [str(row["test_index"]) for row in points]
    gn = _floats([row["gauss_newton_overlap"] for row in points])
    right.bar(np.arange(len(points)), np.nan_to_num(gn, nan=0.0), color="tab:purple")
    for i, v in enumerate(gn):
        right.text(i, 0.02 if np.isnan(v) else v + 0.02, "n/a" if np.isnan(v) else f"{v:.2f}",
                   ha="center", fontsize=7)  # fmt: skip
    right.axhline(th.STABILITY_CAUTION, color="0.3", linestyle="--", linewidth=0.8)
    right.set_xticks(np.arange(len(points)), labels)
    right.set_ylim(0.0, 1.1)
    right.set_xlabel("test point")
    right.set_ylabel(f"top-{numbers.get('top_k')} overlap")
    right.set_title("Hessian vs Gauss-Newton", fontsize=9)
    return fig


def verdicts_figure(report: AuditReport) -> Figure:
    """One row per audited point, one column per check, coloured by level, values written in."""
    names: list[str] = []
    for p in report.points:
        names += [n for n in p.checks if n not in names]
    fig, (ax,) = _figure((1.6 + 1.5 * max(len(names), 1), 1.2 + 0.45 * len(report.points)))
    from matplotlib.colors import to_rgb

    grid = np.ones((len(report.points), max(len(names), 1), 3))
    for i, p in enumerate(report.points):
        for j, name in enumerate(names):
            check = p.checks.get(name, {"value": None, "level": LEVELS[3]})
            grid[i, j] = to_rgb(LEVEL_COLORS[check["level"]])
            value = check["value"]
            text = "n/a" if value is None else str(value)
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
    ax.imshow(grid, aspect="auto")
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=7)
    ax.set_yticks(
        range(len(report.points)),
        [f"{p.test_index}: {p.verdict}" for p in report.points],
        fontsize=7,
    )
    ax.set_title(f"Verdict: {report.verdict}", fontsize=9)
    return fig


def retraining_figure(scatter: dict[int, tuple[list[float], list[float]]]) -> Figure | None:
    """Predicted vs retrained (control-corrected) removal effects, one panel per point."""
    if not scatter:
        return None
    fig, axes = _figure((4.0 * len(scatter), 4.0), cols=len(scatter))
    for ax, (index, (pred, actual)) in zip(axes, sorted(scatter.items()), strict=True):
        ax.scatter(pred, actual, s=14)
        both = [v for v in pred + actual if v is not None]
        if both:
            ax.plot([min(both), max(both)], [min(both), max(both)], color="grey", lw=0.8)
        ax.set_title(f"test point {index}", fontsize=9)
        ax.set_xlabel("predicted removal effect")
        ax.set_ylabel("retrained (control-corrected)")
    return fig


def _captions(report: AuditReport) -> dict[str, str]:
    """The one-line reading of each figure (quoting only numbers stored in ``audit.json``)."""
    curv = report.section("curvature").numbers
    sens = report.section("sensitivity").numbers
    agree = report.section("solver_agreement").numbers
    pd = curv.get("min_pd_damping")
    return {
        "verdicts": "One row per audited point, one column per check: green passes, orange is "
        "a caution, red makes the point not trustworthy, grey was not computed.",
        "curvature": "Bars: the computed extreme eigenvalues of H (red: negative); dots: the "
        f"same plus the damping used, {show(curv.get('damping_used'))}"
        + (
            f"; dashed: minus the smallest positive-definite damping, {show(pd)}, below which "
            "an eigenvalue stays negative under a smaller damping."
            if pd
            else "; H is positive definite without damping."
        ),
        "solver_agreement": "Left: the smallest cosine between every pair of inverse-HVPs "
        "(1: the same direction); right: each solver's smallest cosine, mean score Spearman "
        f"and smallest top-{show(agree.get('top_k'))} overlap with the reference "
        f"{agree.get('reference')}, dashed at the cosine threshold {th.AGREEMENT_COSINE}.",
        "convergence": "Per-iteration relative residual (CG) or relative increment (LiSSA) of "
        "each iterative solve, one line per audited point: a line that levels off high did not "
        "converge.",
        "sensitivity": f"Top-{show(sens.get('top_k'))} overlap with the damping used "
        f"({show(sens.get('damping'))}, overlap 1) across the damping grid, and with the other "
        f"curvature's scores; dashed at {th.STABILITY_CAUTION}, below which a point gets a "
        "caution.",
        "retraining": "Predicted vs retrained (control-corrected) removal effects per retrained "
        "point; on the grey line y = x the prediction is exact.",
    }


def _saver(fig: Figure) -> Callable[[IO[bytes]], None]:
    def save(fh: IO[bytes]) -> None:
        fig.savefig(fh, format="png", dpi=100)

    return save


def write_figures(
    report: AuditReport, out: Path
) -> tuple[dict[str, list[tuple[str, str]]], str | None]:
    """Draw every figure of ``report`` into ``out/figures``.

    Returns
    -------
    figures, note
        Section name (``"verdicts"`` for the verdicts figure; the convergence figure belongs
        to ``"solver_agreement"``) -> list of ``(path relative to out, one-line reading)``,
        and ``None``; or ``({}, why)`` when matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {}, "skipped: matplotlib is not installed (pip install 'infl[plot]')"
    captions = _captions(report)
    agree = report.section("solver_agreement").numbers
    drawn = {
        ("verdicts", "verdicts"): verdicts_figure(report),
        ("curvature", "curvature"): curvature_figure(report.section("curvature").numbers),
        ("solver_agreement", "solver_agreement"): agreement_figure(agree),
        ("solver_agreement", "convergence"): convergence_figure(agree),
        ("sensitivity", "sensitivity"): sensitivity_figure(report.section("sensitivity").numbers),
        ("retraining", "retraining"): retraining_figure(report.scatter),
    }
    (out / "figures").mkdir(parents=True, exist_ok=True)
    result: dict[str, list[tuple[str, str]]] = {}
    for (section, name), fig in drawn.items():
        if fig is None:
            continue
        path = f"figures/{name}.png"
        write_atomic(out / path, _saver(fig))
        result.setdefault(section, []).append((path, captions[name]))
    return result, None
