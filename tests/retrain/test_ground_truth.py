"""Tests of retrain_ground_truth / retrain_subsets against an independent Newton refit."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_gt import (
    RESUME_SETTINGS,
    bce,
    make_problem,
    model_from_theta,
    newton_fit,
    newton_loo_effects,
    resume_problem,
    theta_of,
)
from infl import ExactHessian, InfluenceCalculator, InputError, Objective
from infl.errors import InflWarning, NonFiniteError, StoreMismatchError
from infl.metrics import (
    linear_datamodeling_score,
    pearson,
    relative_error,
    spearman,
    taylor_gap,
)
from infl.retrain import RetrainConfig, retrain_ground_truth, retrain_subsets

WD = 0.05


@pytest.fixture(scope="module")
def convex():
    X, y, Xt, yt = make_problem()
    theta = newton_fit(X.numpy(), y.numpy(), WD)
    model = model_from_theta(theta)
    objective = Objective("bce_with_logits", weight_decay=WD)
    gt = retrain_ground_truth(
        model,
        objective,
        (X, y),
        (Xt, yt),
        config=RetrainConfig(grad_tol=1e-10),
        num_threads=1,
        progress=False,
    )
    return {"X": X, "y": y, "Xt": Xt, "yt": yt, "model": model, "obj": objective, "gt": gt}


def test_warm_start_lbfgs_equals_newton_refit(convex):
    X, y, Xt, yt, gt = (convex[k] for k in ("X", "y", "Xt", "yt", "gt"))
    n = len(y)
    ref, ref_norms = newton_loo_effects(X.numpy(), y.numpy(), Xt.numpy(), yt.numpy(), WD, range(n))
    assert gt.raw_change.shape == (len(yt), n)
    assert gt.removals == tuple((i,) for i in range(n))
    np.testing.assert_allclose(gt.raw_change.numpy(), ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(gt.param_change_norm.numpy(), ref_norms, rtol=1e-6, atol=1e-10)
    assert float(gt.grad_norm.max()) <= 1e-10
    # θ* is the exact minimum, so the control run does not move and correction is a no-op
    assert float(gt.control_change.abs().max()) < 1e-10
    torch.testing.assert_close(gt.corrected_change, gt.raw_change, atol=1e-10, rtol=0)
    # the effects are not trivially small: the comparison above is meaningful
    assert float(gt.raw_change.abs().max()) > 1e-3


def test_calculator_matches_retraining_on_convex_model(convex):
    calc = InfluenceCalculator(
        convex["model"], convex["obj"], (convex["X"], convex["y"]), ExactHessian(), progress=False
    )
    predicted = calc.removal_effect((convex["Xt"], convex["yt"]))
    actual = convex["gt"].corrected_change
    r, rho = pearson(predicted, actual), spearman(predicted, actual)
    print(f"convex fidelity: pearson={r:.6f} spearman={rho:.6f}")
    assert r >= 0.99
    assert rho >= 0.99
    for j in range(actual.shape[0]):  # also per test point
        assert pearson(predicted[j], actual[j]) >= 0.99
    gap = taylor_gap(
        calc.param_change(range(len(convex["y"]))).norm(dim=1), convex["gt"].param_change_norm
    )
    assert gap.pearson >= 0.99
    assert 0.8 < gap.median_ratio < 1.25


def test_group_removals_match_newton(convex):
    groups = [[0, 1, 2], [5, 9], 7, torch.tensor([20, 3])]
    gt = retrain_ground_truth(
        convex["model"],
        convex["obj"],
        (convex["X"], convex["y"]),
        (convex["Xt"], convex["yt"]),
        groups,
        config=RetrainConfig(grad_tol=1e-10),
        progress=False,
    )
    assert gt.removals == ((0, 1, 2), (5, 9), (7,), (3, 20))
    ref, _ = newton_loo_effects(
        convex["X"].numpy(),
        convex["y"].numpy(),
        convex["Xt"].numpy(),
        convex["yt"].numpy(),
        WD,
        [[0, 1, 2], [5, 9], [7], [3, 20]],
    )
    np.testing.assert_allclose(gt.raw_change.numpy(), ref, atol=1e-9, rtol=0)


def test_does_not_mutate_user_model(convex):
    model = convex["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    retrain_ground_truth(
        model,
        convex["obj"],
        (convex["X"], convex["y"]),
        (convex["Xt"], convex["yt"]),
        [0, 1],
        config=RetrainConfig(optimizer="sgd", lr=0.5, max_steps=5, grad_tol=None),
        progress=False,
    )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(
    "protocol",
    [
        {"optimizer": "adam", "lr": 0.05, "max_steps": 4000, "grad_tol": 1e-7},
        {"optimizer": "sgd", "lr": 1.0, "momentum": 0.5, "max_steps": 4000, "grad_tol": 1e-8},
        {"optimizer": "lbfgs", "init": "scratch", "seed": 3, "grad_tol": 1e-10},
    ],
)
def test_other_optimizers_reach_the_same_minimum(convex, protocol):
    gt = retrain_ground_truth(
        convex["model"],
        convex["obj"],
        (convex["X"], convex["y"]),
        (convex["Xt"], convex["yt"]),
        [4, 11],
        config=RetrainConfig(**protocol),
        progress=False,
    )
    ref = convex["gt"].raw_change[:, [4, 11]]
    torch.testing.assert_close(gt.raw_change, ref, atol=1e-6, rtol=0)


def test_minibatch_is_seeded_and_deterministic(convex):
    args = (
        convex["model"],
        convex["obj"],
        (convex["X"], convex["y"]),
        (convex["Xt"], convex["yt"]),
        [2],
    )
    cfg = RetrainConfig(optimizer="sgd", lr=0.3, batch_size=8, max_steps=60, grad_tol=None)
    a = retrain_ground_truth(*args, config=cfg, progress=False)
    b = retrain_ground_truth(*args, config=cfg, progress=False)
    c = retrain_ground_truth(*args, config=dataclasses.replace(cfg, seed=2), progress=False)
    assert torch.equal(a.raw_change, b.raw_change)
    assert not torch.equal(a.raw_change, c.raw_change)
    assert int(a.steps[0]) == 60


def _loo_reference(X, y, Xt, yt, n):
    return newton_loo_effects(X.numpy(), y.numpy(), Xt.numpy(), yt.numpy(), WD, range(n))[0]


@pytest.mark.slow
def test_control_correction_on_unconverged_model():
    X, y, Xt, yt = make_problem(n=40, m=8, seed=1)
    # θ*: a few gradient steps from zero, far from the minimum
    model = model_from_theta(np.zeros(X.shape[1] + 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    objective = Objective("bce_with_logits", weight_decay=WD)
    for _ in range(3):
        opt.zero_grad()
        loss = objective.per_example_loss(model, (X, y)).mean() + WD / 2 * sum(
            (p**2).sum() for p in model.parameters()
        )
        loss.backward()
        opt.step()
    theta_star = theta_of(model)
    theta_hat = newton_fit(X.numpy(), y.numpy(), WD)
    assert np.linalg.norm(theta_star - theta_hat) > 0.1  # really unconverged

    gt = retrain_ground_truth(
        model,
        objective,
        (X, y),
        (Xt, yt),
        config=RetrainConfig(optimizer="sgd", lr=1.0, max_steps=300, grad_tol=None),
        progress=False,
    )
    ref = _loo_reference(X, y, Xt, yt, len(y))
    raw_err = relative_error(gt.raw_change, ref)
    corr_err = relative_error(gt.corrected_change, ref)
    # the drift of continued training dwarfs the removal effects ...
    assert float(gt.control_change.abs().mean()) > 5 * float(np.abs(ref).mean())
    print(
        f"control: raw rel.err {raw_err:.3f}, corrected {corr_err:.3f}, pearson raw "
        f"{pearson(gt.raw_change, ref):.3f} corrected {pearson(gt.corrected_change, ref):.3f}"
    )
    assert raw_err > 3.0
    # ... and subtracting the control run removes it
    assert corr_err < 0.3
    assert corr_err < raw_err / 10
    assert pearson(gt.corrected_change, ref) > 0.95 > pearson(gt.raw_change, ref)
    torch.testing.assert_close(gt.corrected_change, gt.raw_change - gt.control_change[:, None])


def test_warns_when_tolerance_not_reached(convex):
    with pytest.warns(InflWarning, match="max_steps=3"):
        gt = retrain_ground_truth(
            convex["model"],
            convex["obj"],
            (convex["X"], convex["y"]),
            (convex["Xt"], convex["yt"]),
            [0],
            config=RetrainConfig(optimizer="sgd", lr=0.01, max_steps=3, grad_tol=1e-12),
            progress=False,
        )
    assert int(gt.steps[0]) == 3


# --------------------------------------------------------------------------- store and resume
def _args(convex):
    return (
        convex["model"],
        convex["obj"],
        (convex["X"], convex["y"]),
        (convex["Xt"], convex["yt"]),
    )


def test_store_skips_finished_work_and_extends(convex, tmp_path):
    kw = {"config": RetrainConfig(grad_tol=1e-10), "progress": False, "store": tmp_path / "s"}
    first = retrain_ground_truth(*_args(convex), [0, 1, 2], **kw)
    assert (first.num_loaded, first.num_computed) == (0, 4)  # 3 removals + control
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["optimizer"] == "lbfgs"
    assert cfg["weight_decay"] == WD
    again = retrain_ground_truth(*_args(convex), [2, 0, 1, 5], **kw)
    assert (again.num_loaded, again.num_computed) == (4, 1)
    torch.testing.assert_close(again.raw_change[:, :3], first.raw_change[:, [2, 0, 1]])
    assert not list((tmp_path / "s").glob("*.tmp"))


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"lr": 0.5}, "lr"),
        ({"max_steps": 7}, "max_steps"),
        ({"init": "scratch"}, "init"),
        ({"weight_decay": 0.1}, "weight_decay"),
        ({"train_scale": 2.0}, "train_data"),
        ({"theta_shift": 1e-3}, "model"),
    ],
)
def test_store_refuses_other_configuration(convex, tmp_path, change, key):
    store = tmp_path / "s"
    cfg = RetrainConfig(grad_tol=1e-8)
    retrain_ground_truth(*_args(convex), [0], config=cfg, store=store, progress=False)
    model, obj, (X, y), test = _args(convex)
    kw = {"config": cfg, "store": store, "progress": False}
    if "weight_decay" in change:
        obj = Objective("bce_with_logits", weight_decay=change["weight_decay"])
    elif "train_scale" in change:
        X = X * change["train_scale"]
    elif "theta_shift" in change:
        model = model_from_theta(theta_of(model) + change["theta_shift"])
    else:
        kw["config"] = dataclasses.replace(cfg, **change)
    with pytest.raises(StoreMismatchError, match=f"{key}=") as info:
        retrain_ground_truth(model, obj, (X, y), test, [0], **kw)
    assert "new store path" in str(info.value)


# The run that the resume test kills: batched SGD in groups of 4, so the store fills group by
# group (the loss sleeps INFL_GT_SLOW seconds per call).
_KILLED_SCRIPT = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
import torch
from helpers_gt import RESUME_SETTINGS, resume_problem
from infl import Objective
from infl.retrain import RetrainConfig, retrain_ground_truth

torch.set_num_threads(1)
model, train, test, removals = resume_problem()
objective = Objective(RESUME_SETTINGS["loss"], weight_decay=RESUME_SETTINGS["wd"])
retrain_ground_truth(model, objective, train, test, removals, store=sys.argv[1],
                     progress=False, parallel_runs=4,
                     config=RetrainConfig(**RESUME_SETTINGS["protocol"]))
"""


