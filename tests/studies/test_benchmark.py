"""``infl benchmark``: the tiny preset end to end, resuming, and its table."""

from __future__ import annotations

import json

import pytest

from infl import StoreMismatchError
from infl.errors import InflError
from infl.studies import benchmark
from infl.studies.benchmark import PRESETS, methods, run_benchmark, table


def test_every_model_has_every_solver_and_baseline():
    names = {m: [x.name for x in methods(m, PRESETS["tiny"])] for m in benchmark.MODELS}
    assert names["logreg"][:6] == ["exact", "cg", "lissa", "arnoldi", "kfac", "ekfac"]
    assert names["mlp"][:7] == [
        "exact",
        "exact-gn",
        "cg-gn",
        "lissa-gn",
        "arnoldi-gn",
        "kfac",
        "ekfac",
    ]
    for model in benchmark.MODELS:
        assert names[model][-4:] == ["grad_dot", "grad_cosine", "tracin_cp", "random_projection-8"]


def test_table_has_a_row_per_method_and_dashes_for_missing_values():
    rows = [
        {"model": "logreg", "method": "exact", "kind": "influence", "lds": 0.5},
        {"model": "logreg", "method": "cg", "kind": "influence", "error": "boom"},
    ]
    text = table(rows).splitlines()
    assert len(text) == 4
    assert "| logreg | cg | influence |" in text[3]
    assert "boom" in text[3]
    assert "pbrf_pearson" not in text[0]  # no row has it


def test_unknown_models_are_refused(tmp_path):
    with pytest.raises(InflError, match="models must be among"):
        run_benchmark(PRESETS["tiny"], tmp_path, models=("resnet",))


@pytest.mark.slow
def test_tiny_preset_end_to_end_and_resume(tmp_path):
    preset = PRESETS["tiny"]
    run = run_benchmark(preset, tmp_path, models=("logreg",), progress=False)
    expected = [m.name for m in methods("logreg", preset)]
    assert [r["method"] for r in run.rows] == expected
    for row in run.rows:
        assert row["error"] == "", row
        assert 0.0 <= row["mislabel_auc"] <= 1.0
        assert row["time_s"] > 0
    by_name = {r["method"]: r for r in run.rows}
    # on the convex model the exact and CG solutions agree, and influence beats chance
    assert by_name["exact"]["loo_pearson"] == pytest.approx(by_name["cg"]["loo_pearson"], abs=1e-3)
    assert by_name["exact"]["loo_pearson"] > 0.5
    assert by_name["exact"]["mislabel_auc"] > 0.8
    for name in ("benchmark.md", "benchmark.csv", "benchmark.json", "figures/benchmark_logreg.png"):
        assert (tmp_path / name).exists(), name
    md = (tmp_path / "benchmark.md").read_text()
    assert md.count("| logreg |") == len(expected)
    assert len(json.loads((tmp_path / "benchmark.json").read_text())["rows"]) == len(expected)
    # a rerun loads every row, computing nothing
    again = run_benchmark(preset, tmp_path, models=("logreg",), progress=False, figures=False)
    assert again.rows == run.rows
    assert again.seconds < run.seconds
    with pytest.raises(StoreMismatchError):
        run_benchmark(PRESETS["quick"], tmp_path, models=("logreg",), progress=False)
