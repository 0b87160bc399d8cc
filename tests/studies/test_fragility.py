"""The fragility study end to end on a reduced preset: outputs, provenance, resumption."""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import pytest

from infl import StoreMismatchError
from infl.studies import fragility
from infl.studies.fragility import PRESETS, FragilityPreset, run_fragility
from infl.studies.report import Stat, stat, verdict_trend, verdict_value

TINY = dataclasses.replace(
    PRESETS["quick"],
    name="tiny",
    seeds=(0, 1),
    iris_train_steps=300,
    iris_retrain_steps=60,
    iris_depths=(1, 2),
    iris_widths=(5, 10),
    lissa_depth=30,
    cnn_train_epochs=1,
    cnn_retrain_steps=5,
    cnn_top=4,
    cnn_percentile_count=4,
    cnn_weight_decays=(0.0, 0.005),
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("fragility")
    run = run_fragility(TINY, str(out), progress=False)
    return run, out


@pytest.mark.slow
def test_study_writes_every_output(study):
    run, out = study
    for name in ("report.md", "cells.csv", "summary.csv", "results.json", "config.json"):
        assert (out / name).is_file(), name
    cells = list(csv.DictReader((out / "cells.csv").open()))
    # iris: (relu,1,5,0), (relu,1,5,wd), (relu,2,5,wd), (relu,1,10,wd) x 2 seeds; cnn: 2 x 2
    assert len(cells) == len(run.rows) == 4 * 2 + 2 * 2
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == [
        "fig1_iris_with_weight_decay.png",
        "fig1_iris_without_weight_decay.png",
        "fig2_iris_depth_relu.png",
        "fig2_iris_width_relu.png",
        "fig3_cnn_weight_decay.png",
        "fig3_iris_eigenvalue_depth_relu.png",
        "fig3_iris_lissa_taylor_depth_relu.png",
    ]
    report = (out / "report.md").read_text()
    for heading in (
        "## weight decay",
        "## depth",
        "## width",
        "## curvature",
        "## LiSSA",
        "## Taylor gap",
        "## CNN",
        "## All configurations",
    ):
        assert heading in report
    assert f"{run.agree} of {run.judged} comparisons agree" in report
    assert "8x8 digits" in report  # says that digits stand in for MNIST


@pytest.mark.slow
def test_every_number_in_the_report_comes_from_this_run(study):
    _, out = study
    results = json.loads((out / "results.json").read_text())
    produced: set[str] = set()
    for record in results["summary"]:
        for key, value in record.items():
            if isinstance(value, float) and key.endswith(("_mean", "_std")):
                produced.add(f"{value:.3f}")
    means = {}
    for record in results["summary"]:
        if record["experiment"] == "iris":
            key = (record["activation"], record["depth"], record["width"], record["weight_decay"])
            means[key] = record["spearman_mean"]
    wd = TINY.iris_weight_decay
    diff = means[("relu", 1, 5, wd)] - means[("relu", 1, 5, 0.0)]
    produced.add(f"{diff:+.3f}")
    rows = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("|")]
    checked = 0
    for line in rows:
        cols = [c.strip() for c in line.strip("|").split("|")]
        if len(cols) < 3 or cols[0] in ("setting", "experiment", "---"):
            continue
        ours = cols[1] if len(cols) == 4 else " ".join(cols[3:])
        for number in re.findall(r"[+-]?\d+\.\d{3}", ours):
            assert number in produced or number.lstrip("+") in produced, (number, line)
            checked += 1
    assert checked >= 20


@pytest.mark.slow
def test_rerun_loads_finished_cells_and_recomputes_only_missing_ones(study, monkeypatch):
    run, out = study
    calls = []
    real = fragility.run_cell

    def spy(cell, preset):
        calls.append(cell.cell_id)
        return real(cell, preset)

    monkeypatch.setattr(fragility, "run_cell", spy)
    again = run_fragility(TINY, str(out), progress=False, figures=False)
    assert calls == []
    assert again.rows == json.loads(json.dumps(run.rows))

    victim = next(iter(sorted((out / "cells").glob("iris-*.json"))))
    victim.unlink()  # as if the run had been killed before this cell finished
    resumed = run_fragility(TINY, str(out), progress=False, figures=False)
    assert calls == [victim.stem]
    assert resumed.rows == again.rows  # deterministic: the recomputed cell is identical


