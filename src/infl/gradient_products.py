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
from infl.model_checks import gradient_moments
from infl.second_order import functional_evaluation

if TYPE_CHECKING:
    from infl.model import ModelWrapper

__all__ = ["train_grad_moments", "train_grad_products"]


def _checked(wrapper: ModelWrapper) -> bool:
    """Whether the ``nn.Linear`` shortcut applies, was checked against autograd for the loss
    and agreed (the convolutional one forms the gradients: no products or moments)."""
    loss = wrapper.objective.per_example_loss
    return wrapper._linear_grads.applicable and wrapper._linear_verified.get(loss) is True


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


def train_grad_products(wrapper: ModelWrapper, batch: Batch, vectors: torch.Tensor) -> torch.Tensor:
    """``vectors @ G^T`` (``[k, b]``) for the training gradients ``G`` of a prepared batch.

    Directly (:meth:`LinearPerExampleGradients.products
    <infl.linear_grads.LinearPerExampleGradients.products>`, plus :math:`V c` in every column)
    when :meth:`ModelWrapper.multiplies_directly <infl.model.ModelWrapper.multiplies_directly>`
    and the shortcut is checked; for a model on the convolutional shortcut, once checked, from
    its gradients formed a few examples at a time (:meth:`LayerPerExampleGradients.products
    <infl.layer_grads.LayerPerExampleGradients.products>`: the same work as forming them, but
    no ``[b, p]``); else from :meth:`ModelWrapper.train_grads
    <infl.model.ModelWrapper.train_grads>`.
    """
    loss = wrapper.objective.per_example_loss
    direct = _checked(wrapper) and wrapper.multiplies_directly(vectors.shape[0])
    if direct or _layers_checked(wrapper):
        shortcut = wrapper._linear_grads if direct else wrapper._batched_grads
        with functional_evaluation():
            out = shortcut.products(
                lambda params: wrapper._batch_value(loss, params, batch),
                wrapper.params,
                batch_size(batch),
                vectors,
            )
        if out is not None and all_finite(out):
            if wrapper.has_decay:
                decay = (wrapper.decay * wrapper.flat_params).to(vectors)
                out += (vectors @ decay).unsqueeze(1)
            return out
    return vectors @ wrapper.train_grads(batch).to(vectors).T


def train_grad_moments(wrapper: ModelWrapper, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of G's rows [p], sum of their squared norms [1])`` in float64 for the training
    gradients ``G`` of a prepared batch.

    Directly (:meth:`LinearPerExampleGradients.moments
    <infl.linear_grads.LinearPerExampleGradients.moments>`, then :math:`\\sum_i (g_i + c)` and
    :math:`\\sum_i \\|g_i\\|^2 + 2 c^T \\sum_i g_i + b \\|c\\|^2`) when the shortcut applies and
    is checked; else from :meth:`ModelWrapper.train_grads <infl.model.ModelWrapper.train_grads>`.
    """
    loss = wrapper.objective.per_example_loss
    if _checked(wrapper):  # a checked shortcut is an applicable one
        b = batch_size(batch)
        with functional_evaluation():
            found = wrapper._linear_grads.moments(
                lambda params: wrapper._batch_value(loss, params, batch), wrapper.params, b
            )
        if found is not None and all_finite(found[0]) and all_finite(found[1]):
            total, squares = found
            if wrapper.has_decay:
                c = (wrapper.decay * wrapper.flat_params).to(torch.float64)
                squares = squares + 2 * (c @ total) + b * (c @ c)
                total = total + b * c
            return total, squares
    return next(gradient_moments([(0, wrapper.train_grads(batch))]))
