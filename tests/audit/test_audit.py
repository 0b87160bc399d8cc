"""``infl.audit``: verdicts on a convex and a fragile model, the report's numbers, the budget."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import nn

from infl import EKFAC, ConjugateGradient, Objective, fit_to_minimum
from infl.audit import AuditReport, audit
from infl.audit.run import pick_test_points
from infl.audit.thresholds import EXACT_MAX_PARAMS, PEARSON_TRUSTED
from infl.errors import InputError
from problems import LogisticProblem

NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def _logistic_audit(problem: LogisticProblem, **kwargs) -> AuditReport:
    objective = Objective("bce_with_logits", weight_decay=problem.wd)
    return audit(
        problem.model,
        objective,
        (problem.x, problem.y),
        (problem.x_test, problem.y_test),
        **kwargs,
    )


def _narrow_relu_mlp(depth: int = 5, width: int = 5) -> tuple[nn.Module, tuple, tuple]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    y = (x[:, 0] * x[:, 1] > 0).long()
    torch.manual_seed(3)  # before the layers: their initialisation is the model
    layers: list[nn.Module] = [nn.Linear(4, width)]
    for _ in range(depth - 1):
        layers += [nn.ReLU(), nn.Linear(width, width)]
    layers += [nn.ReLU(), nn.Linear(width, 2)]
    model = nn.Sequential(*layers).double().eval()  # untrained, no weight decay
    return model, (x[:40], y[:40]), (x[40:], y[40:])


def _json_numbers(value: object) -> list[float]:
    if isinstance(value, bool):
        return [float(value)]
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _json_numbers(item)]
    if isinstance(value, list):
        return [v for item in value for v in _json_numbers(item)]
    return []


def test_logistic_regression_is_trustworthy_and_model_unchanged(logistic):
    before = [p.detach().clone() for p in logistic.model.parameters()]
    report = _logistic_audit(logistic, budget_minutes=2.0)
    assert [p.verdict for p in report.points] == ["trustworthy"] * len(report.points)
    assert report.verdict == "trustworthy"
    retraining = report.section("retraining").numbers
    assert retraining["left_out_retrains"] == 0
    assert retraining["min_pearson"] >= 0.99
    assert all(row["pearson"] >= 0.99 for row in retraining["points"])
    assert report.section("curvature").numbers["negative_count"] == 0
    agreement = report.section("solver_agreement").numbers
    assert agreement["reference"] == "ExactHessian"
    assert {r["solver"] for r in agreement["solvers"]} >= {"cg", "lissa"}
    for p, q in zip(before, logistic.model.parameters(), strict=True):
        assert torch.equal(p, q.detach())


@pytest.mark.slow
def test_untrained_deep_narrow_relu_mlp_is_not_trustworthy_and_says_why():
    model, train, test = _narrow_relu_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    report = audit(
        model,
        Objective("cross_entropy"),
        train,
        test,
        solvers={"cg": ConjugateGradient(rtol=1e-6, max_iter=300)},
        retrain_per_point=4,
        random_per_point=2,
        budget_minutes=0.5,
    )
    assert report.verdict == "not trustworthy"
    for point in report.points:
        assert point.verdict != "trustworthy"
        assert any("not at a minimum" in reason for reason in point.reasons)
    assert any("Train longer" in r for r in report.recommendations)
    assert report.section("stationarity").numbers["is_minimum"] is False
    for point in report.points:  # the figure's levels say the same as the verdict
        assert point.checks["drift_ratio"]["level"] != "pass"
        levels = [c["level"] for c in point.checks.values()]
        assert "not trustworthy" in levels
    for p, q in zip(before, model.parameters(), strict=True):
        assert torch.equal(p, q.detach())


def test_every_number_in_report_md_is_in_audit_json(written_logistic):
    _, out = written_logistic
    stored = json.loads((out / "audit.json").read_text())
    values = _json_numbers(stored)
    text = (out / "report.md").read_text()
    found = NUMBER.findall(text)
    assert len(found) > 40
    missing = [s for s in found if not any(math.isclose(float(s), v, rel_tol=1e-9) for v in values)]
    assert missing == [], missing
    assert "trustworthy" in text
    assert stored["summary"]["verdict"] == "trustworthy"
    assert "figures/retraining.png" in text


def test_a_tiny_budget_retrains_less_and_says_so(logistic):
    report = _logistic_audit(logistic, budget_minutes=1e-5)
    retraining = report.section("retraining")
    assert retraining.numbers["done_retrains"] == 1
    assert retraining.numbers["left_out_retrains"] == retraining.numbers["planned_retrains"] - 1
    assert "left out" in retraining.reading
    assert retraining.numbers["min_pearson"] is None
    for point in report.points:
        assert point.verdict == "use with caution"
        assert any("no retraining check" in r for r in point.reasons)


def test_the_pearson_threshold_decides_the_verdict():
    from infl.audit.verdict import point_verdict

    ok = point_verdict(0, 1.0, [], [], 0.95, True, 0.95, 1.0, 1.0)
    weak = point_verdict(0, 1.0, [], [], PEARSON_TRUSTED - 0.05, True, None, 1.0, 1.0)
    bad = point_verdict(0, 1.0, [], [], 0.1, True, None, 1.0, 1.0)
    assert (ok.verdict, weak.verdict, bad.verdict) == (
        "trustworthy",
        "use with caution",
        "not trustworthy",
    )
    assert "Pearson 0.1" in bad.reasons[0]


def test_test_points_start_with_highest_and_median_loss():
    losses = torch.tensor([0.5, 3.0, 0.1, 1.0, 2.0])
    assert pick_test_points(losses, 2) == [1, 3]
    picked = pick_test_points(losses, 5)
    assert sorted(picked) == [0, 1, 2, 3, 4]
    assert picked[:2] == [1, 3]


def test_chosen_test_indices_are_audited_exactly_and_out_of_range_is_refused(logistic):
    report = _logistic_audit(logistic, test_indices=[3, 7], budget_minutes=1.0)
    assert [p.test_index for p in report.points] == [3, 7]
    assert report.settings["audited_points"] == [3, 7]
    assert report.settings["retrained_points"] == [3, 7]
    m = len(logistic.y_test)
    with pytest.raises(InputError, match=f"test index {m} is out of range"):
        _logistic_audit(logistic, test_indices=[0, m])
    with pytest.raises(InputError, match="test index -1"):
        _logistic_audit(logistic, test_indices=[-1])
    with pytest.raises(InputError, match="at least one"):
        _logistic_audit(logistic, test_indices=[])


def test_taylor_gap_of_logistic_regression_ranks_parameter_changes(logistic, tmp_path):
    report = _logistic_audit(logistic, budget_minutes=2.0)
    retraining = report.section("retraining").numbers
    assert retraining["taylor_gap_spearman"] >= 0.9
    assert retraining["taylor_gap_pearson"] is not None
    assert retraining["taylor_gap_median_ratio"] > 0
    report.write(tmp_path, figures=False)
    stored = json.loads((tmp_path / "audit.json").read_text())["sections"]["retraining"]
    assert stored["numbers"]["taylor_gap_spearman"] == retraining["taylor_gap_spearman"]
    text = (tmp_path / "report.md").read_text()
    assert f"| taylor gap spearman | {retraining['taylor_gap_spearman']} |" in text


@pytest.mark.slow
def test_ekfac_on_an_unsupported_layer_is_skipped_with_its_reason():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2))
    model = model.double().eval()
    objective = Objective("cross_entropy", weight_decay=1e-2)
    fit_to_minimum(model, objective, (x[:24], y[:24]), grad_tol=1e-7, num_threads=1)
    report = audit(
        model,
        objective,
        (x[:24], y[:24]),
        (x[24:], y[24:]),
        solvers={"cg": ConjugateGradient(rtol=1e-6), "ekfac": EKFAC(damping=1e-3)},
        num_test=1,
        retrain_per_point=2,
        random_per_point=0,
        budget_minutes=0.5,
        progress=False,
    )
    agreement = report.section("solver_agreement").numbers
    skipped = {s["solver"]: s["reason"] for s in agreement["skipped"]}
    assert "ekfac" in skipped
    assert skipped["ekfac"]
    assert "ekfac" not in {r["solver"] for r in agreement["solvers"]}
    assert "cg" in {r["solver"] for r in agreement["solvers"]}
    assert agreement["cosine_matrix"]["solvers"] == ["reference", "cg"]
    assert len(report.points) == 1


@pytest.mark.slow
def test_above_exact_max_params_tight_cg_is_the_reference_and_matches_the_closed_form(tmp_path):
    # p = 2001 > EXACT_MAX_PARAMS: the dense Hessian is not built, CG at rtol 1e-8 is the
    # reference; with n = 40 < p the spectrum and the scores have cheap closed forms
    gen = torch.Generator().manual_seed(0)
    n, d, wd = 40, 2000, 0.05
    x = torch.randn(n + 4, d, generator=gen, dtype=torch.float64) / d**0.5
    y = (torch.rand(n + 4, generator=gen, dtype=torch.float64) < 0.5).to(torch.float64)
    model = nn.Linear(d, 1).double().eval()
    objective = Objective("bce_with_logits", weight_decay=wd)
    fit_to_minimum(model, objective, (x[:n], y[:n]), grad_tol=1e-10)
    assert sum(p.numel() for p in model.parameters()) > EXACT_MAX_PARAMS
    report = audit(
        model,
        objective,
        (x[:n], y[:n]),
        (x[n:], y[n:]),
        damping=0.0,
        solvers={"loose_cg": ConjugateGradient(damping=0.0, rtol=1e-3)},
        num_test=2,
        retrain_per_point=3,
        random_per_point=1,
        budget_minutes=1.0,
        store=tmp_path,
        progress=False,
    )
    agreement = report.section("solver_agreement").numbers
    assert agreement["reference"] == "ConjugateGradient"
    assert agreement["reference_max_residual"] <= 1e-7
    ref_trace = agreement["traces"]["reference"]
    assert max(v[-1] for v in ref_trace["values"]) <= 1e-8
    assert ref_trace["iteration"][-1] == agreement["reference_iterations"]
    # closed form: H = X~^T S X~ / n + wd I; its nonzero data part shares eigenvalues with
    # the n x n matrix S^1/2 X~ X~^T S^1/2 / n, and lambda_min = wd (n < p)
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    xt = torch.cat([x, torch.ones(n + 4, 1, dtype=torch.float64)], dim=1)
    prob = torch.sigmoid(xt[:n] @ theta)
    s = prob * (1 - prob)
    gram = (s.sqrt()[:, None] * xt[:n]) @ (s.sqrt()[:, None] * xt[:n]).T / n
    curvature = report.section("curvature").numbers
    assert curvature["method"] != "dense"
    lambda_max = float(torch.linalg.eigvalsh(gram)[-1]) + wd
    assert math.isclose(curvature["lambda_max"], lambda_max, rel_tol=1e-3)
    assert math.isclose(curvature["lambda_min"], wd, rel_tol=1e-3)
    assert curvature["negative_count"] == 0
    # the reference scores (kept in the store) are -g_test^T H^-1 g_i in closed form
    hessian = (xt[:n].T * s) @ xt[:n] / n + wd * torch.eye(d + 1, dtype=torch.float64)
    grads = (prob - y[:n])[:, None] * xt[:n] + wd * theta  # of l(z_i) + (wd/2)|theta|^2
    points = report.settings["audited_points"]
    p_test = torch.sigmoid(xt[n:] @ theta)
    test_grads = ((p_test - y[n:])[:, None] * xt[n:])[points]
    expected = -test_grads @ torch.linalg.solve(hessian, grads.T)
    stored = torch.load(tmp_path / "reference.pt", weights_only=True)["scores"]
    assert float((stored - expected).norm() / expected.norm()) < 1e-6
    assert report.section("retraining").numbers["min_pearson"] >= 0.99
