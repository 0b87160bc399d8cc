"""The fading and correction studies behind `infl fading` / `infl correct`, on tiny settings."""

from __future__ import annotations

import csv
import json
import math

import pytest

from infl.studies import over_time
from infl.studies.over_time import (
    CorrectionSettings,
    FadingSettings,
    run_correction_study,
    run_fading_study,
)


@pytest.mark.slow
def test_fading_study_writes_a_table_per_horizon_and_resumes(tmp_path, monkeypatch):
    settings = FadingSettings(horizons=(5, 50), removals=4, test_points=3, iris_train_steps=200)
    results = run_fading_study(str(tmp_path), settings, models=("iris",), progress=False)
    assert [r["horizon"] for r in results[0]["rows"]] == [5, 50]
    rows = list(csv.DictReader((tmp_path / "fading.csv").open()))
    assert [(r["model"], int(r["horizon"])) for r in rows] == [("iris", 5), ("iris", 50)]
    assert all(math.isfinite(float(r["mean_divergence"])) for r in rows)
    # divergence from the control run grows with the horizon
    assert float(rows[1]["mean_divergence"]) > float(rows[0]["mean_divergence"])
    assert (tmp_path / "figures" / "fading_iris.png").is_file()
    assert "## iris" in (tmp_path / "fading.md").read_text()

    monkeypatch.setattr(over_time, "run_fading_cell", lambda *a: pytest.fail("recomputed"))
    again = run_fading_study(str(tmp_path), settings, models=("iris",), progress=False)
    assert again == json.loads(json.dumps(results))


@pytest.mark.slow
def test_correction_study_reports_every_ranking(tmp_path):
    settings = CorrectionSettings(k=5, lr=0.02, max_steps=3, max_examples=2, cnn_epochs=1)
    result = run_correction_study(str(tmp_path), settings, progress=False)
    rankings = {r["ranking"] for r in result["rows"]}
    assert rankings == {"influence", "random", "gradient_similarity"}
    assert result["num_mispredicted"] >= 1
    for row in result["rows"]:
        assert 0.0 <= row["success_rate"] <= 1.0
        assert 1 <= row["attempts"] <= 2
    report = (tmp_path / "correction.md").read_text()
    assert "mis-predicted" in report
    assert f"damping {result['damping']:g}" in report
    assert (tmp_path / "correction.csv").read_text().startswith("ranking,")


def stored_correction(out, settings, rows):
    """A finished correction study in ``out`` (what a run leaves in its store)."""
    from dataclasses import asdict

    from infl.store import Store

    store = Store(out, {"study": "correction", **asdict(settings)}, records="cells")
    store.save_json(
        "correction",
        {
            "rows": rows,
            "table": "the table",
            "damping": 0.01,
            "num_mispredicted": 9,
            "num_test": 40,
        },
    )


CORRECTION_ROWS = [
    {
        "ranking": "influence",
        "attempts": 9,
        "success_rate": 7 / 9,
        "median_steps": 4.0,
        "mean_heldout_change": -0.01,
    },
    {
        "ranking": "gradient_similarity",
        "attempts": 9,
        "success_rate": 3 / 9,
        "median_steps": 20.0,
        "mean_heldout_change": -0.02,
    },
    {
        "ranking": "random",
        "attempts": 9,
        "success_rate": 0.0,
        "median_steps": float("nan"),
        "mean_heldout_change": 0.0,
    },
]


def test_correction_figure_shows_success_rate_and_median_steps_per_ranking():
    pytest.importorskip("matplotlib")
    from matplotlib.container import ErrorbarContainer

    fig = over_time.correction_figure(CORRECTION_ROWS, max_steps=50, k=10)
    rates, steps = fig.axes
    assert [p.get_height() for p in rates.patches] == pytest.approx([700 / 9, 300 / 9, 0.0])
    assert [t.get_text() for t in rates.get_xticklabels()] == [
        "influence",
        "gradient similarity",
        "random",
    ]
    assert [p.get_height() for p in steps.patches] == [4.0, 20.0, 0.0]
    texts = [t.get_text() for t in steps.texts]
    assert "no success" in texts
    assert "budget: 50 steps" in texts
    assert "78% of 9" in [t.get_text() for t in rates.texts]
    # the 95% Wilson interval of 0/9 reaches above 0 (a rate of 0 is not certainty)
    (bars,) = [c for c in rates.containers if isinstance(c, ErrorbarContainer)]
    whisker = bars.lines[2][0].get_segments()[2]  # the random ranking's interval
    assert whisker[0][1] == pytest.approx(0.0)
    assert whisker[1][1] > 20


def test_correction_study_writes_and_lists_its_figure(tmp_path):
    pytest.importorskip("matplotlib")
    settings = CorrectionSettings(k=5, max_steps=50)
    stored_correction(tmp_path, settings, CORRECTION_ROWS)
    result = run_correction_study(str(tmp_path), settings, progress=False)
    assert result["figures"] == ["figures/correction.png"]
    assert (tmp_path / "figures" / "correction.png").stat().st_size > 0
    report = (tmp_path / "correction.md").read_text()
    assert "(figures/correction.png)" in report
    assert "figures" not in json.loads((tmp_path / "correction.json").read_text())
    stored_correction(tmp_path / "b", settings, CORRECTION_ROWS)
    without = run_correction_study(str(tmp_path / "b"), settings, progress=False, figures=False)
    assert without["figures"] == []
    assert "correction.png" not in (tmp_path / "b" / "correction.md").read_text()
