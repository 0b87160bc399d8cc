"""What every library in the peer comparison gets: one trained model, its data, one setting.

Every adapter answers the same question,

    scores[j, i] = -grad l(z_test_j)^T (H + damping * I)^{-1} grad l(z_i)     [m, n]

with ``l`` the per-example cross-entropy, ``H`` the Hessian of the *mean* training loss
``(1/n) sum_i l(z_i)`` at the trained parameters (no weight-decay term: every peer sees the same
plain loss, and the damping is the only regulariser), in infl's sign convention (Koh & Liang's
I_up,loss: negative = helpful). Each adapter states how it converts its library's sign.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Problem:
    """One trained model and its data, shared by every library.

    Attributes
    ----------
    name
        ``"iris"``, ``"cnn"`` or ``"mlp"``.
    model
        The trained model, in eval mode. Adapters must not modify it: use :meth:`fresh_model`.
    x_train, y_train
        Training inputs ``[n, ...]`` and integer labels ``[n]``.
    x_test, y_test
        Test inputs ``[m, ...]`` and labels ``[m]``.
    """

    name: str
    model: nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def m(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def p(self) -> int:
        return sum(q.numel() for q in self.model.parameters() if q.requires_grad)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def test_grad_norms(self) -> torch.Tensor:
        """``[m]``: the norm of each test point's cross-entropy gradient (CG's right-hand sides).

        Peers whose CG tolerance is absolute get ``rtol * min_j ||b_j||`` from it.
        """
        model = self.fresh_model()
        params = [q for q in model.parameters() if q.requires_grad]
        norms = []
        for j in range(self.m):
            x, y = self.x_test[j : j + 1], self.y_test[j : j + 1]
            loss = nn.functional.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, params)
            norms.append(torch.sqrt(sum((g * g).sum() for g in grads)))
        return torch.stack(norms).detach()

    def fresh_model(self) -> nn.Module:
        """A deep copy of the trained model (eval mode, gradients enabled)."""
        model = copy.deepcopy(self.model)
        model.eval()
        return model


@dataclass(frozen=True)
class Setting:
    """One solver configuration, the same for every library.

    Attributes
    ----------
    method
        ``"exact"``, ``"cg"``, ``"lissa"``, ``"arnoldi"``, ``"kfac"`` or ``"ekfac"``.
    damping
        lambda in ``H + lambda I`` (every library's own name for it is set to this value).
    max_iter
        CG iterations: at most this many.
    rtol
        CG stops system ``j`` at a residual ``||b_j - A x_j|| <= rtol ||b_j||`` (1e-10, the
        default, lets every iteration run unless converged); each adapter converts it to its
        library's convention.
    depth
        LiSSA recursion depth T.
    batch_size
        LiSSA minibatch size, or ``None`` for the full training set per step.
    scale
        LiSSA scale sigma (the recursion is on ``(H + lambda I) / sigma``).
    rank
        Arnoldi: eigenpairs kept.
    krylov
        Arnoldi: Krylov (Lanczos) steps, i.e. HVPs of the fit.
    """

    method: str
    damping: float
    max_iter: int = 100
    rtol: float = 1e-10
    depth: int = 5000
    batch_size: int | None = None
    scale: float = 1.0
    rank: int = 10
    krylov: int = 30

    def label(self) -> str:
        if self.method == "cg":
            return f"CG {self.max_iter}" + ("" if self.rtol == 1e-10 else f", rtol {self.rtol:g}")
        if self.method == "lissa":
            batch = "full batch" if self.batch_size is None else f"batch {self.batch_size}"
            return f"LiSSA {batch}, depth {self.depth}"
        if self.method == "arnoldi":
            return f"Arnoldi rank {self.rank} (Krylov {self.krylov})"
        return {"exact": "exact", "kfac": "K-FAC", "ekfac": "EK-FAC"}[self.method]


def mean_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss every library is given: mean cross-entropy over a batch."""
    return nn.functional.cross_entropy(outputs, targets)


class PeerUnsupported(Exception):
    """The peer has no implementation of this method for this model (the row says why)."""
