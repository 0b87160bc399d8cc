"""Products and moments of a batch's training gradients, without forming them when possible.

Scoring needs only :math:`V g_i` for a few vectors ``V`` (inverse-HVPs, a low-rank basis), and
the minimum check only :math:`\\sum_i g_i` and :math:`\\sum_i \\|g_i\\|^2`. For a model of plain
``nn.Linear`` layers both come from each layer's inputs and output gradients
(:class:`~infl.linear_grads.LinearPerExampleGradients`), with the weight-decay term
:math:`c = \\Lambda\\theta` of :math:`g_i = \\nabla\\ell(z_i) + c` added in closed form. The
products of a convolutional model's gradients come from them formed a few examples at a time
(:meth:`LayerPerExampleGradients.products
<infl.layer_grads.LayerPerExampleGradients.products>`). Any other model, a batch before the
shortcut has been checked against autograd, too many vectors for the ``nn.Linear`` shortcut to
pay, and a batch whose result is not finite (so that the error names the example) go through
the formed gradients :meth:`ModelWrapper.train_grads
<infl.model.ModelWrapper.train_grads>`. :class:`~infl.model.ModelWrapper`'s methods of the same
names delegate here; this module never imports :mod:`infl.model` at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from infl.data import Batch, batch_size
from infl.finite import all_finite
from infl.linear_grads import Factors
from infl.model_checks import gradient_moments, rowwise_by_construction, shortcut_agrees
from infl.second_order import functional_evaluation
from infl.sequential_chain import chain_factors

if TYPE_CHECKING:
    from infl.model import ModelWrapper

__all__ = [
    "gradients_from_factors",
    "loss_factors",
    "products_from_factors",
    "train_grad_moments",
    "train_grad_products",
]


def checked(wrapper: ModelWrapper) -> bool:
    """Whether the ``nn.Linear`` shortcut applies, and was checked against autograd for the
    loss and agreed or needs no check (:func:`~infl.model_checks.rowwise_by_construction`,
    unless a check refused it); the convolutional one forms the gradients: no products or
    moments."""
    loss = wrapper.objective.per_example_loss
    if not wrapper._linear_grads.applicable:
        return False
    verified = wrapper._linear_verified.get(loss)
    return verified is True or (verified is None and rowwise_by_construction(wrapper, loss))


def _layers_checked(wrapper: ModelWrapper) -> bool:
    """Whether the convolutional shortcut (:class:`~infl.layer_grads.LayerPerExampleGradients`)
    applies and was checked against autograd for the loss and agreed."""
    loss = wrapper.objective.per_example_loss
    shortcut = wrapper._batched_grads
    return (
        shortcut is not wrapper._linear_grads
        and shortcut.applicable
        and wrapper._linear_verified.get(loss) is True
    )


def loss_factors(wrapper: ModelWrapper, batch: Batch) -> Factors | None:
    """Each ``nn.Linear`` layer's inputs and the gradients of the per-example losses at its
    outputs (:meth:`LinearPerExampleGradients.factors
    <infl.linear_grads.LinearPerExampleGradients.factors>`: one forward and one backward pass)
    for a prepared batch, when the shortcut applies and agrees with autograd for the loss;
    ``None`` otherwise. A model that :func:`~infl.sequential_chain.chain_factors` runs by hand
    (a plain ``nn.Sequential`` of ``nn.Linear`` layers and element-wise activations) gets them
    from that pass, with no hooks or autograd graph.

    A shortcut not yet checked for the loss is checked here, on this batch's first and last
    rows, as :meth:`ModelWrapper.per_example_grads
    <infl.model.ModelWrapper.per_example_grads>` checks it (the rows are formed from the
    factors: the ``[b, p]`` gradients are not)."""
    loss = wrapper.objective.per_example_loss
    shortcut = wrapper._linear_grads
    verified = wrapper._linear_verified.get(loss)
    if not shortcut.applicable or verified is False:
        return None
    factors = chain_factors(wrapper, loss, batch)
    if factors is not None:  # exact by construction: no check
        wrapper._linear_verified[loss] = True
        return factors
    b = batch_size(batch)
    with functional_evaluation():
        factors = shortcut.factors(
            lambda params: wrapper._batch_value(loss, params, batch), wrapper.params, b
        )
    if factors is None:
        wrapper._linear_verified[loss] = False
        return None
    if verified is None:
        rows = [0] if b == 1 else [0, b - 1]
        picked = {prefix: (a[rows], g[rows]) for prefix, (a, g) in factors.items()}
        fast = shortcut.gradients_of(picked, wrapper.numels)
        if not shortcut_agrees(wrapper, loss, batch, rows, fast):
            return None
    return factors


def train_grad_products(
    wrapper: ModelWrapper, batch: Batch, vectors: torch.Tensor, factors: Factors | None = None
) -> torch.Tensor:
    """``vectors @ G^T`` (``[k, b]``) for the training gradients ``G`` of a prepared batch.

    Directly (:meth:`LinearPerExampleGradients.products_of
    <infl.linear_grads.LinearPerExampleGradients.products_of>` on :func:`loss_factors`, or on
    ``factors`` when given, plus :math:`V c` in every column) when
    :meth:`ModelWrapper.multiplies_directly <infl.model.ModelWrapper.multiplies_directly>`
    and the shortcut is checked; for a model on the convolutional shortcut, once checked, from
    its gradients formed a few examples at a time (:meth:`LayerPerExampleGradients.products
    <infl.layer_grads.LayerPerExampleGradients.products>`: the same work as forming them, but
    no ``[b, p]``); else from :meth:`ModelWrapper.train_grads
    <infl.model.ModelWrapper.train_grads>`.
    """
    loss = wrapper.objective.per_example_loss
    if checked(wrapper) and wrapper.multiplies_directly(vectors.shape[0]):
        if factors is None:
            factors = loss_factors(wrapper, batch)
        out = None if factors is None else products_from_factors(wrapper, factors, vectors)
        if out is not None:
            return out
    elif _layers_checked(wrapper):
        with functional_evaluation():
            found = wrapper._batched_grads.products(
                lambda params: wrapper._batch_value(loss, params, batch),
                wrapper.params,
                batch_size(batch),
                vectors,
            )
        if found is not None and all_finite(found):
            return _with_decay(wrapper, found, vectors)
    return vectors @ wrapper.train_grads(batch).to(vectors).T


def products_from_factors(
    wrapper: ModelWrapper, factors: Factors, vectors: torch.Tensor
) -> torch.Tensor | None:
    """``vectors @ G^T`` (``[k, b]``) from a chunk's :func:`loss_factors` (with the weight-decay
    term), or ``None`` when it is not finite; only for a model whose ``nn.Linear`` shortcut
    was checked (the caller's test)."""
    out = wrapper._linear_grads.products_of(factors, vectors)
    return _with_decay(wrapper, out, vectors) if all_finite(out) else None


def gradients_from_factors(
    wrapper: ModelWrapper, factors: Factors, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """A chunk's training gradients ``G`` (``[b, p]``, into ``out`` when given) from its
    :func:`loss_factors`, with :math:`c = \\Lambda\\theta` in every row as
    :meth:`ModelWrapper.train_grads <infl.model.ModelWrapper.train_grads>` has it; ``None``
    when they are not finite. Only for a model whose ``nn.Linear`` shortcut was checked."""
    grads = wrapper._linear_grads.gradients_of(factors, wrapper.numels, out)
    if not all_finite(grads):
        return None
    if wrapper.has_decay:
        grads.add_(wrapper.decay * wrapper.flat_params)
    return grads


def _with_decay(wrapper: ModelWrapper, out: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``out`` plus :math:`V c` in every column, :math:`c = \\Lambda\\theta`."""
    if wrapper.has_decay:
        decay = (wrapper.decay * wrapper.flat_params).to(vectors)
        out += (vectors @ decay).unsqueeze(1)
    return out


def train_grad_moments(
    wrapper: ModelWrapper, batch: Batch, factors: Factors | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of G's rows [p], sum of their squared norms [1])`` in float64 for the training
    gradients ``G`` of a prepared batch.

    Directly (:meth:`LinearPerExampleGradients.moments_of
    <infl.linear_grads.LinearPerExampleGradients.moments_of>` on ``factors``, else on
    :func:`loss_factors`, then :math:`\\sum_i (g_i + c)` and
    :math:`\\sum_i \\|g_i\\|^2 + 2 c^T \\sum_i g_i + b \\|c\\|^2`) when the shortcut applies and
    agrees with autograd; else from :meth:`ModelWrapper.train_grads
    <infl.model.ModelWrapper.train_grads>`.
    """
    if factors is None:
        factors = loss_factors(wrapper, batch)
    if factors is not None:
        total, squares = wrapper._linear_grads.moments_of(factors)
        if all_finite(total) and all_finite(squares):
            if wrapper.has_decay:
                b = batch_size(batch)
                c = (wrapper.decay * wrapper.flat_params).to(torch.float64)
                squares = squares + 2 * (c @ total) + b * (c @ c)
                total = total + b * c
            return total, squares
    return next(gradient_moments([(0, wrapper.train_grads(batch))]))
