"""Shared pieces of the ground-truth tests: a strongly convex problem and a Newton refit.

The Newton refit is the slow, independent reference: it uses closed-form gradients and
Hessians of L2-regularised logistic regression in float64, not infl or torch.optim.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def make_problem(n: int = 60, m: int = 6, d: int = 3, seed: int = 0):
    """Separable-ish binary data; returns (X, y, Xt, yt) as float64 tensors."""
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=d)
    X = rng.normal(size=(n + m, d))
    p = 1 / (1 + np.exp(-(X @ w_true + 0.3)))
    y = (rng.uniform(size=n + m) < p).astype(np.float64)
    Xt, yt = torch.tensor(X[n:]), torch.tensor(y[n:])
    return torch.tensor(X[:n]), torch.tensor(y[:n]), Xt, yt


def _design(X: np.ndarray) -> np.ndarray:
    return np.hstack([X, np.ones((X.shape[0], 1))])


def newton_fit(
    X: np.ndarray, y: np.ndarray, wd: float, theta0: np.ndarray | None = None, tol: float = 1e-13
) -> np.ndarray:
    """Minimise mean BCE-with-logits + wd/2 ||theta||^2 over theta = (w, b) by Newton."""
    A = _design(np.asarray(X))
    y = np.asarray(y)
    theta = np.zeros(A.shape[1]) if theta0 is None else np.array(theta0, dtype=np.float64)
    n = A.shape[0]
    for _ in range(100):
        s = 1 / (1 + np.exp(-(A @ theta)))
        g = A.T @ (s - y) / n + wd * theta
        if np.linalg.norm(g) < tol:
            break
        H = (A * (s * (1 - s))[:, None]).T @ A / n + wd * np.eye(A.shape[1])
        theta = theta - np.linalg.solve(H, g)
    return theta


def bce(theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example BCE-with-logits loss at theta = (w, b)."""
    z = _design(np.asarray(X)) @ theta
    return np.logaddexp(0, z) - np.asarray(y) * z


def model_from_theta(theta: np.ndarray) -> nn.Linear:
    model = nn.Linear(len(theta) - 1, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(theta[:-1]).reshape(1, -1))
        model.bias.copy_(torch.tensor(theta[-1:]))
    return model.eval()


def theta_of(model: nn.Linear) -> np.ndarray:
    return np.concatenate(
        [model.weight.detach().reshape(-1).numpy(), model.bias.detach().reshape(-1).numpy()]
    )


def newton_loo_effects(
    X: np.ndarray, y: np.ndarray, Xt: np.ndarray, yt: np.ndarray, wd: float, removals
) -> tuple[np.ndarray, np.ndarray]:
    """Exact refit per removal: (change of test losses [m, k], param-change norms [k])."""
    X, y = np.asarray(X), np.asarray(y)
    full = newton_fit(X, y, wd)
    base = bce(full, Xt, yt)
    effects, norms = [], []
    for r in removals:
        keep = np.setdiff1d(np.arange(len(y)), np.atleast_1d(r))
        theta = newton_fit(X[keep], y[keep], wd, theta0=full)
        effects.append(bce(theta, Xt, yt) - base)
        norms.append(np.linalg.norm(theta - full))
    return np.stack(effects, axis=1), np.array(norms)


def slow_bce(model, batch) -> torch.Tensor:
    """BCE-with-logits per example; sleeps when INFL_GT_SLOW is set (for the kill test).

    A module-level function, so it pickles and describes itself identically in the test
    process and in the subprocess that imports this module.
    """
    delay = float(os.environ.get("INFL_GT_SLOW", "0"))
    if delay:
        time.sleep(delay)
    X, y = batch
    out = model(X).reshape(-1)
    return F.binary_cross_entropy_with_logits(out, y.to(out.dtype), reduction="none")


RESUME_SETTINGS = {
    "loss": slow_bce,
    "wd": 0.05,
    "protocol": {"optimizer": "sgd", "lr": 0.5, "max_steps": 40, "grad_tol": None},
}


def resume_problem():
    """The problem the kill-and-resume test retrains: (model, train, test, removals)."""
    X, y, Xt, yt = make_problem(n=30, m=4)
    theta = newton_fit(X.numpy(), y.numpy(), 0.05)
    return model_from_theta(theta), (X, y), (Xt, yt), list(range(24))
