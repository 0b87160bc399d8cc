"""PBRF ground truth (Bae et al. 2022): closed forms, first-order agreement, control, store."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reference
from infl import ExactHessian, InfluenceCalculator, InputError, Objective, supervised_loss
from infl.errors import StoreMismatchError
from infl.metrics import pearson
from infl.retrain import RetrainConfig, retrain_ground_truth
from infl.retrain.pbrf import bregman_divergence
from problems import LogisticProblem, make_logistic_problem

K = 8  # leave-one-out removals per test (each retrain ~0.05 s)


@pytest.fixture(scope="module")
def prob() -> LogisticProblem:
    return make_logistic_problem()


def _objective(p: LogisticProblem) -> Objective:
    return Objective("bce_with_logits", weight_decay=p.wd)


def _pbrf(proximity: float, grad_tol: float = 1e-10) -> RetrainConfig:
    return RetrainConfig(target="pbrf", proximity=proximity, grad_tol=grad_tol)


def _logits(model, batch):
    return model(batch[0]).reshape(-1)


def _basis(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Test inputs whose logits are ``b`` and ``w_k + b``: they read theta off the model."""
    x = torch.cat([torch.zeros(1, d), torch.eye(d)]).double()
    return x, torch.zeros(d + 1, dtype=torch.float64)


def _theta_from_logits(out: torch.Tensor) -> torch.Tensor:
    return torch.cat([out[1:] - out[0], out[:1]])


# -- the Bregman divergences --------------------------------------------------------------------
def _generic(name):
    fns = {
        "cross_entropy": lambda o, t: F.cross_entropy(o, t, reduction="none"),
        "mse": lambda o, t: ((o - t) ** 2).sum(dim=1),
        "bce_with_logits": lambda o, t: F.binary_cross_entropy_with_logits(
            o, t, reduction="none"
        ).sum(dim=1),
    }
    return supervised_loss(fns[name])


@pytest.mark.parametrize(
    ("name", "targets"),
    [
        ("cross_entropy", torch.tensor([0, 2, 1, 2, 0])),
        ("cross_entropy", torch.softmax(torch.randn(5, 3, dtype=torch.float64), 1) * 2.0),
        ("mse", torch.randn(5, 3, dtype=torch.float64)),
        ("bce_with_logits", torch.randint(0, 2, (5, 3)).double()),
    ],
)
def test_closed_forms_equal_the_autograd_bregman_divergence(name, targets):
    gen = torch.Generator().manual_seed(1)
    f = 3 * torch.randn(5, 3, generator=gen, dtype=torch.float64)
    f_ref = 3 * torch.randn(5, 3, generator=gen, dtype=torch.float64)
    closed = bregman_divergence(supervised_loss(name), f, f_ref, targets)
    generic = bregman_divergence(_generic(name), f, f_ref, targets)
    torch.testing.assert_close(closed, generic, rtol=1e-10, atol=1e-12)
    assert bool((closed > 0).all())
    zero = bregman_divergence(supervised_loss(name), f_ref, f_ref, targets)
    assert float(zero.abs().max()) < 1e-12
    if name == "mse":  # infl's mse has no 1/2: D = |f - f'|^2
        torch.testing.assert_close(closed, ((f - f_ref) ** 2).sum(dim=1))
    if name == "cross_entropy" and not targets.is_floating_point():
        kl = F.kl_div(
            torch.log_softmax(f, 1), torch.log_softmax(f_ref, 1), log_target=True,
            reduction="batchmean",
        )  # fmt: skip
        torch.testing.assert_close(closed.mean(), kl)


# -- against closed forms on the linear model ---------------------------------------------------
def test_pbrf_without_proximity_is_leave_one_out_on_a_linear_model(prob):
    # For a model linear in theta, (1/n) sum_i D_i + (wd/2)|theta - theta*|^2 = J(theta) + const
    # (the linear terms add up to grad J(theta*) = 0), so J^PBRF_R = J - (1/n) sum_R r_m + const:
    # the same minimiser as leave-one-out, not only to first order.
    obj, train, test = _objective(prob), (prob.x, prob.y), (prob.x_test, prob.y_test)
    kw = {"removals": range(K), "progress": False}
    pbrf = retrain_ground_truth(prob.model, obj, train, test, config=_pbrf(0.0), **kw)
    loo = retrain_ground_truth(
        prob.model, obj, train, test, config=RetrainConfig(grad_tol=1e-10), **kw
    )
    assert reference.rel_err(pbrf.raw_change, loo.raw_change) < 1e-5


