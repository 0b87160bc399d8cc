"""Retraining with weight decay per parameter group (no decay on the bias)."""

from __future__ import annotations

import torch
from torch import nn

import reference
from infl import ExactHessian, IndexedData, InfluenceCalculator, Objective
from infl.metrics import pearson
from infl.retrain import RetrainConfig, retrain_ground_truth
from infl.retrain.batched import BatchedSGD
from infl.retrain.fingerprint import store_settings
from infl.retrain.single import RetrainJob, trainable

WD = 0.05
GROUPS = {"default": WD, "no_decay": ["bias"]}


def _fit(n: int = 40, d: int = 3, seed: int = 0):
    """Logistic regression Newton-fitted to mean BCE + (WD/2)||w||^2 (bias not decayed)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 6, d, generator=gen, dtype=torch.float64)
    y = (torch.rand(n + 6, generator=gen, dtype=torch.float64) < torch.sigmoid(x[:, 0] + 1.0)).to(
        torch.float64
    )
    decay = torch.tensor([WD] * d + [0.0], dtype=torch.float64)
    theta = torch.zeros(d + 1, dtype=torch.float64)
    for _ in range(50):
        g = reference.per_example_grads(theta, x[:n], y[:n], 0.0).mean(0) + decay * theta
        if float(g.norm()) < 1e-14:
            break
        h = reference.hessian(theta, x[:n], y[:n], 0.0) + torch.diag(decay)
        theta = theta - torch.linalg.solve(h, g)
    model = reference.load_into(nn.Linear(d, 1).double().eval(), theta)
    return model, (x[:n], y[:n]), (x[n:], y[n:])


def test_retrain_objective_gradient_vanishes_at_the_newton_fit_with_groups():
    model, train, test = _fit()
    job = RetrainJob(
        model,
        Objective("bce_with_logits", weight_decay=GROUPS),
        Objective("bce_with_logits").per_example_loss,
        IndexedData(train),
        IndexedData(test),
        RetrainConfig(),
    )
    assert job.decays == [WD, 0.0]
    params = trainable(model)
    job.objective_backward(model, params, job.train)
    assert job.grad_norm_of(params) < 1e-12
    for p in params:
        p.grad = None
    # the float decay (bias decayed too) is not stationary there: the check can fail
    flat = RetrainJob(model, Objective("bce_with_logits", WD), job.measurement, job.train,
                      job.test, RetrainConfig())  # fmt: skip
    flat.objective_backward(model, params, job.train)
    assert flat.grad_norm_of(params) > 1e-4
    for p in params:
        p.grad = None
    engine = BatchedSGD(model, job.objective.per_example_loss, job.decays, job.train, lr=0.1)
    grad, _, norm = engine.gradient()
    assert float(norm.max()) < 1e-12
    assert grad.shape == (1, 4)


def test_leave_one_out_with_no_bias_decay_matches_influence():
    model, train, test = _fit()
    objective = Objective("bce_with_logits", weight_decay=GROUPS)
    gt = retrain_ground_truth(
        model, objective, train, test, config=RetrainConfig(grad_tol=1e-10),
        num_threads=1, progress=False,
    )  # fmt: skip
    assert float(gt.grad_norm.max()) <= 1e-10
    calc = InfluenceCalculator(model, objective, train, ExactHessian(damping=0.0), progress=False)
    predicted = -calc.influence(test) / len(train[1])
    assert pearson(predicted.reshape(-1), gt.raw_change.reshape(-1)) >= 0.99
    # and with the groups the trained model is at the minimum of its objective
    assert calc.stationarity.is_minimum


def test_store_settings_differ_between_a_float_and_groups():
    model, train, test = _fit()

    def settings(objective: Objective) -> dict:
        job = RetrainJob(model, objective, objective.per_example_loss, IndexedData(train),
                         IndexedData(test), RetrainConfig())  # fmt: skip
        return store_settings(job)

    flat = settings(Objective("bce_with_logits", WD))
    groups = settings(Objective("bce_with_logits", weight_decay=GROUPS))
    assert flat["weight_decay"] == WD
    assert groups["weight_decay"] == {"default": WD, "no_decay": ["bias"], "overrides": {}}
    assert {k for k in flat if flat[k] != groups[k]} == {"weight_decay"}