def test_a_results_directory_of_other_settings_is_refused(tmp_path):
    out = str(tmp_path)
    empty = dataclasses.replace(TINY, iris_depths=(), iris_widths=(), seeds=())
    run_fragility(empty, out, parts=("iris",), progress=False, figures=False)
    changed = dataclasses.replace(empty, iris_retrain_steps=61)
    with pytest.raises(StoreMismatchError, match="'iris_retrain_steps' was 60 there and is 61"):
        run_fragility(changed, out, parts=("iris",), progress=False, figures=False)


def test_presets_state_their_runtime_and_quick_is_smaller():
    quick, full = PRESETS["quick"], PRESETS["full"]
    assert quick.expected_minutes <= 5 < full.expected_minutes
    iris, cnn = full.expected_minutes_for(("iris",)), full.expected_minutes_for(("cnn",))
    assert 0 < iris < cnn < full.expected_minutes_for(("cnn", "iris")) == full.expected_minutes
    assert iris + cnn == full.expected_minutes
    assert quick.expected_minutes_for(("iris",)) == quick.expected_minutes  # no split known
    assert "expected_iris_minutes" not in full.config()  # not a setting of the results
    assert len(full.seeds) >= 5
    assert full.iris_train_steps == 60_000
    assert full.iris_retrain_steps == 7_500
    assert full.cnn_top == full.cnn_percentile_count == 100
    assert full.cnn_percentile == 30
    assert len(fragility.all_cells(quick, ("iris", "cnn"))) < len(
        fragility.all_cells(full, ("iris", "cnn"))
    )
    assert isinstance(quick, FragilityPreset)


def test_verdicts():
    assert verdict_value(Stat(0.95, 0.01, 3), 0.97) == "agrees"
    assert verdict_value(Stat(0.60, 0.01, 3), 0.97).startswith("differs: ours is lower by 0.37")
    assert verdict_value(Stat(0.60, 0.30, 3), 0.97) == "agrees"  # within 2 std
    assert verdict_trend(Stat(0.9, 0, 2), Stat(0.5, 0, 2), "falls") == "agrees"
    assert verdict_trend(Stat(0.5, 0, 2), Stat(0.9, 0, 2), "falls").startswith(
        "differs: ours grows"
    )
    assert verdict_value(stat([float("nan")]), 0.5) == "no usable runs"
    assert str(stat([1.0, 2.0, 3.0])) == "2.000 ± 1.000"


@pytest.mark.slow
def test_cnn_cell_runs_lenet_on_users_mnist_files(tmp_path):
    from test_datasets import _write_mnist

    _write_mnist(tmp_path, n_train=40, n_test=12)
    preset = dataclasses.replace(
        TINY,
        cnn_dataset="mnist",
        data_dir=str(tmp_path),
        seeds=(0,),
        cnn_retrain_steps=2,
        cnn_top=3,
        cnn_percentile_count=3,
    )
    row = fragility.run_cell(fragility.CnnCell("mnist", 0.005, 0), preset)
    assert row["dataset"] == "mnist"
    assert row["num_params"] == 61_706  # LeNet-5
    for key in ("spearman_top", "spearman_percentile", "damping", "test_accuracy"):
        assert key in row
    assert row["damping"] >= preset.cnn_damping


def test_width_comparison_never_compares_a_width_with_itself():
    from infl.studies.report import iris_comparisons

    def row(width, spearman):
        return {
            "activation": "relu",
            "depth": 1,
            "width": width,
            "weight_decay": 1e-3,
            "test_accuracy": 0.9,
            "spearman": spearman,
            "seed": 0,
        }

    settings = [c.setting for c in iris_comparisons([row(5, 0.9), row(8, 0.8)], 1e-3)]
    assert "relu: Spearman at width 5 → 8" in settings
    settings = [c.setting for c in iris_comparisons([row(5, 0.9), row(8, 0.8), row(50, 0.5)], 1e-3)]
    assert "relu: Spearman at width 8 → 50" in settings


@pytest.mark.parametrize(("weight_decay", "momentum"), [(1e-3, 0.9), (0.0, 0.9), (1e-3, 0.0)])
def test_full_batch_training_is_torch_sgd_bit_for_bit(weight_decay, momentum):
    import torch
    from torch import nn

    from infl.studies.datasets import load_iris
    from infl.studies.models import mlp

    split = load_iris(seed=0, dtype=torch.float64)
    x, y = split.train
    ours = mlp(4, 3, 5, 2, "relu", seed=0).double()
    reference = mlp(4, 3, 5, 2, "relu", seed=0).double()
    fragility.train_full_batch(ours, split.train, weight_decay, 40, 0.05, momentum)
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=momentum,
                          weight_decay=weight_decay)  # fmt: skip
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.step()
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
