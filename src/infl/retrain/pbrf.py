"""The proximal Bregman response function (PBRF): what damped Gauss-Newton influence answers.

Bae et al. (2022, "If influence functions are the answer, then what is the question?") showed
that in deep networks influence functions do not approximate leave-one-out retraining but the
minimiser of the *proximal Bregman response function*. With infl's objective
:math:`J(\\theta) = \\frac1n\\sum_i \\ell(z_i;\\theta) + \\frac{\\lambda_{wd}}2\\|\\theta\\|^2`,
trained parameters :math:`\\theta^s` (:math:`\\theta^*` elsewhere in infl), model outputs
:math:`f_i(\\theta) = f(\\theta, x_i)` and a removal :math:`R`, the PBRF retrain minimises

.. math::

    J^{PBRF}_R(\\theta) = \\frac1n\\sum_{i=1}^n D_\\ell\\big(f_i(\\theta), f_i(\\theta^s)\\big)
    + \\frac{\\lambda_{wd}}2\\|\\theta-\\theta^s\\|^2
    - \\frac1n\\sum_{m\\in R}\\Big(\\ell(z_m;\\theta) + \\frac{\\lambda_{wd}}2\\|\\theta\\|^2\\Big)
    + \\frac\\lambda2\\|\\theta-\\theta^s\\|^2,

warm-started at :math:`\\theta^s`, where :math:`D_\\ell(f, f') = \\ell(f) - \\ell(f') -
\\nabla_f\\ell(f')^T(f - f')` is the Bregman divergence of the output-space loss (for each
example, at its own target) and :math:`\\lambda` = ``RetrainConfig.proximity``.

**The 1/n convention.** The Bregman sum runs over *all* ``n`` training examples (the removed
ones included) and is divided by ``n``; each removed example is subtracted with weight
:math:`1/n` (Bae et al.'s :math:`\\epsilon = 1/N`). There is no :math:`1/(n-|R|)`
renormalisation: the PBRF is a local response, not a retrain of a smaller data set.

**Weight decay.** The objective's weight-decay term is an exact quadratic, so its own Bregman
divergence around :math:`\\theta^s` is :math:`\\frac{\\lambda_{wd}}2\\|\\theta-\\theta^s\\|^2`,
and a removed example takes its whole term of :math:`J` with it,
:math:`\\ell(z_m) + \\frac{\\lambda_{wd}}2\\|\\theta\\|^2`, whose gradient at :math:`\\theta^s` is
infl's training gradient :math:`g_m = \\nabla\\ell(z_m) + \\lambda_{wd}\\theta^s`. (Bae et al.
train without weight decay and keep only :math:`\\lambda`.) Per-parameter decay
(``Objective(weight_decay={...})``) reads every :math:`\\lambda_{wd}\\|\\cdot\\|^2` as
:math:`\\sum_j\\lambda_j\\|\\cdot_j\\|^2` and :math:`\\lambda_{wd} I` as
:math:`\\Lambda = \\operatorname{diag}(\\lambda_j)`. With this convention the
stationarity condition

.. math::

    \\frac1n\\sum_i J_i^T\\big(\\nabla_f\\ell(f_i(\\theta)) - \\nabla_f\\ell(f_i(\\theta^s))\\big)
    + (\\lambda_{wd}+\\lambda)(\\theta-\\theta^s)
    - \\frac1n\\sum_{m\\in R}\\big(\\nabla\\ell(z_m;\\theta) + \\lambda_{wd}\\theta\\big) = 0

linearised at :math:`\\theta^s` gives
:math:`\\theta_R - \\theta^s \\approx \\frac1n (G + \\lambda I)^{-1}\\sum_{m\\in R} g_m` with
:math:`G = \\frac1n\\sum_i J_i^T H_{out,i} J_i + \\lambda_{wd} I` — exactly
``InfluenceCalculator(..., curvature="gauss_newton")`` with ``damping`` :math:`=\\lambda`. For
``R = ∅`` the minimiser is :math:`\\theta^s` itself (every term is :math:`\\ge 0` and zero
there, for losses convex in the outputs), so the control run reports no change.

Nothing here imports the calculator, the model wrapper or the operators: :math:`D_\\ell` is
written in closed form for the built-in losses (the softmax KL for ``cross_entropy``,
:math:`\\|f-f'\\|^2` for infl's ``mse``, the Bernoulli KL for ``bce_with_logits``) and by
autograd on the outputs for a :func:`~infl.objective.supervised_loss` of your own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from infl.data import IndexedData, batch_to
from infl.errors import InputError
from infl.objective import IGNORE_INDEX, Objective, SupervisedLoss

__all__ = ["PBRFObjective", "bregman_divergence"]


def bregman_divergence(
    loss: SupervisedLoss,
    outputs: torch.Tensor,
    reference: torch.Tensor,
    targets: Any,
    *,
    reference_grad: torch.Tensor | None = None,
    reference_loss: torch.Tensor | None = None,
) -> torch.Tensor:
    """:math:`D_\\ell(f, f') = \\ell(f) - \\ell(f') - \\nabla_f\\ell(f')^T(f - f')` per example.

    Parameters
    ----------
    loss
        The output-space loss :math:`\\ell(f, y)`.
    outputs
        :math:`f`, the model's outputs ``[b, ...]`` (differentiable).
    reference
        :math:`f'`, the trained outputs, shaped like ``outputs`` (constants).
    targets
        The examples' targets :math:`y`.
    reference_grad, reference_loss
        For a callable loss only: :math:`\\nabla_f\\ell(f')` ``[b, ...]`` and
        :math:`\\ell(f')` ``[b]`` if already known (computed by autograd otherwise).

    Returns
    -------
    Tensor ``[b]``
        Closed forms for the built-ins: ``cross_entropy`` (integer targets: weight 1, or 0 for
        ``ignore_index``; class probabilities :math:`t`: weight :math:`\\sum_c t_c`) gives
        :math:`w\\,\\mathrm{KL}(\\mathrm{softmax} f' \\,\\|\\, \\mathrm{softmax} f)`; ``mse``
        (:math:`\\sum (f-y)^2`) gives :math:`\\|f-f'\\|^2`; ``bce_with_logits`` gives the
        Bernoulli :math:`\\sum \\mathrm{KL}(\\sigma(f')\\,\\|\\,\\sigma(f))`. All are
        :math:`\\ge 0` and vanish with their gradient at :math:`f = f'`.
    """
    b = outputs.shape[0]
    name = loss.name
    if name == "cross_entropy":
        log_ref = torch.log_softmax(reference, dim=1)
        kl = (log_ref.exp() * (log_ref - torch.log_softmax(outputs, dim=1))).sum(dim=1)
        if targets.is_floating_point():
            weight = targets.reshape(outputs.shape).to(outputs.dtype).sum(dim=1)
        else:
            weight = (targets.reshape(kl.shape) != IGNORE_INDEX).to(outputs.dtype)
        return (weight * kl).reshape(b, -1).sum(dim=1)
    if name == "mse":
        return ((outputs - reference) ** 2).reshape(b, -1).sum(dim=1)
    if name == "bce_with_logits":
        out, ref = outputs.reshape(b, -1), reference.reshape(b, -1)
        p = torch.sigmoid(ref)
        log_p, log_q = F.logsigmoid(ref), F.logsigmoid(out)
        log_1p, log_1q = F.logsigmoid(-ref), F.logsigmoid(-out)
        return (p * (log_p - log_q) + (1 - p) * (log_1p - log_1q)).sum(dim=1)
    if reference_grad is None or reference_loss is None:
        reference_grad, reference_loss = output_grad(loss, reference, targets)
    linear = (reference_grad * (outputs - reference)).reshape(b, -1).sum(dim=1)
    return loss.loss_of_outputs(outputs, targets) - reference_loss - linear


def output_grad(
    loss: SupervisedLoss, outputs: torch.Tensor, targets: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """:math:`\\nabla_f\\ell(f, y)` (shaped like ``outputs``) and :math:`\\ell(f, y)` ``[b]``."""
    with torch.enable_grad():
        out = outputs.detach().requires_grad_(True)
        values = loss.loss_of_outputs(out, targets)
        (grad,) = torch.autograd.grad(values.sum(), out)
    return grad.detach(), values.detach()


def _supervised(objective: Objective) -> SupervisedLoss:
    loss = objective.per_example_loss
    if not isinstance(loss, SupervisedLoss):
        raise InputError(
            "target='pbrf' needs the loss as a function of the model's outputs (its Bregman "
            f"divergence lives in output space), but the objective's loss is {loss!r}, a plain "
            "(model, batch) callable. Use a built-in loss name ('cross_entropy', 'mse', "
            "'bce_with_logits') or infl.supervised_loss(fn) with fn(outputs, targets) -> "
            "Tensor[b]"
        )
    return loss


class PBRFObjective:
    """:math:`J^{PBRF}_R` and its gradient for one model around :math:`\\theta^s` (picklable).

    Parameters
    ----------
    model
        The trained module at :math:`\\theta^s` (its outputs are evaluated once, here).
    objective
        The training objective: its loss must be a
        :class:`~infl.objective.SupervisedLoss`.
    train
        The ``n`` training examples.
    proximity
        :math:`\\lambda \\ge 0`.
    chunk_size
        Examples per forward pass.
    device, dtype
        Those of the trainable parameters.

    Notes
    -----
    Memory: the trained outputs ``[n, ...]`` (and, for a callable loss, their output
    gradients and losses). Cost of one evaluation of :math:`J^{PBRF}_R` and its gradient: one
    forward and backward pass over all ``n`` examples, plus one over the ``|R|`` removed.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        train: IndexedData,
        proximity: float,
        chunk_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.loss = _supervised(objective)
        self.objective = objective
        self.train = train
        self.proximity = float(proximity)
        self.chunk_size = int(chunk_size)
        self.device = device
        self.dtype = dtype
        self.theta_star = [p.detach().clone() for p in _trainable(model)]
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.decays = objective.decay_values(names)  # lambda_wd of each trainable parameter
        self.reference: list[torch.Tensor] = []
        self.reference_grad: list[torch.Tensor | None] = []
        self.reference_loss: list[torch.Tensor | None] = []
        with torch.no_grad():
            for _, batch in train.chunks(self.chunk_size):
                inputs, targets = self.loss.split(batch_to(batch, device, dtype))
                out = model(inputs).detach()
                self.reference.append(out)
                if self.loss.name is None:
                    grad, value = output_grad(self.loss, out, targets)
                    self.reference_grad.append(grad)
                    self.reference_loss.append(value)
                else:
                    self.reference_grad.append(None)
                    self.reference_loss.append(None)

    def backward(
        self, net: nn.Module, params: list[torch.Tensor], removal: tuple[int, ...]
    ) -> torch.Tensor:
        """Accumulate :math:`\\nabla J^{PBRF}_R` into ``.grad`` (zeroed first); return the value.

        ``params`` are ``net``'s trainable parameters, in ``named_parameters()`` order.
        """
        for p in params:
            p.grad = None
        n = len(self.train)
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for k, (_, batch) in enumerate(self.train.chunks(self.chunk_size)):
            inputs, targets = self.loss.split(batch_to(batch, self.device, self.dtype))
            div = bregman_divergence(
                self.loss,
                net(inputs),
                self.reference[k],
                targets,
                reference_grad=self.reference_grad[k],
                reference_loss=self.reference_loss[k],
            )
            part = div.sum() / n
            part.backward()
            total = total + part.detach()
        if removal:
            removed = batch_to(self.train.select(list(removal)), self.device, self.dtype)
            part = -self.loss(net, removed).sum() / n
            part.backward()
            total = total + part.detach()
        share = len(removal) / n
        terms = []
        for p, start, wd in zip(params, self.theta_star, self.decays, strict=True):
            diff = p - start
            if wd + self.proximity > 0:
                terms.append(0.5 * (wd + self.proximity) * (diff * diff).sum())
            if wd > 0 and share > 0:
                terms.append(-0.5 * wd * share * (p * p).sum())
        if terms:
            reg = torch.stack(terms).sum()
            reg.backward()
            total = total + reg.detach()
        return total


def _trainable(net: nn.Module) -> list[torch.Tensor]:
    return [p for _, p in net.named_parameters() if p.requires_grad]
