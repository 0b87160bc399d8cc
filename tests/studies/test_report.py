"""Verdicts that do not overclaim, and trend figures that show the seed spread."""

from __future__ import annotations

import pytest

from infl.studies.report import (
    Stat,
    difference,
    iris_comparisons,
    is_inconclusive,
    render_markdown,
    verdict_difference,
    verdict_trend,
    verdict_value,
    write_figures,
)

WD = 1e-3


def _row(seed, spearman, *, depth=1, width=5, wd=WD, **more):
    return {
        "experiment": "iris",
        "activation": "relu",
        "depth": depth,
        "width": width,
        "weight_decay": wd,
        "seed": seed,
        "test_accuracy": 0.9,
        "spearman": spearman,
        **more,
    }


# ------------------------------------------------------------------------------- verdicts
def test_a_fall_whose_spread_covers_zero_is_inconclusive():
    # the case from the issue: ending at -0.257 ± 0.397 from 0.2 ± 0.3 is no clear fall
    verdict = verdict_trend(Stat(0.2, 0.3, 3), Stat(-0.257, 0.397, 3), "falls")
    assert is_inconclusive(verdict)
    assert "spread covers 0" in verdict
    assert "-0.46 ± 0.50" in verdict


def test_clear_trends_still_agree_or_differ():
    assert verdict_trend(Stat(0.9, 0.05, 3), Stat(-0.257, 0.397, 3), "falls") == "agrees"
    assert verdict_trend(Stat(0.2, 0.05, 3), Stat(0.9, 0.05, 3), "falls").startswith(
        "differs: ours grows"
    )
    # one seed per end: no spread to judge by, the margin rule applies as before
    assert verdict_trend(Stat(0.9, 0.0, 1), Stat(0.5, 0.0, 1), "falls") == "agrees"


def test_a_value_whose_spread_covers_zero_never_agrees():
    # within 2 std of the paper's 0.97, but the sign itself is not established
    verdict = verdict_value(Stat(0.3, 0.4, 3), 0.97)
    assert is_inconclusive(verdict)
    assert "+0.30 ± 0.40" in verdict
    assert verdict_value(Stat(0.6, 0.3, 3), 0.97) == "agrees"  # 0.6 ± 0.3 excludes 0
    assert verdict_value(Stat(0.02, 0.05, 3), 0.0) == "agrees"  # the paper's value is 0 too


def test_difference_spread_and_verdict():
    gain = difference(Stat(0.5, 0.3, 3), Stat(0.62, 0.4, 3))
    assert gain.mean == pytest.approx(0.12)
    assert gain.std == pytest.approx(0.5)
    assert is_inconclusive(verdict_difference(gain))
    assert verdict_difference(difference(Stat(0.5, 0.05, 3), Stat(0.9, 0.05, 3))) == "agrees"
    assert verdict_difference(difference(Stat(0.5, 0.001, 3), Stat(0.52, 0.001, 3))).startswith(
        "differs: no clear gain"
    )


def test_weight_decay_gain_that_straddles_zero_is_inconclusive_in_the_report():
    rows = [_row(s, v) for s, v in enumerate((0.9, 0.1, 0.5))]  # with weight decay
    rows += [_row(s, v, wd=0.0) for s, v in enumerate((0.2, 0.8, 0.4))]  # without
    (gain,) = [c for c in iris_comparisons(rows, WD) if c.setting.startswith("Spearman with")]
    assert is_inconclusive(gain.verdict)
    assert "±" in gain.ours
    markdown = render_markdown(
        iris_comparisons(rows, WD),
        [],
        preset="test",
        seeds=3,
        minutes=0.0,
        figures=[],
        cnn_dataset="digits",
    )
    assert "inconclusive (the seed spread covers 0)" in markdown
    assert "|change| ≤ √(std₁² + std₂²)" in markdown


def test_depth_trend_with_wide_seeds_is_inconclusive_not_agreeing():
    rows = [_row(s, v, depth=1) for s, v in enumerate((0.6, -0.1, 0.1))]
    rows += [_row(s, v, depth=8) for s, v in enumerate((0.2, -0.7, 0.1))]
    (depth,) = [c for c in iris_comparisons(rows, WD) if c.section == "depth"]
    assert is_inconclusive(depth.verdict)


# -------------------------------------------------------------------------------- figures
@pytest.fixture
def depth_rows():
    rows = []
    for depth, base in ((1, 0.9), (4, 0.6), (8, 0.3)):
        for seed, noise in enumerate((-0.1, 0.0, 0.1)):
            rows.append(
                _row(
                    seed,
                    base + noise,
                    depth=depth,
                    pearson=base + noise / 2,
                    top_eigenvalue=3.0 * depth + noise,
                    lissa_vs_exact_spearman=base,
                    taylor_gap_spearman=base - noise,
                    predicted=[0.1, 0.2],
                    actual=[0.1, 0.3],
                )
            )
    return rows


def test_trend_figures_have_error_bars_labels_and_units(depth_rows, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.container import ErrorbarContainer

    names = write_figures(depth_rows, tmp_path, WD)
    assert "fig2_iris_depth_relu.png" in names
    assert (tmp_path / "figures" / "fig2_iris_depth_relu.png").stat().st_size > 0

    import infl.studies.figures as figures

    captured = {}
    original = figures.trend_figure

    def keep(*args, **kwargs):
        fig = original(*args, **kwargs)
        captured[kwargs["title"]] = fig
        return fig

    figures.trend_figure = keep
    try:
        write_figures(depth_rows, tmp_path, WD)
    finally:
        figures.trend_figure = original
    fig = captured["Iris relu, width 5: influence vs. retraining, by depth"]
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2  # Pearson and Spearman, each with ± 1 std
    assert ax.get_xlabel() == "depth (hidden layers)"
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[0].startswith("Pearson r: predicted vs. retrained")
    assert "mean over 3 seeds; bars: ± 1 std" in legend.get_title().get_text()
    # the legend sits under the axes, not on the data
    assert legend.get_window_extent().y1 <= ax.get_window_extent().y0 + 1

    eig = captured["Iris relu, width 5: curvature by depth"].axes[0]
    assert eig.get_ylim()[1] > 20  # not clipped to a correlation's range
