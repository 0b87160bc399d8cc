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
    thousands of them per cell. During training the parameters are views of one flat buffer,
    and the update is one call per operation on it (:class:`_HeavyBall`, after checking on the
    first step that this gives the per-tensor bits; else ``torch._foreach_*`` calls over the
    parameters); afterwards each parameter has its own storage again. For
    a Linear/ReLU/Tanh ``nn.Sequential`` the gradient comes from
    :class:`~infl.studies.mlp_gradient.MlpCrossEntropyGradient` (autograd's kernels without
    its engine, about 2.3x less per gradient) once it has matched autograd bit for bit on the
    first step.
    """
    x, y = data
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    flat = _share_one_buffer(params)
    fast: MlpCrossEntropyGradient | None = MlpCrossEntropyGradient(model, params)
    sgd = _HeavyBall(params, flat, weight_decay, lr, momentum)
    try:
        with torch.no_grad():  # once, not per step; autograd's steps enable it for themselves
            for i in range(steps):
                if fast is not None and i > 0:
                    grads = fast.without_grad_mode(x, y)
                else:
                    with torch.enable_grad():
                        loss = nn.functional.cross_entropy(model(x), y)
                        grads = list(torch.autograd.grad(loss, params))
                    if fast is not None and not fast.check(x, y, grads):
                        fast = None  # keep autograd
                    if i == 0:
                        sgd.use_flat = sgd.flat_matches(grads)
                sgd.step(grads)
    finally:
        if flat is not None:
            for param in params:  # each its own storage again, as before training
                param.data = param.data.clone()
    return _objective_grad_norm(model, data, weight_decay)


def _share_one_buffer(params: list[torch.Tensor]) -> torch.Tensor | None:
    """Make ``params`` views of one flat buffer (their values unchanged) and return it, so
    that an update is one call on it; ``None`` (nothing changed) for mixed dtypes/devices."""
    if not params or len({(p.dtype, p.device) for p in params}) != 1:
        return None
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for param in params:
        param.data = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()
    return flat


class _HeavyBall:
    """``torch.optim.SGD``'s update, written out: :math:`d = g + \\lambda\\theta`,
    :math:`b \\leftarrow \\mu b + d` (:math:`b = d` on the first step), :math:`\\theta
    \\leftarrow \\theta - \\eta b`.

    Per parameter with ``torch._foreach_*`` (the optimizer's own per-tensor kernels), or, with
    :attr:`use_flat`, as single calls on the flat buffer the parameters are views of: the same
    elementwise kernels over one tensor instead of one call per parameter, about a quarter of
    a step of the deep Iris MLPs. Elementwise results do not depend on where an element sits in
    the tensor when the kernels round the same way in their vectorised and scalar loops (they
    do for ``mul`` and an ``add`` without ``alpha``; ``add`` with ``alpha`` is a fused
    multiply-add in both loops of the x86 builds, but need not be in every build), so
    :meth:`flat_matches` compares both forms of a step before the flat one is used.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        flat: torch.Tensor | None,
        weight_decay: float,
        lr: float,
        momentum: float,
    ) -> None:
        self.params = params
        self.flat = flat
        self.weight_decay = weight_decay
        self.lr = lr
        self.momentum = momentum
        self.use_flat = False
        self.buffers: list[torch.Tensor] | None = None
        self.buffer: torch.Tensor | None = None

    def flat_matches(self, grads: list[torch.Tensor]) -> bool:
        """Whether the flat form of a first step on ``grads`` gives the per-tensor bits."""
        if self.flat is None:
            return False
        grads_each = [g.clone() for g in grads]
        params_each = [p.clone() for p in self.params]
        if self.weight_decay != 0:
            torch._foreach_add_(grads_each, params_each, alpha=self.weight_decay)
        torch._foreach_add_(params_each, grads_each, alpha=-self.lr)
        grad = torch.cat([g.reshape(-1) for g in grads])
        theta = self.flat.clone()
        if self.weight_decay != 0:
            grad.add_(theta, alpha=self.weight_decay)
        theta.add_(grad, alpha=-self.lr)
        return torch.equal(theta, torch.cat([p.reshape(-1) for p in params_each]))

    def step(self, grads: list[torch.Tensor]) -> None:
        """One update from this step's gradients (which it overwrites)."""
        if self.use_flat:
            assert self.flat is not None
            grad = torch.cat([g.reshape(-1) for g in grads])
            if self.weight_decay != 0:
                grad.add_(self.flat, alpha=self.weight_decay)
            direction = grad
            if self.momentum != 0:
                if self.buffer is None:
                    self.buffer = grad
                else:
                    direction = self.buffer.mul_(self.momentum).add_(grad)
            self.flat.add_(direction, alpha=-self.lr)
            return
        # the same per-tensor kernels as a loop over the parameters, in fewer calls
        if self.weight_decay != 0:
            torch._foreach_add_(grads, self.params, alpha=self.weight_decay)
        directions = grads
        if self.momentum != 0:
            if self.buffers is None:
                self.buffers = grads
            else:
                torch._foreach_mul_(self.buffers, self.momentum)
                torch._foreach_add_(self.buffers, grads, alpha=1)
                directions = self.buffers
        torch._foreach_add_(self.params, directions, alpha=-self.lr)


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
