"""Small float64 problems with known answers, shared by the tests (import from here)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import reference
from infl.operators import DenseOperator


@dataclass
class LogisticProblem:
    """A trained L2-regularised logistic regression (float64) and its data."""

    model: nn.Linear
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    wd: float
    theta: torch.Tensor


def make_logistic_problem(n: int = 60, d: int = 4, wd: float = 0.05, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=gen, dtype=torch.float64)
    x = torch.randn(n + 10, d, generator=gen, dtype=torch.float64)
    p = torch.sigmoid(x @ w_true)
    y = (torch.rand(n + 10, generator=gen, dtype=torch.float64) < p).to(torch.float64)
    theta = reference.newton_fit(x[:n], y[:n], wd)
    model = reference.load_into(nn.Linear(d, 1).double(), theta)
    return LogisticProblem(model, x[:n], y[:n], x[n:], y[n:], wd, theta)


def planted(eigenvalues: torch.Tensor, seed: int = 0) -> DenseOperator:
    """A dense symmetric operator ``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q``
    (float64; cast ``.matrix`` for another dtype)."""
    p = eigenvalues.numel()
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    return DenseOperator((q * eigenvalues.double()) @ q.T)


class WithLayerNorm(nn.Module):
    """``LayerNorm(Linear(4, 3))``: a layer K-FAC has no Kronecker factors for."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.ln = nn.LayerNorm(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.lin(x))


def log_spectrum_spd(p: int, condition: float, dtype: torch.dtype, seed: int = 0) -> DenseOperator:
    """:func:`planted` with eigenvalues log-spaced from 1 down to ``1/condition``, in ``dtype``."""
    mu = torch.logspace(0, -math.log10(condition), p, dtype=torch.float64)
    return DenseOperator(planted(mu, seed).matrix.to(dtype))


def random_rhs(k: int, p: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """``[k, p]`` standard normal right-hand sides (drawn in float64, then cast)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, p, generator=gen, dtype=torch.float64).to(dtype)


def true_relative_residual(op: DenseOperator, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||b_j - A x_j|| / ||b_j||`` per row, computed in float64."""
    a, x, b = op.matrix.double(), x.double(), b.double()
    return (b - x @ a).norm(dim=1) / b.norm(dim=1)


def residual_rounding(op: DenseOperator, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How far a relative residual formed in ``x``'s dtype may be from the float64 one:
    ``10 eps ||A||_2 ||x_j|| / ||b_j||`` per row."""
    eps = torch.finfo(x.dtype).eps
    a, x64, b64 = op.matrix.double(), x.double(), b.double()
    return 10 * eps * torch.linalg.matrix_norm(a, 2) * x64.norm(dim=1) / b64.norm(dim=1)


class BatchCentred(nn.Module):
    """``nn.Linear`` layers only, but the hidden units are centred over the batch (a model
    that mixes the examples of a batch)."""

    def __init__(self, in_features: int = 3) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.a, self.b = nn.Linear(in_features, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(dim=0, keepdim=True) + 0.5 * h)


def count_factor_reads(monkeypatch) -> list[int]:
    """Count the chunks whose training-gradient factors are computed from the data (one
    forward and backward pass each, ``train_gradients.loss_factors``): ``counter[0]``."""
    from infl import train_gradients

    calls = [0]
    factors = train_gradients.loss_factors

    def counted(*args):
        calls[0] += 1
        return factors(*args)

    monkeypatch.setattr(train_gradients, "loss_factors", counted)
    return calls
