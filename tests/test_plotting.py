"""Plots render headless to PNG, with the expected axis labels."""

from __future__ import annotations

import sys

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from infl import ConjugateGradient, LiSSA
from infl.diagnostics import hessian_spectrum, lissa_trace
from infl.errors import InflError, InputError
from infl.operators import DenseOperator
from infl.plotting import (
    plot_convergence,
    plot_correlation_trend,
    plot_lissa_norms,
    plot_predicted_vs_actual,
    plot_spectrum,
)

F64 = torch.float64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def operator() -> DenseOperator:
    ev = torch.cat([torch.tensor([-0.3], dtype=F64), torch.linspace(0.2, 6.0, 24, dtype=F64)])
    q, _ = torch.linalg.qr(
        torch.randn(25, 25, generator=torch.Generator().manual_seed(0), dtype=F64)
    )
    return DenseOperator((q * ev) @ q.T)


def save(fig, tmp_path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_plot_spectrum(tmp_path, method):
    spec = hessian_spectrum(operator(), k=4, method=method, max_iter=25)
    fig = plot_spectrum(spec)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "rank (largest first)"
    assert ax.get_ylabel() == "eigenvalue of H"
    assert "negative: 1" in ax.get_title() or "negative: >= 1" in ax.get_title()
    save(fig, tmp_path, f"spectrum_{method}")
    damped = plot_spectrum(hessian_spectrum(operator(), damping=0.5))
    assert damped.axes[0].get_ylabel() == "eigenvalue of H + damping*I"


def test_plot_convergence_and_lissa_norms(tmp_path):
    op = operator().damped(0.5)
    b = torch.randn(2, 25, generator=torch.Generator().manual_seed(1), dtype=F64)
    cg = ConjugateGradient(rtol=1e-8).solve(op, b)
    lissa = LiSSA(scale=8.0, depth=600, rtol=1e-6).solve(op, b)
    diverging = lissa_trace(op, b, scale=2.0, depth=200)
    fig = plot_convergence({"cg": cg, "lissa": lissa, "lissa scale=2": diverging}, tol=1e-6)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "iteration"
    assert ax.get_ylabel() == "relative residual"
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"cg", "lissa", "tol=1e-06"}
    save(fig, tmp_path, "convergence")
    norms = plot_lissa_norms(
        {"scale=8": lissa_trace(op, b, scale=8.0, depth=100), "scale=2": diverging},
        reference_norm=1.0,
    )
    assert norms.axes[0].get_xlabel() == "step"
    assert norms.axes[0].get_ylabel().startswith("norm of the estimate")
    save(norms, tmp_path, "lissa_norms")


def test_plot_predicted_vs_actual_reports_correlations(tmp_path):
    rng = np.random.default_rng(0)
    actual = rng.normal(size=50)
    predicted = actual + 0.1 * rng.normal(size=50)
    fig = plot_predicted_vs_actual(torch.from_numpy(predicted), actual, title="iris, depth 1")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "actual change in test loss (retraining)"
    assert ax.get_ylabel() == "predicted change in test loss (influence)"
    pearson = np.corrcoef(actual, predicted)[0, 1]
    assert f"Pearson {pearson:.3f}" in ax.get_title()
    assert "Spearman" in ax.get_title()
    assert ax.get_title().startswith("iris, depth 1")
    save(fig, tmp_path, "scatter")
    with pytest.raises(InputError, match="differ in size"):
        plot_predicted_vs_actual(predicted[:3], actual)


def test_plot_correlation_trend(tmp_path):
    fig = plot_correlation_trend(
        [1, 4, 8], {"pearson": [0.95, 0.7, 0.4], "spearman": [0.9, 0.6, 0.3]}, xlabel="depth"
    )
    ax = fig.axes[0]
    assert ax.get_xlabel() == "depth"
    assert ax.get_ylabel() == "correlation"
    assert len(ax.get_lines()) == 2
    save(fig, tmp_path, "trend")
    with pytest.raises(InputError, match="3 x positions"):
        plot_correlation_trend([1, 4, 8], {"pearson": [0.9]})


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(InflError, match=r"pip install 'infl\[plot\]'") as info:
        plot_correlation_trend([1], {"a": [0.5]})
    assert isinstance(info.value, ImportError)


def test_no_pyplot_state_is_touched():
    before = sys.modules.get("matplotlib.pyplot")
    plot_correlation_trend([1, 2], {"a": [0.5, 0.6]})
    if before is None:
        assert "matplotlib.pyplot" not in sys.modules
