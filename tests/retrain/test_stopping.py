"""Retraining messages name why a retrain stopped, and the fix that matches the reason.

Three ways a retrain can end short of ``grad_tol``: the step budget ran out (raise
``max_steps``), L-BFGS stopped on its own before the budget (raising ``max_steps`` is no fix),
or the objective became non-finite (an error, with the fix for that optimizer).
"""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_gt import make_problem, model_from_theta, newton_fit
from infl import Objective
from infl.errors import InflWarning, NonFiniteError
from infl.retrain import RetrainConfig, retrain_ground_truth
from infl.retrain.fingerprint import removal_key
from infl.retrain.ground_truth import _unconverged_messages
from infl.retrain.records import Outcome

WD = 0.05


@pytest.fixture(scope="module")
def trained():
    X, y, Xt, yt = make_problem(n=40, m=3)
    theta = newton_fit(X.numpy(), y.numpy(), WD)
    return model_from_theta(theta), (X, y), (Xt, yt)


def _run(trained, config, *, dtype=torch.float64, **kw):
    model, (X, y), (Xt, yt) = trained
    model = model.to(dtype)
    return retrain_ground_truth(
        model,
        Objective("bce_with_logits", weight_decay=WD),
        (X.to(dtype), y.to(dtype)),
        (Xt.to(dtype), yt.to(dtype)),
        [0, 1],
        config=config,
        progress=False,
        **kw,
    )


def _messages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, InflWarning)]


def _stored_stop(root: Path, removal: tuple[int, ...]) -> str:
    rec = torch.load(root / f"{removal_key(removal)}.pt", weights_only=True)
    return rec["stop"]


@pytest.mark.parametrize("parallel_runs", [1, 4], ids=["one-by-one", "grouped"])
def test_budget_exhausted_says_raise_max_steps(trained, tmp_path, parallel_runs):
    cfg = RetrainConfig(optimizer="sgd", lr=0.01, max_steps=3, grad_tol=1e-12)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        gt = _run(trained, cfg, store=tmp_path, parallel_runs=parallel_runs)
    (message,) = _messages(record)
    assert "used the whole step budget, max_steps=3" in message
    assert "raise max_steps" in message
    assert "stopped early" not in message
    assert gt.steps.tolist() == [3, 3]
    assert _stored_stop(tmp_path, (0,)) == "max_steps"
    assert _stored_stop(tmp_path, ()) == "converged"  # starts at the Newton minimum
    assert "control run: not affected" in message


def test_lbfgs_stopping_on_its_own_does_not_blame_the_budget(trained, tmp_path):
    # float32 cannot reach ||grad J|| <= 1e-12: L-BFGS and the polish stop long before 500
    cfg = RetrainConfig(optimizer="lbfgs", grad_tol=1e-12, max_steps=500)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        gt = _run(trained, cfg, dtype=torch.float32, store=tmp_path)
    (message,) = _messages(record)
    assert int(gt.steps.max()) < 500
    assert "stopped early, at step" in message
    assert "of max_steps=500" in message
    assert "raising max_steps will not help" in message
    assert "float32" in message
    assert "float64" in message
    assert "raise max_steps or lr" not in message
    assert _stored_stop(tmp_path, (0,)) == "stalled"


def test_converged_retrains_are_silent_and_recorded(trained, tmp_path):
    cfg = RetrainConfig(optimizer="lbfgs", grad_tol=1e-8, max_steps=500)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InflWarning)
        _run(trained, cfg, store=tmp_path)
    assert _stored_stop(tmp_path, (1,)) == "converged"
    again = _run(trained, cfg, store=tmp_path)
    assert again.num_loaded == 3


def test_sgd_non_finite_names_lr_and_lbfgs(trained):
    cfg = RetrainConfig(optimizer="sgd", lr=1e6, max_steps=200, grad_tol=None)
    with pytest.raises(NonFiniteError) as info:
        _run(trained, cfg, parallel_runs=1)
    message = str(info.value)
    assert "non-finite" in message
    assert "lower lr (now 1000000.0)" in message
    assert "optimizer='lbfgs'" in message


def _nan_beyond_radius(model, batch):
    x, t = batch
    losses = F.binary_cross_entropy_with_logits(model(x).squeeze(-1), t, reduction="none")
    return torch.where(model.weight.norm() > 3, torch.full_like(losses, float("nan")), losses)


def test_lbfgs_non_finite_in_line_search_is_named_not_an_index_error():
    X, _, Xt, yt = make_problem(n=40, m=3)
    y = (X[:, 0] > 0).double()  # separable: the weights grow until the loss turns NaN
    model = nn.Linear(3, 1).double().eval()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    with pytest.raises(NonFiniteError) as info:
        retrain_ground_truth(
            model,
            Objective(_nan_beyond_radius),
            (X, y),
            (Xt, yt),
            [0],
            config=RetrainConfig(optimizer="lbfgs", grad_tol=1e-10, max_steps=500),
            measurement=Objective("bce_with_logits").per_example_loss,
            progress=False,
        )
    message = str(info.value)
    assert "non-finite" in message
    assert "L-BFGS's line search" in message
    assert "float64" in message
    assert "optimizer='lbfgs'" not in message


# ------------------------------------------------------------------ the messages, constructed
def _outcome(removal, grad_norm, steps, stop):
    return Outcome(removal, torch.zeros(1), 0.0, grad_norm, steps, stop)


_JOB = types.SimpleNamespace(
    config=RetrainConfig(optimizer="lbfgs", grad_tol=1e-6, max_steps=100), dtype=torch.float32
)


def test_one_message_per_reason():
    outcomes = [
        _outcome((0,), 1e-3, 100, "max_steps"),
        _outcome((1,), 5e-5, 41, "stalled"),
        _outcome((2,), 1e-7, 12, "converged"),
    ]
    control = _outcome((), 1e-8, 10, "converged")
    budget, stalled = _unconverged_messages(outcomes, control, _JOB)  # type: ignore[arg-type]
    assert budget.startswith("1 of 3 retrains (control run: not affected) used the whole")
    assert "up to 0.001 > grad_tol=1e-06" in budget
    assert "raise max_steps" in budget
    assert "stopped early, at step 41 of max_steps=100" in stalled
    assert "up to 5e-05" in stalled
    assert "loosen grad_tol to about 0.0001" in stalled


def test_control_run_alone_is_reported_with_its_reason():
    outcomes = [_outcome((0,), 1e-9, 5, "converged")]
    control = _outcome((), 2e-6, 37, "stalled")
    (message,) = _unconverged_messages(outcomes, control, _JOB)  # type: ignore[arg-type]
    assert message.startswith("0 of 1 retrains (control run: also affected) stopped early")
    assert "at step 37" in message
    assert _unconverged_messages(outcomes, _outcome((), 0.0, 3, "converged"), _JOB) == []  # type: ignore[arg-type]
