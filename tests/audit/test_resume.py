"""A stored audit resumes without recomputing finished sections and refuses other settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from infl import ConjugateGradient, Objective
from infl.audit import AuditReport, audit, run
from infl.audit import evidence as ev
from infl.errors import InputError, StoreMismatchError
from problems import LogisticProblem

SECTIONS = ("curvature_evidence", "agreement_evidence", "sensitivity_evidence")
TIMING = {"seconds", "seconds_per_retrain", "retraining_seconds"}


def _audit(
    problem: LogisticProblem, store: Path | None, test: Any = None, **changes: Any
) -> AuditReport:
    kwargs: dict[str, Any] = {
        "solvers": {"cg": ConjugateGradient(rtol=1e-6, max_iter=100)},
        "num_test": 2,
        "retrain_per_point": 4,
        "random_per_point": 1,
        "budget_minutes": 2.0,
        "progress": False,
        **changes,
    }
    return audit(
        problem.model,
        Objective("bce_with_logits", weight_decay=problem.wd),
        (problem.x, problem.y),
        (problem.x_test, problem.y_test) if test is None else test,
        store=store,
        **kwargs,
    )


def _counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the calls of each evidence function :func:`infl.audit.audit` makes."""
    calls = dict.fromkeys((*SECTIONS, "retraining_evidence"), 0)
    for name in calls:
        original = getattr(run, name)

        def counting(*args: Any, _name: str = name, _f: Any = original, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _f(*args, **kwargs)

        monkeypatch.setattr(run, name, counting)
    return calls


def _interrupt(*args: Any, **kwargs: Any) -> None:
    raise KeyboardInterrupt


def _untimed(value: Any) -> Any:
    """``value`` without wall-clock entries (which differ between runs)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _records(store: Path) -> set[str]:
    return {p.stem for p in store.glob("*.json")}


@pytest.mark.slow
def test_an_interrupted_audit_resumes_without_recomputing_finished_sections(
    logistic, tmp_path, monkeypatch
):
    store = tmp_path / "evidence"
    with monkeypatch.context() as m:
        m.setattr(run, "sensitivity_evidence", _interrupt)
        with pytest.raises(KeyboardInterrupt):
            _audit(logistic, store)
    assert _records(store) == {"config", "stationarity", "curvature", "solver_agreement"}
    assert not list(store.glob(".*"))  # no half-written file
    calls = _counted(monkeypatch)
    resumed = _audit(logistic, store)
    assert calls == {
        "curvature_evidence": 0,
        "agreement_evidence": 0,
        "sensitivity_evidence": 1,
        "retraining_evidence": 1,
    }
    assert resumed.settings["resumed_sections"] == ["stationarity", "curvature", "solver_agreement"]
    assert resumed.settings["resumed_seconds"] > 0
    # the same evidence and verdicts as an audit that was never interrupted
    whole = _audit(logistic, None)
    assert _untimed(resumed.to_json()["sections"]) == _untimed(whole.to_json()["sections"])
    assert resumed.to_json()["points"] == whole.to_json()["points"]
    # a finished audit reruns from its store alone, to the same report
    calls.update(dict.fromkeys(calls, 0))
    again = _audit(logistic, store)
    assert set(calls.values()) == {0}
    assert again.to_json()["sections"] == resumed.to_json()["sections"]
    assert len(again.settings["resumed_sections"]) == 5


@pytest.mark.slow
def test_an_audit_interrupted_while_retraining_keeps_its_finished_retrains(
    logistic, tmp_path, monkeypatch
):
    store = tmp_path / "evidence"
    original = ev.retrain_ground_truth
    seen: list[list[int]] = []

    def second_call_is_killed(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        seen.append(list(args[4]))
        if len(seen) == 2:  # after the batch is stored, before the progress record is
            raise KeyboardInterrupt
        return result

    with monkeypatch.context() as m:
        m.setattr(ev, "retrain_ground_truth", second_call_is_killed)
        with pytest.raises(KeyboardInterrupt):
            _audit(logistic, store)
    progress = json.loads((store / f"{ev.PROGRESS_RECORD}.json").read_text())
    assert progress["done"] == seen[0]
    kept = {p.name: p.stat().st_mtime_ns for p in (store / "retrains").glob("retrain-*.pt")}
    assert len(kept) == 1 + len(seen[0]) + len(seen[1])  # the control run, then the removals
    resumed = _audit(logistic, store)
    for name, mtime in kept.items():  # loaded, not retrained again
        assert (store / "retrains" / name).stat().st_mtime_ns == mtime
    numbers = resumed.section("retraining").numbers
    assert numbers["removed"][: len(seen[0]) + len(seen[1])] == seen[0] + seen[1]
    assert numbers["left_out_retrains"] == 0
    whole = _audit(logistic, None)
    expected = _untimed(whole.to_json()["sections"]["retraining"])
    assert _untimed(resumed.to_json()["sections"]["retraining"]) == expected


def test_a_store_of_other_settings_is_refused_unless_fresh(logistic, tmp_path, monkeypatch):
    store = tmp_path / "evidence"
    with monkeypatch.context() as m:
        m.setattr(run, "curvature_evidence", _interrupt)
        with pytest.raises(KeyboardInterrupt):
            _audit(logistic, store)
        assert _records(store) == {"config", "stationarity"}
        with pytest.raises(StoreMismatchError, match=r"'budget_minutes' was 2\.0.*--fresh"):
            _audit(logistic, store, budget_minutes=3.0)
        with pytest.raises(StoreMismatchError, match="'num_test' was 2"):
            _audit(logistic, store, test_indices=[0, 1])
        with pytest.raises(StoreMismatchError, match="'solvers'"):
            _audit(logistic, store, solvers={"cg": ConjugateGradient(rtol=1e-4)})
        with pytest.raises(StoreMismatchError, match="'test_data'"):
            _audit(logistic, store, test=(logistic.x_test[:5], logistic.y_test[:5]))
        (store / "stationarity.json").write_text('{"stale": true}')
        with pytest.raises(KeyboardInterrupt):
            _audit(logistic, store, budget_minutes=3.0, fresh=True)
    assert json.loads((store / "config.json").read_text())["budget_minutes"] == 3.0
    assert "section" in json.loads((store / "stationarity.json").read_text())  # recomputed
    typo = tmp_path / "typo"  # a bad index is refused before a store is made for it
    with pytest.raises(InputError, match="out of range"):
        _audit(logistic, typo, test_indices=[0, 10**6])
    assert not (typo / "config.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"lr": 0.1}')
    with pytest.raises(StoreMismatchError, match="not an infl audit's"):
        _audit(logistic, other, fresh=True)
    assert (other / "config.json").exists()  # never deleted


SPEC = """
from infl import Objective
from problems import make_logistic_problem


def setup():
    p = make_logistic_problem()
    objective = Objective("bce_with_logits", weight_decay=p.wd)
    return p.model, objective, (p.x, p.y), (p.x_test, p.y_test)
"""


@pytest.mark.slow
def test_cli_resumes_from_its_out_directory_and_fresh_starts_over(tmp_path, capsys):
    from infl.cli import main

    spec = tmp_path / "logistic_setup.py"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    args = ["audit", "--spec", str(spec), "--out", str(out), "--budget-minutes", "1"]
    args += ["--no-progress", "--no-figures"]
    assert main([*args, "--num-test", "1"]) == 0
    first = json.loads((out / "audit.json").read_text())
    assert first["settings"]["resumed_sections"] == []
    assert (out / "evidence" / "config.json").exists()
    assert main([*args, "--num-test", "1"]) == 0
    second = json.loads((out / "audit.json").read_text())
    assert len(second["settings"]["resumed_sections"]) == 5
    assert second["sections"] == first["sections"]
    capsys.readouterr()
    assert main([*args, "--num-test", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "'num_test' was 1" in err
    assert "--fresh" in err
    assert main([*args, "--num-test", "2", "--fresh"]) == 0
    third = json.loads((out / "audit.json").read_text())
    assert third["settings"]["resumed_sections"] == []
    assert len(third["points"]) == 2
