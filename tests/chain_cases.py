"""Small ``nn.Sequential`` MLPs, their data, and their Hessian by
``torch.autograd.functional.hessian``: the float64 reference that the closed-form Hessian
(``test_sequential_hessian.py``) and the chain's hand-run products (``test_chain_hvp.py``) are
checked against. Nothing here imports infl.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

WD = 0.05
N = 30


def mlp(*modules: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*modules).double().eval()


def targets(loss: str, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    if loss == "cross_entropy":
        return torch.randint(0, k, (n,), generator=gen)
    if loss == "probabilities":
        return torch.softmax(torch.randn(n, k, generator=gen, dtype=torch.float64), dim=1)
    if loss == "mse":
        return torch.randn(n, k, generator=gen, dtype=torch.float64)
    return torch.randint(0, 2, (n, k), generator=gen).double()


def data(loss: str, width: int = 4, k: int = 3, n: int = N):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, width, generator=gen, dtype=torch.float64)
    return x, targets(loss, n, k, gen)


def objective_loss(loss: str) -> str:
    return "cross_entropy" if loss == "probabilities" else loss


def autograd_hessian(model: nn.Module, x, y, loss: str) -> torch.Tensor:
    """The Hessian of the mean loss + WD/2 |theta|^2 over the trainable parameters."""
    named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    names, shapes = [n for n, _ in named], [q.shape for _, q in named]
    theta = torch.cat([q.detach().reshape(-1) for _, q in named])

    def objective(t: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(t, [s.numel() for s in shapes])
        params = {n: q.view(s) for n, q, s in zip(names, pieces, shapes, strict=True)}
        out = functional_call(model, params, (x,))
        if loss in ("cross_entropy", "probabilities"):
            kept = y != -100 if loss == "cross_entropy" else torch.ones(len(y), dtype=torch.bool)
            terms = F.cross_entropy(out, y.clamp_min(0) if loss == "cross_entropy" else y,
                                    reduction="none") * kept  # fmt: skip
        elif loss == "mse":
            terms = ((out - y) ** 2).sum(dim=1)
        else:
            terms = F.binary_cross_entropy_with_logits(out, y, reduction="none").sum(dim=1)
        return terms.mean() + 0.5 * WD * (t * t).sum()

    return torch.autograd.functional.hessian(objective, theta)


CASES = {
    "relu-ce": ((nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), "cross_entropy"),
    "tanh-probabilities": ((nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), "probabilities"),
    "sigmoid-gelu-mse": (
        (nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 3)),
        "mse",
    ),
    "silu-bce": ((nn.Linear(4, 6), nn.SiLU(), nn.Linear(6, 3)), "bce_with_logits"),
    "softplus-elu-leaky-ce": (
        (
            nn.Linear(4, 5),
            nn.Softplus(),
            nn.Linear(5, 5),
            nn.ELU(),
            nn.LeakyReLU(0.1),
            nn.Linear(5, 3),
        ),
        "cross_entropy",
    ),
    "inplace-relu-no-bias": (
        (nn.Linear(4, 6, bias=False), nn.ReLU(inplace=True), nn.Linear(6, 3)),
        "cross_entropy",
    ),
    "adjacent-linear": (
        (nn.Linear(4, 5), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)),
        "cross_entropy",
    ),
    "nested": ((nn.Sequential(nn.Linear(4, 6), nn.Tanh()), nn.Linear(6, 3)), "cross_entropy"),
}