@pytest.mark.slow
def test_killed_run_resumes_without_recomputing(tmp_path):
    store = tmp_path / "store"
    env = {**os.environ, "INFL_GT_SLOW": "0.01"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SCRIPT, str(store)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(store.glob("retrain-*.pt"))) < 4:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the retraining subprocess made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    finished = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.glob("retrain-*.pt")}
    model, train, test, removals = resume_problem()
    total = len(removals) + 1
    assert 4 <= len(finished) < total  # killed part-way

    objective = Objective(RESUME_SETTINGS["loss"], weight_decay=RESUME_SETTINGS["wd"])
    resumed = retrain_ground_truth(
        model,
        objective,
        train,
        test,
        removals,
        store=store,
        progress=False,
        config=RetrainConfig(**RESUME_SETTINGS["protocol"]),
    )
    assert resumed.num_loaded == len(finished)
    assert resumed.num_computed == total - len(finished)
    for name, (mtime, data) in finished.items():  # finished work was not redone
        assert (store / name).stat().st_mtime_ns == mtime
        assert (store / name).read_bytes() == data
    fresh = retrain_ground_truth(
        model,
        objective,
        train,
        test,
        removals,
        progress=False,
        config=RetrainConfig(**RESUME_SETTINGS["protocol"]),
    )
    torch.testing.assert_close(resumed.raw_change, fresh.raw_change, atol=1e-12, rtol=0)
    torch.testing.assert_close(resumed.control_change, fresh.control_change, atol=1e-12, rtol=0)
    torch.testing.assert_close(resumed.grad_norm, fresh.grad_norm, atol=1e-12, rtol=0)


