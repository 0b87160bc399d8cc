"""The labels of the true Fisher for K-FAC/EK-FAC: sampled from the model, or the exact expectation.

``fisher="true"`` approximates :math:`E_{y\\sim p(y|f)}[\\nabla\\ell\\,\\nabla\\ell^T]`.
:func:`label_draws` gives one chunk's draws one at a time: ``mc_samples`` labels sampled from
the predictive distribution (:func:`sample_labels`), or, for ``mc_samples="exact"``, the
columns of a square root of the loss's output Hessian (:func:`fisher_root`), each
back-propagated through :func:`linearised_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from infl.data import Batch
from infl.losses import _LOSSES, PerExampleFn, SupervisedLoss, _split_supervised
from infl.model import ModelWrapper


def builtin_loss_name(wrapper: ModelWrapper) -> str | None:
    """The name of the objective's built-in loss (``None`` for a custom callable)."""
    loss = wrapper.objective.loss
    name = getattr(loss, "name", None) if isinstance(loss, SupervisedLoss) else None
    return name if isinstance(name, str) and name in _LOSSES else None


def sample_labels(name: str, outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels drawn from the predictive distribution that the loss ``name`` is the NLL of."""
    out = outputs.detach()
    if name == "cross_entropy":
        probs = torch.softmax(out, dim=1)
        flat = probs.movedim(1, -1).reshape(-1, probs.shape[1])
        draws = torch.multinomial(flat, 1, generator=generator).reshape(-1)
        return draws.reshape(probs.movedim(1, -1).shape[:-1])
    if name == "bce_with_logits":
        u = torch.rand(out.shape, generator=generator, dtype=out.dtype, device=out.device)
        return (u < torch.sigmoid(out)).to(out.dtype)
    # mse: sum (f - y)^2 is the NLL of N(f, I/2), so E[grad grad^T] = 2 I = its Hessian in f
    noise = torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device)
    return out + noise * (0.5**0.5)


def fisher_root(name: str, outputs: torch.Tensor) -> tuple[int, Callable[[int], torch.Tensor]]:
    """``(D, column)``: ``column(j)`` (shaped like ``outputs``), ``j < D``, with
    :math:`\\sum_j r_j r_j^T = H_f`.

    :math:`H_f = E_{y\\sim p(y|f)}[\\nabla_f\\ell\\,\\nabla_f\\ell^T]`, per example, is the
    Fisher of the predictive distribution that the loss ``name`` is the NLL of (equal to the
    loss's output Hessian): ``cross_entropy`` ``diag(p) - p p^T`` per location, whose square
    root has the columns :math:`\\sqrt{p_k}(p - e_k)` (the gradient for label :math:`k`
    weighted by :math:`\\sqrt{p_k}`: :math:`\\sum_k p_k (p - e_k)(p - e_k)^T = \\mathrm{diag}(p) -
    p p^T` as :math:`\\sum_k p_k = 1`); ``bce_with_logits``
    :math:`\\mathrm{diag}(\\sigma(1-\\sigma))`; ``mse`` :math:`2I`. Column ``j`` of a
    multi-location output is non-zero at one location only, so locations stay independent, as
    the sampled labels are.

    ``D`` is the number of outputs of one example (``C`` for classification into ``C``
    classes); each column costs one backward pass and is made only when asked for (memory: one
    column at a time).
    """
    out = outputs.detach()
    b = out.shape[0]
    if name == "cross_entropy":
        probs = torch.softmax(out, dim=1).reshape(b, out.shape[1], -1)  # [b, C, L]
        locations = probs.shape[2]

        def ce_column(j: int) -> torch.Tensor:
            k, loc = divmod(j, locations)
            p = probs[:, :, loc]  # [b, C]
            r = torch.zeros_like(probs)
            r[:, :, loc] = p * p[:, k : k + 1].sqrt()
            r[:, k, loc] -= p[:, k].sqrt()
            return r.reshape(out.shape)

        return probs.shape[1] * locations, ce_column
    if name == "bce_with_logits":
        s = torch.sigmoid(out).reshape(b, -1)
        scale = (s * (1 - s)).sqrt()
    else:  # mse: the NLL of N(f, I/2), so H_f = 2 I
        scale = torch.full_like(out.reshape(b, -1), 2.0**0.5)

    def unit_column(j: int) -> torch.Tensor:
        r = torch.zeros_like(scale)
        r[:, j] = scale[:, j]
        return r.reshape(out.shape)

    return scale.shape[1], unit_column


def linearised_loss(model: Callable[..., Any], batch: Batch) -> torch.Tensor:
    """Per example :math:`\\langle f(x), r\\rangle` (``r`` fixed): its gradient is :math:`J^T r`."""
    inputs, r = _split_supervised(batch)
    out = model(inputs)
    return (out * r).reshape(out.shape[0], -1).sum(dim=1)


Draw = tuple[torch.Tensor, Batch, PerExampleFn]
"""One label draw of a chunk: its summed loss, the batch that loss saw, its per-example loss."""


def label_draws(
    loss_name: str,
    mc_samples: int | str,
    inputs: Any,
    outputs: torch.Tensor,
    generator: torch.Generator,
) -> tuple[int, Callable[[int], Draw]]:
    """``(number of draws, draw r -> Draw)`` for ``fisher="true"``, made one at a time."""
    if mc_samples == "exact":
        num_columns, column = fisher_root(loss_name, outputs)

        def exact_draw(r: int) -> Draw:
            col = column(r)
            return (outputs * col).sum(), (inputs, col), linearised_loss

        return num_columns, exact_draw
    sampled = SupervisedLoss(loss_name)  # type: ignore[arg-type]

    def sampled_draw(r: int) -> Draw:
        labels = sample_labels(loss_name, outputs, generator)
        return _LOSSES[loss_name](outputs, labels).sum(), (inputs, labels), sampled

    return int(mc_samples), sampled_draw
