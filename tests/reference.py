"""Slow, independent float64 references for L2-regularised binary logistic regression.

Nothing here imports infl: these are the closed forms the library is checked against.
The model is ``nn.Linear(d, 1)`` with the BCE-with-logits loss; its parameter vector in
``named_parameters()`` order is ``theta = [w_1 .. w_d, b]``, so each example's feature vector
is ``x_tilde = [x, 1]``.
"""

from __future__ import annotations

import torch
from torch import nn


def augment(x: torch.Tensor) -> torch.Tensor:
    """``[n, d]`` → ``[n, d+1]`` with a trailing column of ones (the bias feature)."""
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def per_example_loss(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``softplus(z) - y z`` with ``z = x_tilde theta``: ``[n]``."""
    z = augment(x) @ theta
    return torch.nn.functional.softplus(z) - y * z


def objective(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, wd: float) -> torch.Tensor:
    return per_example_loss(theta, x, y).mean() + 0.5 * wd * theta @ theta


def per_example_grads(
    theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, wd: float
) -> torch.Tensor:
    """``g_i = (sigma(z_i) - y_i) x_tilde_i + wd theta``: ``[n, d+1]``."""
    xt = augment(x)
    return (torch.sigmoid(xt @ theta) - y)[:, None] * xt + wd * theta


def hessian(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, wd: float) -> torch.Tensor:
    """``(1/n) sum_i s_i (1 - s_i) x_tilde_i x_tilde_i^T + wd I``."""
    xt = augment(x)
    s = torch.sigmoid(xt @ theta)
    return (xt.T * (s * (1 - s))) @ xt / x.shape[0] + wd * torch.eye(xt.shape[1], dtype=x.dtype)


def newton_fit(
    x: torch.Tensor,
    y: torch.Tensor,
    wd: float,
    theta0: torch.Tensor | None = None,
    tol: float = 1e-13,
    max_iter: int = 100,
) -> torch.Tensor:
    """Exact minimiser of the objective by Newton's method (strongly convex for wd > 0)."""
    theta = torch.zeros(x.shape[1] + 1, dtype=x.dtype) if theta0 is None else theta0.clone()
    for _ in range(max_iter):
        g = per_example_grads(theta, x, y, wd).mean(dim=0)
        if float(g.norm()) < tol:
            break
        theta = theta - torch.linalg.solve(hessian(theta, x, y, wd), g)
    return theta


def load_into(model: nn.Linear, theta: torch.Tensor) -> nn.Linear:
    """Write ``theta = [w, b]`` into an ``nn.Linear(d, 1)``."""
    with torch.no_grad():
        model.weight.copy_(theta[:-1].reshape(1, -1))
        model.bias.copy_(theta[-1:])
    return model


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error ``|got - expected| / |expected|``."""
    return float((got - expected).norm() / expected.norm())


def loop_ce_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[n, p]`` cross-entropy gradients, one example at a time through plain autograd (no
    infl, no vmap): the reference for per-example gradients of any model."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)
