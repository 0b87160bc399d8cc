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