def test_pbrf_optimum_satisfies_its_stationarity_equation(prob):
    lam, n, wd = 0.3, len(prob.y), prob.wd
    removals = [3, [5, 17, 40]]
    xb = _basis(prob.x.shape[1])
    gt = retrain_ground_truth(
        prob.model,
        _objective(prob),
        (prob.x, prob.y),
        xb,
        removals,
        config=_pbrf(lam, grad_tol=1e-12),
        measurement=_logits,
        progress=False,
    )
    star = prob.theta
    torch.testing.assert_close(_theta_from_logits(gt.base_measurement), star)
    xt = reference.augment(prob.x)
    s_star = torch.sigmoid(xt @ star)
    h = reference.hessian(star, prob.x, prob.y, wd)  # = G for a linear model
    for r, removal in enumerate(gt.removals):
        theta = _theta_from_logits(gt.raw_change[:, r] + gt.base_measurement)
        idx = list(removal)
        bregman = xt.T @ (torch.sigmoid(xt @ theta) - s_star) / n
        removed = (reference.per_example_grads(theta, prob.x[idx], prob.y[idx], wd)).sum(0) / n
        residual = bregman + (wd + lam) * (theta - star) - removed
        assert float(residual.norm()) < 1e-10
        # first order: theta_R - theta* ~ (G + lam I)^{-1} sum_R g_m / n, relative error O(|R|/n)
        g = reference.per_example_grads(star, prob.x[idx], prob.y[idx], wd).sum(0) / n
        first = torch.linalg.solve(h + lam * torch.eye(len(star), dtype=h.dtype), g)
        assert reference.rel_err(theta - star, first) < 2 * len(idx) / n


def test_pbrf_agrees_with_damped_gauss_newton_influence_where_loo_does_not(prob):
    lam = 0.5
    obj, train, test = _objective(prob), (prob.x, prob.y), (prob.x_test, prob.y_test)
    kw = {"removals": range(K), "progress": False}
    pbrf = retrain_ground_truth(prob.model, obj, train, test, config=_pbrf(lam), **kw)
    loo = retrain_ground_truth(
        prob.model, obj, train, test, config=RetrainConfig(grad_tol=1e-10), **kw
    )
    calc = InfluenceCalculator(
        prob.model, obj, train, ExactHessian(damping=lam), curvature="gauss_newton", progress=False
    )
    predicted = calc.removal_effect(test)[:, :K]
    assert pearson(predicted, pbrf.raw_change) >= 0.99
    assert reference.rel_err(predicted, pbrf.raw_change) < 0.1
    # the damped influence answers the PBRF question, not the leave-one-out one
    assert reference.rel_err(predicted, loo.raw_change) > 0.5
    undamped = calc.with_damping(0.0).removal_effect(test)[:, :K]
    assert pearson(undamped, loo.raw_change) >= 0.99


