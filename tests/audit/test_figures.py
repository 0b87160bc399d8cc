"""The audit's figures, convergence traces and per-check levels, read from one written audit."""

from __future__ import annotations

import json
import sys

import numpy as np

from infl.audit import thresholds as th
from infl.audit.report import num
from infl.audit.verdict import LEVELS

SECTION_FIGURES = {
    "Verdicts": ["verdicts"],
    "Evidence: curvature": ["curvature"],
    "Evidence: solver agreement": ["solver_agreement", "convergence"],
    "Evidence: sensitivity": ["sensitivity"],
    "Evidence: retraining": ["retraining"],
}


def _section_text(markdown: str, heading: str) -> str:
    start = markdown.index(f"## {heading}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end >= 0 else len(markdown)]


def test_every_section_embeds_its_figure_with_a_one_line_reading(written_logistic):
    _, out = written_logistic
    text = (out / "report.md").read_text()
    for heading, names in SECTION_FIGURES.items():
        section = _section_text(text, heading)
        for name in names:
            link = f"![{name}](figures/{name}.png)"
            assert link in section, (heading, name)
            assert (out / "figures" / f"{name}.png").stat().st_size > 1000
            after = section[section.index(link) + len(link) :].lstrip("\n").splitlines()[0]
            assert after.startswith("*")
            assert after.endswith("*")
            assert len(after) > 30
    assert "Figures: skipped" not in text


def test_no_figures_and_missing_matplotlib_are_said_in_the_report(
    written_logistic, tmp_path, monkeypatch
):
    report, _ = written_logistic
    report.write(tmp_path / "off", figures=False)
    text = (tmp_path / "off" / "report.md").read_text()
    assert "Figures: skipped (figures=False, --no-figures)." in text
    assert not (tmp_path / "off" / "figures").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    report.write(tmp_path / "bare")
    text = (tmp_path / "bare" / "report.md").read_text()
    assert "matplotlib is not installed" in text
    assert "![" not in text


def test_convergence_traces_of_cg_and_lissa_are_in_audit_json(written_logistic):
    _, out = written_logistic
    agreement = json.loads((out / "audit.json").read_text())["sections"]["solver_agreement"]
    numbers = agreement["numbers"]
    traces = numbers["traces"]
    assert {"cg", "lissa"} <= set(traces)
    assert "reference" not in traces  # the exact reference is direct: no iterations
    rows = {r["solver"]: r for r in numbers["solvers"]}
    cg = traces["cg"]
    assert cg["quantity"] == "relative residual"
    assert cg["iteration"][0] == 0
    assert cg["iteration"][-1] == rows["cg"]["iterations"]
    assert len(cg["values"]) == 3  # one trace per audited point
    for values in cg["values"]:
        assert values[0] == 1.0  # CG starts from x = 0: residual b
        assert values[-1] <= 1e-6  # and stops at its rtol
    assert rows["cg"]["converged"] == 1
    assert rows["cg"]["max_residual"] <= 1e-5
    lissa = traces["lissa"]
    assert lissa["quantity"] == "relative increment"
    assert lissa["iteration"][-1] + 1 >= len(lissa["iteration"])
    assert rows["lissa"]["iterations"] >= 1
    info = numbers["solver_info"]  # what each solve reported, e.g. LiSSA's scale
    assert info["reference"]["solver"] == "ExactHessian"
    assert info["cg"]["iterations"] == rows["cg"]["iterations"]
    assert info["lissa"]["scale"] > 0


def test_cosine_matrix_is_symmetric_and_matches_the_solver_rows(written_logistic):
    report, _ = written_logistic
    numbers = report.section("solver_agreement").numbers
    matrix = numbers["cosine_matrix"]
    names = matrix["solvers"]
    cos = np.array(matrix["min_cosine"], dtype=float)
    assert names[0] == "reference"
    assert cos.shape == (len(names), len(names))
    np.testing.assert_allclose(cos, cos.T)
    np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-3)
    for row in numbers["solvers"]:
        assert cos[0, names.index(row["solver"])] == row["min_cosine"]


def test_sensitivity_records_each_point_across_the_grid(written_logistic):
    report, _ = written_logistic
    numbers = report.section("sensitivity").numbers
    assert len(numbers["points"]) == 3
    for row in numbers["points"]:
        assert len(row["grid_overlaps"]) == len(numbers["damping_grid"])
        assert row["damping_stability"] == num(float(np.mean(row["grid_overlaps"])))
    stabilities = [row["damping_stability"] for row in numbers["points"]]
    assert numbers["min_damping_stability"] == min(stabilities)


def test_each_verdict_is_the_worst_level_of_its_checks(written_logistic):
    report, out = written_logistic
    stored = json.loads((out / "audit.json").read_text())["points"]
    for point, record in zip(report.points, stored, strict=True):
        assert record["checks"] == point.checks
        levels = [c["level"] for c in point.checks.values() if c["level"] != LEVELS[3]]
        assert th.VERDICTS[max(LEVELS.index(lv) for lv in levels)] == point.verdict
        assert {"drift_ratio", "retraining_pearson", "damping_stability"} <= set(point.checks)


def test_figures_of_an_indefinite_hessian_and_of_missing_evidence():
    from infl.audit.figures import (
        agreement_figure,
        convergence_figure,
        curvature_figure,
        retraining_figure,
        sensitivity_figure,
    )

    curvature = {
        "method": "lanczos",
        "largest": [40.0, 12.0, 3.0],
        "smallest": [-2.0, -0.5, 1e-3],
        "lambda_max": 40.0,
        "lambda_min": -2.0,
        "negative_count": 2,
        "min_pd_damping": 2.0,
        "damping_used": 2.4,
        "user_damping": 0.01,
    }
    fig = curvature_figure(curvature)
    ax = fig.axes[0]
    assert ax.get_yscale() == "symlog"
    heights = sorted(round(b.get_height(), 6) for b in ax.patches)
    assert heights == [-2.0, -0.5, 0.001, 3.0, 12.0, 40.0]
    labels = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "-(smallest PD damping) = -2.0" in labels
    assert "-(your damping) = -0.01" in labels
    only_reference = {"cosine_matrix": {"solvers": ["reference"], "min_cosine": [[1.0]]}}
    assert agreement_figure({**only_reference, "solvers": []}) is None
    assert convergence_figure({"traces": {}}) is None
    assert retraining_figure({}) is None
    sensitivity = {
        "top_k": 5,
        "damping": 0.1,
        "damping_grid": [0.0333, 0.3],
        "points": [
            {
                "test_index": 7,
                "grid_overlaps": [0.8, 0.4],
                "damping_stability": 0.6,
                "gauss_newton_overlap": None,
            }
        ],
    }
    left, right = sensitivity_figure(sensitivity).axes
    xs, ys = left.lines[0].get_data()
    assert list(xs) == [0.0333, 0.1, 0.3]
    assert list(ys) == [0.8, 1.0, 0.4]
    assert "n/a" in [t.get_text() for t in right.texts]