@pytest.mark.slow
def test_workers_give_the_same_result(convex, tmp_path):
    kw = {"config": RetrainConfig(grad_tol=1e-10), "progress": False}
    serial = retrain_ground_truth(*_args(convex), [0, 3, 8, [1, 2]], **kw)
    parallel = retrain_ground_truth(
        *_args(convex), [0, 3, 8, [1, 2]], workers=2, store=tmp_path / "s", **kw
    )
    torch.testing.assert_close(parallel.raw_change, serial.raw_change, atol=1e-12, rtol=0)
    assert len(list((tmp_path / "s").glob("retrain-*.pt"))) == 5


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("removals", "match"),
    [
        ([0, 60], "index 60, out of range for 60"),
        ([-1], "index -1, out of range"),
        ([[1, 2], []], "removal 1 is an empty group"),
        ([[3, 3]], "index 3 more than once"),
        ([], "removals is empty"),
        ([[0.5]], "not an integer"),
        ([list(range(60))], "removes all 60"),
    ],
)
def test_bad_removals(convex, removals, match):
    with pytest.raises(InputError, match=match):
        retrain_ground_truth(*_args(convex), removals, progress=False)


def test_bad_settings_and_unpicklable_loss(convex):
    with pytest.raises(InputError, match="L-BFGS needs exact full-batch"):
        RetrainConfig(optimizer="lbfgs", batch_size=4)
    with pytest.raises(InputError, match="optimizer must be"):
        RetrainConfig(optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="workers"):
        retrain_ground_truth(*_args(convex), [0], workers=0, progress=False)
    with pytest.raises(InputError, match="parallel_runs"):
        retrain_ground_truth(*_args(convex), [0], parallel_runs=0, progress=False)
    _, _, train, test = _args(convex)
    obj = Objective(lambda model, batch: (model(batch[0]).reshape(-1) - batch[1]) ** 2)
    with pytest.raises(InputError, match=r"cannot be pickled.*lambda"):
        retrain_ground_truth(convex["model"], obj, train, test, [0], workers=2, progress=False)


