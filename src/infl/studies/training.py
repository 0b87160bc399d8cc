"""Training the fragility study's models (full-batch and minibatch SGD) and evaluating them.

:func:`train_full_batch` (the Iris MLPs; ``torch.optim.SGD``'s update written out, bit for bit)
and :func:`train_minibatch` (the CNNs, then a full-batch settle) return the final
:math:`\\|\\nabla J\\|` of the mean cross-entropy plus :math:`\\frac{\\lambda}2\\|\\theta\\|^2`;
:func:`_accuracy` and :func:`_test_losses` evaluate a trained model. Moved out of
:mod:`infl.studies.fragility`, which re-exports them; :mod:`infl.studies.over_time` uses them too.
"""

from __future__ import annotations

import torch
from torch import nn

from infl.studies.mlp_gradient import MlpCrossEntropyGradient


def train_full_batch(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    weight_decay: float,
    steps: int,
    lr: float,
    momentum: float,
) -> float:
    """Full-batch SGD on mean cross-entropy + (wd/2)‖θ‖²; returns the final ‖∇J‖.

    The update is ``torch.optim.SGD(lr, momentum, weight_decay)``'s, written out (the same
    operations in the same order, so the same parameters bit for bit, see
    ``tests/studies/test_fragility.py``): :math:`d = \\nabla\\ell + \\lambda\\theta`,
    :math:`b \\leftarrow \\mu b + d` (:math:`b = d` on the first step),
    :math:`\\theta \\leftarrow \\theta - \\eta b`. Written out, a step of the Iris MLPs costs
    about half what the optimizer's per-step bookkeeping makes it cost; the study takes tens of
    thousands of them per cell. The update runs as ``torch._foreach_*`` calls over all
    parameters (the same per-tensor kernels, about 10% less per step than a Python loop). For
    a Linear/ReLU/Tanh ``nn.Sequential`` the gradient comes from
    :class:`~infl.studies.mlp_gradient.MlpCrossEntropyGradient` (autograd's kernels without
    its engine, about 2.3x less per gradient) once it has matched autograd bit for bit on the
    first step.
    """
    x, y = data
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    buffers: list[torch.Tensor] | None = None
    fast: MlpCrossEntropyGradient | None = MlpCrossEntropyGradient(model, params)
    for i in range(steps):
        if fast is not None and i > 0:
            grads = fast(x, y)
        else:
            grads = list(torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params))
            if fast is not None and not fast.check(x, y, grads):
                fast = None  # keep autograd
        with torch.no_grad():
            # the same per-tensor kernels as a loop over the parameters, in fewer calls
            step = (
                torch._foreach_add(grads, params, alpha=weight_decay)
                if weight_decay != 0
                else list(grads)
            )
            if momentum == 0:
                direction = step
            elif buffers is None:
                buffers = direction = [d.detach().clone() for d in step]
            else:
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, step, alpha=1)
                direction = buffers
            torch._foreach_add_(params, direction, alpha=-lr)
    return _objective_grad_norm(model, data, weight_decay)


def train_minibatch(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    weight_decay: float,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> float:
    """Minibatch SGD (momentum 0.9), then 200 full-batch steps to settle; returns ‖∇J‖."""
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return train_full_batch(model, data, weight_decay, 200, lr / 2, 0.9)


def _objective_grad_norm(
    model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], weight_decay: float
) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = data
    loss = nn.functional.cross_entropy(model(x), y)
    loss = loss + 0.5 * weight_decay * sum((p**2).sum() for p in params)
    grads = torch.autograd.grad(loss, params)
    return float(torch.cat([g.reshape(-1) for g in grads]).norm())


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def _test_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y, reduction="none")