# -- the control run ----------------------------------------------------------------------------
class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _ce_generic(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


@pytest.mark.parametrize("loss", ["cross_entropy", "generic"])
def test_control_run_returns_the_trained_parameters(loss):
    torch.manual_seed(0)
    x, y = torch.randn(30, 3, dtype=torch.float64), torch.randint(0, 3, (30,))
    model = _MLP().double().eval()
    obj = Objective(
        "cross_entropy" if loss == "cross_entropy" else supervised_loss(_ce_generic),
        weight_decay=0.01,
    )
    gt = retrain_ground_truth(
        model, obj, (x, y), (x[:4], y[:4]), [0, [1, 2]], config=_pbrf(0.1, 1e-8), progress=False
    )
    assert gt.control_param_change_norm == 0.0
    assert float(gt.control_change.abs().max()) == 0.0
    assert bool((gt.param_change_norm > 0).all())
    torch.testing.assert_close(gt.corrected_change, gt.raw_change)


def test_full_batch_sgd_reaches_the_lbfgs_optimum(prob):
    obj, train, test = _objective(prob), (prob.x, prob.y), (prob.x_test, prob.y_test)
    kw = {"removals": [0, 1, [2, 3]], "progress": False}
    lbfgs = retrain_ground_truth(prob.model, obj, train, test, config=_pbrf(0.5), **kw)
    sgd = RetrainConfig(
        optimizer="sgd", lr=1.5, max_steps=400, grad_tol=1e-10, target="pbrf", proximity=0.5
    )
    got = retrain_ground_truth(prob.model, obj, train, test, config=sgd, parallel_runs=4, **kw)
    assert reference.rel_err(got.raw_change, lbfgs.raw_change) < 1e-6


# -- the store ----------------------------------------------------------------------------------
def test_store_resumes_pbrf_and_refuses_leave_one_out_results(prob, tmp_path):
    obj, train, test = _objective(prob), (prob.x, prob.y), (prob.x_test, prob.y_test)
    kw = {"progress": False, "store": tmp_path / "pbrf"}
    first = retrain_ground_truth(prob.model, obj, train, test, [0, 1], config=_pbrf(0.2), **kw)
    again = retrain_ground_truth(prob.model, obj, train, test, [1, 0, 2], config=_pbrf(0.2), **kw)
    assert (again.num_loaded, again.num_computed) == (3, 1)
    torch.testing.assert_close(again.raw_change[:, :2], first.raw_change.flip(1), rtol=0, atol=0)
    with pytest.raises(StoreMismatchError, match=r"'target' was \{'name': 'pbrf'.*0\.2.*0\.3"):
        retrain_ground_truth(prob.model, obj, train, test, [0], config=_pbrf(0.3), **kw)
    loo_store = tmp_path / "loo"
    retrain_ground_truth(
        prob.model,
        obj,
        train,
        test,
        [0],
        config=RetrainConfig(grad_tol=1e-10),
        progress=False,
        store=loo_store,
    )
    with pytest.raises(StoreMismatchError, match=r"'target' was '<missing>' there"):
        retrain_ground_truth(
            prob.model, obj, train, test, [0], config=_pbrf(0.2), progress=False, store=loo_store
        )


# -- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": "loso"}, "target must be 'loo'.*'pbrf'.*got 'loso'"),
        ({"target": "pbrf", "proximity": -1.0}, "proximity must be a finite number >= 0, got -1"),
        ({"target": "pbrf", "proximity": float("nan")}, "proximity must be a finite.*nan"),
        ({"target": "pbrf", "proximity": "big"}, "proximity must be a finite.*'big'"),
        ({"proximity": 0.1}, "proximity=0.1 is the PBRF's damping.*target='pbrf'"),
        (
            {"target": "pbrf", "optimizer": "sgd", "batch_size": 8},
            "full batches.*batch_size=None, got batch_size=8",
        ),
        ({"target": "pbrf", "init": "scratch"}, "init='warm', got init='scratch'"),
    ],
)
def test_bad_pbrf_settings_are_refused(kwargs, match):
    with pytest.raises(InputError, match=match):
        RetrainConfig(**kwargs)


def _plain_loss(model, batch):
    return F.binary_cross_entropy_with_logits(
        model(batch[0]).reshape(-1), batch[1], reduction="none"
    )


def test_pbrf_needs_a_loss_of_the_outputs(prob):
    obj = Objective(_plain_loss, weight_decay=prob.wd)
    with pytest.raises(InputError, match="needs the loss as a function of the model's outputs"):
        retrain_ground_truth(
            prob.model, obj, (prob.x, prob.y), (prob.x_test, prob.y_test), [0],
            config=_pbrf(0.1), progress=False,
        )  # fmt: skip


@pytest.mark.slow
def test_workers_give_the_same_pbrf_results(prob, tmp_path):
    obj, train, test = _objective(prob), (prob.x, prob.y), (prob.x_test, prob.y_test)
    here = retrain_ground_truth(prob.model, obj, train, test, [0, [1, 2]], config=_pbrf(0.2),
                                progress=False)  # fmt: skip
    there = retrain_ground_truth(prob.model, obj, train, test, [0, [1, 2]], config=_pbrf(0.2),
                                 progress=False, workers=2)  # fmt: skip
    torch.testing.assert_close(there.raw_change, here.raw_change, rtol=1e-9, atol=1e-12)