def test_measurement_shape_checked(convex):
    with pytest.raises(InputError, match="one value per example"):
        retrain_ground_truth(
            *_args(convex), [0], measurement=lambda model, batch: model(batch[0]), progress=False
        )


def test_divergence_is_a_nonfinite_error():
    X = torch.randn(20, 3, dtype=torch.float64) * 10
    y = torch.randn(20, dtype=torch.float64)
    model = nn.Linear(3, 1).double().eval()
    with pytest.raises(NonFiniteError, match="lower lr"):
        retrain_ground_truth(
            model,
            Objective("mse"),
            (X, y),
            (X[:2], y[:2]),
            [0],
            config=RetrainConfig(optimizer="sgd", lr=10.0, max_steps=500, grad_tol=None),
            progress=False,
        )


# --------------------------------------------------------------------------- LDS
def test_retrain_subsets_and_lds(convex):
    X, y, Xt, yt = (convex[k] for k in ("X", "y", "Xt", "yt"))
    subsets = retrain_subsets(
        convex["model"],
        convex["obj"],
        (X, y),
        (Xt, yt),
        num_subsets=20,
        alpha=0.5,
        config=RetrainConfig(grad_tol=1e-9),
        progress=False,
    )
    assert subsets.masks.shape == (20, 60)
    assert subsets.outputs.shape == (6, 20)
    assert bool((subsets.masks.sum(dim=1) == 30).all())
    # outputs really are the refits on each subset (independent Newton check of one subset)
    keep = subsets.masks[3].numpy()
    theta = newton_fit(X.numpy()[keep], y.numpy()[keep], WD)
    np.testing.assert_allclose(
        subsets.outputs[:, 3].numpy(), bce(theta, Xt.numpy(), yt.numpy()), atol=1e-8
    )
    calc = InfluenceCalculator(
        convex["model"], convex["obj"], (X, y), ExactHessian(), progress=False
    )
    effect = calc.removal_effect((Xt, yt))
    lds = linear_datamodeling_score(effect, subsets.masks, subsets.outputs)
    assert lds > 0.7
    # the sign matters: flipped attributions anti-correlate
    assert linear_datamodeling_score(-effect, subsets.masks, subsets.outputs) < -0.7
