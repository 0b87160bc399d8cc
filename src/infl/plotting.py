"""Figures for the diagnostics: spectrum, convergence traces, predicted vs. actual, trends.

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot``, so nothing
touches global state or needs a display: save it with ``fig.savefig("out.png")`` (the Agg
canvas is attached automatically). matplotlib is an optional dependency, imported only when a
function here is called: ``pip install infl[plot]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from infl.errors import InflError, InputError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from infl.diagnostics.agreement import LissaTrace
    from infl.diagnostics.spectrum import Spectrum
    from infl.solvers.base import SolveResult


class PlottingUnavailableError(InflError, ImportError):
    """matplotlib is not installed."""


def _figure(figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
        raise PlottingUnavailableError(
            "infl.plotting needs matplotlib, which is not installed: pip install 'infl[plot]'"
        ) from exc
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def plot_spectrum(spectrum: Spectrum, *, title: str | None = None) -> Figure:
    """Eigenvalues of :math:`H + \\lambda I` by rank, on a symmetric-log axis.

    The full spectrum (dense) is drawn as one line from the largest to the smallest
    eigenvalue; a Lanczos spectrum as its top-``k`` and bottom-``k`` Ritz values at their ranks
    (``1..k`` and ``p-k+1..p``). Negative eigenvalues are drawn in red and a dashed line marks 0.

    Parameters
    ----------
    spectrum
        From :func:`infl.diagnostics.hessian_spectrum`.
    title
        Default: a summary with :math:`\\lambda_{\\max}`, the negative count and the method.
    """
    fig, ax = _figure((6.0, 4.0))
    p = spectrum.size
    if spectrum.full:
        values = _array(spectrum.eigenvalues)[::-1]
        ranks = np.arange(1, values.size + 1)
    else:
        top = _array(spectrum.largest)
        bottom = _array(spectrum.smallest)[::-1]
        values = np.concatenate([top, bottom])
        ranks = np.concatenate([np.arange(1, top.size + 1), np.arange(p - bottom.size + 1, p + 1)])
    neg = values < -spectrum.zero_threshold
    style = "-" if spectrum.full else "o"
    ax.plot(ranks, values, style, color="tab:blue", markersize=4, label="eigenvalue")
    if neg.any():
        ax.plot(ranks[neg], values[neg], "o", color="tab:red", markersize=4, label="negative")
    ax.axhline(0.0, color="0.5", linestyle="--", linewidth=0.8)
    scale = float(np.abs(values).max()) if values.size else 1.0
    ax.set_yscale("symlog", linthresh=max(scale * 1e-4, 1e-300))
    ax.set_xlabel("rank (largest first)")
    ax.set_ylabel("eigenvalue of H + damping*I" if spectrum.damping else "eigenvalue of H")
    neg_text = f"{spectrum.num_negative}" if spectrum.full else f">= {spectrum.num_negative}"
    ax.set_title(
        title
        if title is not None
        else f"Hessian spectrum (p={p}, {spectrum.method}): lambda_max={spectrum.lambda_max:.3g},"
        f" negative: {neg_text}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    return fig


def plot_convergence(
    traces: Mapping[str, SolveResult | LissaTrace | np.ndarray | torch.Tensor],
    *,
    tol: float | None = None,
    ylabel: str = "relative residual",
    title: str = "Solver convergence",
) -> Figure:
    """Per-iteration traces of several solvers on a log axis (one line per right-hand side).

    Parameters
    ----------
    traces
        Name → a :class:`~infl.solvers.SolveResult` (its ``trace``: CG relative residual,
        LiSSA relative increment), a :class:`~infl.diagnostics.LissaTrace` (its
        ``residuals``; a diverging run climbs off the top), or an array ``[iterations, k]``.
    tol
        Draw the target tolerance as a dashed line.
    """
    from infl.diagnostics.agreement import LissaTrace
    from infl.solvers.base import SolveResult

    fig, ax = _figure((6.0, 4.0))
    colors = [f"C{i}" for i in range(10)]
    for i, (name, trace) in enumerate(traces.items()):
        if isinstance(trace, SolveResult):
            data = _array(trace.trace)
        elif isinstance(trace, LissaTrace):
            data = trace.residuals
        else:
            data = _array(trace)
        if data.ndim == 1:
            data = data[:, None]
        if data.size == 0:
            continue
        data = np.where(np.isfinite(data) & (data > 0), data, np.nan)
        iters = np.arange(data.shape[0])
        for j in range(data.shape[1]):
            ax.plot(iters, data[:, j], color=colors[i % 10], linewidth=1.0, alpha=0.8,
                    label=name if j == 0 else None)  # fmt: skip
    if tol is not None:
        ax.axhline(tol, color="0.3", linestyle="--", linewidth=0.8, label=f"tol={tol:g}")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return fig


def plot_lissa_norms(
    traces: Mapping[str, LissaTrace],
    *,
    reference_norm: float | None = None,
    title: str = "LiSSA estimate norm per step",
) -> Figure:
    """:math:`\\|x_t\\|/\\sigma` per step for LiSSA runs: flat when converging, exploding when not.

    Parameters
    ----------
    traces
        Name (e.g. ``"scale=12"``) → :class:`~infl.diagnostics.LissaTrace` (first right-hand
        side drawn).
    reference_norm
        :math:`\\|A^{-1}b\\|`, drawn as a dashed line where the iterates should settle.
    """
    fig, ax = _figure((6.0, 4.0))
    for name, trace in traces.items():
        norms = trace.estimate_norms[:, 0]
        ax.plot(np.arange(norms.size), norms, linewidth=1.2, label=name)
    if reference_norm is not None:
        ax.axhline(reference_norm, color="0.3", linestyle="--", linewidth=0.8, label="exact")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("norm of the estimate of (H + damping*I)^-1 b")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return fig


def _pearson_spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    return float(stats.pearsonr(x, y).statistic), float(stats.spearmanr(x, y).statistic)


def plot_predicted_vs_actual(
    predicted: Sequence[float] | np.ndarray | torch.Tensor,
    actual: Sequence[float] | np.ndarray | torch.Tensor,
    *,
    title: str | None = None,
    xlabel: str = "actual change in test loss (retraining)",
    ylabel: str = "predicted change in test loss (influence)",
) -> Figure:
    """Scatter of predicted vs. actual removal effects, Pearson and Spearman in the title.

    In the style of Basu et al. (2021), Fig. 8: one point per removed training example, the
    ``y = x`` diagonal dashed. ``predicted`` and ``actual`` must have the same length (any
    shape; flattened).
    """
    x = _array(actual).reshape(-1)
    y = _array(predicted).reshape(-1)
    if x.shape != y.shape:
        raise InputError(f"predicted and actual differ in size: {y.size} vs {x.size}")
    fig, ax = _figure((4.5, 4.5))
    ax.scatter(x, y, s=12, alpha=0.7, color="tab:blue", edgecolors="none")
    finite = np.isfinite(x) & np.isfinite(y)
    if finite.any():
        lo = float(min(x[finite].min(), y[finite].min()))
        hi = float(max(x[finite].max(), y[finite].max()))
        ax.plot([lo, hi], [lo, hi], linestyle="--", color="0.4", linewidth=0.8)
    pearson, spearman = _pearson_spearman(x[finite], y[finite])
    stats_text = f"Pearson {pearson:.3f}, Spearman {spearman:.3f}"
    ax.set_title(f"{title}\n{stats_text}" if title else stats_text, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig


def plot_correlation_trend(
    x: Sequence[float],
    correlations: Mapping[str, Sequence[float]],
    *,
    xlabel: str = "depth",
    ylabel: str = "correlation",
    title: str | None = None,
) -> Figure:
    """Lines of correlation (Pearson, Spearman, ...) against depth, width or weight decay.

    Parameters
    ----------
    x
        The varied quantity, e.g. ``[1, 4, 8]``.
    correlations
        Name → values aligned with ``x``, e.g. ``{"pearson": [...], "spearman": [...]}``.
    """
    xs = _array(x)
    fig, ax = _figure((5.0, 3.5))
    for name, values in correlations.items():
        ys = _array(values)
        if ys.shape != xs.shape:
            raise InputError(
                f"correlations[{name!r}] has {ys.size} values for {xs.size} x positions"
            )
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(min(-0.05, float(np.nanmin([*_all(correlations), 0.0])) - 0.05), 1.05)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return fig


def _all(correlations: Mapping[str, Sequence[float]]) -> list[float]:
    out: list[float] = []
    for values in correlations.values():
        out.extend(float(v) for v in _array(values).reshape(-1))
    return out


__all__ = [
    "PlottingUnavailableError",
    "plot_convergence",
    "plot_correlation_trend",
    "plot_lissa_norms",
    "plot_predicted_vs_actual",
    "plot_spectrum",
]
