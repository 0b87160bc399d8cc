"""An ``nn.Sequential`` of ``nn.Linear`` layers and element-wise activations, run and
differentiated by hand.

When :func:`infl.model_checks.rowwise_by_construction` holds (the objective's built-in loss on
a plain ``nn.Sequential`` of exactly ``nn.Linear`` and element-wise activation modules, no
hooks), the model is the chain :math:`t_k = W_k t_{k-1} + c_k` or :math:`t_k =
\\sigma_k(t_{k-1})` applied to ``[b, in]`` inputs, and its derivatives need no autograd
graph: the gradient of the loss at the output is carried back as :math:`e_{k-1} = W_k^T e_k`
or :math:`\\sigma_k'(t_{k-1}) \\odot e_k`. This module holds that chain
(:func:`chain_layers`), the activations' first and second derivatives (:func:`derivatives`),
the loss's in the outputs (:func:`output_derivatives`), and the training gradients' factors
of a batch by one such pass (:func:`chain_factors`: each layer's input and the gradient at
its output, what :meth:`LinearPerExampleGradients.factors
<infl.linear_grads.LinearPerExampleGradients.factors>` records with forward hooks and a
backward pass through the module). :mod:`infl.sequential_hessian` builds the exact Hessian
on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from infl.data import Batch
from infl.linear_grads import Factors
from infl.losses import IGNORE_INDEX, SupervisedLoss
from infl.model_checks import rowwise_by_construction

if TYPE_CHECKING:
    from infl.model import ModelWrapper

__all__ = ["ChainLayer", "chain_factors", "chain_layers", "derivatives", "output_derivatives"]

PIECEWISE_LINEAR = (nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh)
"""Activations whose second derivative is zero wherever it exists."""


@dataclass(frozen=True)
class ChainLayer:
    """One module of the chain: a linear layer (``weight``/``bias`` are the flat-space
    offsets of its trainable tensors, ``None`` when frozen or absent) or an activation."""

    prefix: str
    module: nn.Module
    weight: int | None = None
    bias: int | None = None

    @property
    def linear(self) -> bool:
        return type(self.module) is nn.Linear

    @property
    def owns_parameters(self) -> bool:
        return self.weight is not None or self.bias is not None

    @property
    def smooth(self) -> bool:
        """An activation with a second derivative that is not zero everywhere."""
        return not self.linear and type(self.module) not in PIECEWISE_LINEAR

    def names(self) -> tuple[str, str]:
        """The names of the layer's weight and bias in the model."""
        dot = f"{self.prefix}." if self.prefix else ""
        return f"{dot}weight", f"{dot}bias"


def chain_layers(wrapper: ModelWrapper, fn: Any) -> list[ChainLayer] | None:
    """The modules of ``wrapper.model`` in the order they run, when ``fn`` on the model is the
    chain of the module docstring and every trainable parameter is a weight or bias of one of
    its linear layers; else ``None``."""
    if not rowwise_by_construction(wrapper, fn):
        return None
    offsets: dict[str, int] = {}
    start = 0
    for name, size in zip(wrapper.names, wrapper.numels, strict=True):
        offsets[name] = start
        start += size
    prefixes = {id(m): prefix for prefix, m in wrapper.model.named_modules()}  # first names
    layers = []
    claimed: set[str] = set()
    for module in _in_order(wrapper.model):
        layer = ChainLayer(prefixes[id(module)], module)
        if layer.linear:
            weight, bias = layer.names()
            layer = ChainLayer(layer.prefix, module, offsets.get(weight), offsets.get(bias))
            claimed.update(name for name in (weight, bias) if name in offsets)
        layers.append(layer)
    if claimed != set(offsets):  # a trainable tensor outside the linear layers
        return None
    return layers


def _in_order(sequential: nn.Module) -> list[nn.Module]:
    """The modules a (nested) ``nn.Sequential`` runs, in order; one held twice runs twice
    (``named_modules`` would list it once)."""
    order: list[nn.Module] = []
    for child in sequential._modules.values():  # children() would skip a repeat
        if type(child) is nn.Sequential:
            order.extend(_in_order(child))
        elif child is not None:
            order.append(child)
    return order


def derivatives(
    module: nn.Module, t: torch.Tensor, smooth: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(sigma(t), sigma'(t), sigma''(t))`` of an element-wise activation, element by element;
    the last is ``None`` (zero) unless ``smooth``. Differentiated by autograd (the
    activation's own derivative), except ReLU."""
    if type(module) is nn.ReLU:
        return torch.relu(t), (t > 0).to(t.dtype), None
    with torch.enable_grad():
        u = t.detach().requires_grad_(True)
        y = module(u.clone())  # clone: an in-place activation must not write into u
        (slope,) = torch.autograd.grad(y.sum(), u, create_graph=smooth)
        curve = None
        if smooth and slope.requires_grad:
            (curve,) = torch.autograd.grad(slope.sum(), u)
    return y.detach(), slope.detach(), curve


def output_derivatives(
    loss: SupervisedLoss, outputs: torch.Tensor, targets: Any, *, hessian: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each example's gradient ``[b, K]`` and (with ``hessian``) Hessian ``[b, K, K]`` of the
    loss in its ``K`` outputs.

    For cross-entropy on class indices :math:`p - y` and :math:`\\mathrm{diag}(p) - pp^T`
    (:math:`p` the softmax; zero for ``ignore_index`` labels, as the loss); else by autograd
    and one call of the loss's output-Hessian product on the ``K`` basis vectors of every
    example.
    """
    b, k = outputs.shape
    if loss.name == "cross_entropy" and not targets.is_floating_point():
        prob = torch.softmax(outputs, dim=1)
        kept = (targets != IGNORE_INDEX).to(outputs.dtype).unsqueeze(1)
        label = F.one_hot(targets.clamp_min(0), k).to(outputs.dtype)
        if not hessian:
            return (prob - label) * kept, None
        curvature = torch.diag_embed(prob) - prob.unsqueeze(2) * prob.unsqueeze(1)
        return (prob - label) * kept, curvature * kept.unsqueeze(2)
    with torch.enable_grad():
        o = outputs.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss.loss_of_outputs(o, targets).sum(), o)
    if not hessian:
        return gradient, None
    basis = torch.eye(k, dtype=outputs.dtype, device=outputs.device)
    repeated = targets.repeat(k, *([1] * (targets.dim() - 1)))
    columns = loss.output_hessian_product(
        outputs.repeat(k, 1), repeated, basis.repeat_interleave(b, dim=0)
    )  # row c * b + i: H_out of example i times e_c
    return gradient, columns.reshape(k, b, k).permute(1, 2, 0)


def chain_factors(wrapper: ModelWrapper, fn: Any, batch: Batch) -> Factors | None:
    """The per-example gradients' factors of ``fn`` on a prepared batch, by one pass of the
    chain: for each linear layer with a trainable tensor, its input ``[b, in]`` and the
    gradient of the per-example values at its output ``[b, out]``; ``None`` where the chain
    does not apply (see :func:`chain_layers`), the inputs are not ``[b, in]``, the outputs not
    ``[b, K]``, or a layer runs twice.

    The same numbers as :meth:`LinearPerExampleGradients.factors
    <infl.linear_grads.LinearPerExampleGradients.factors>`, without the module's forward
    hooks, the functional call or an autograd graph.
    """
    layers = chain_layers(wrapper, fn)
    if layers is None:
        return None
    inputs, targets = fn.split(batch)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2:
        return None
    tensors = {**wrapper.fixed, **wrapper.params}
    saved: list[torch.Tensor] = []  # a linear layer's input, an activation's slope
    t = inputs
    with torch.no_grad():
        for layer in layers:
            if layer.linear:
                weight, bias = layer.names()
                saved.append(t)
                t = F.linear(t, tensors[weight], tensors.get(bias))
            else:
                t, slope, _ = derivatives(layer.module, t, smooth=False)
                saved.append(slope)
        if t.dim() != 2:
            return None
        e, _ = output_derivatives(fn, t, targets, hessian=False)
        factors: Factors = {}
        for i in range(len(layers) - 1, -1, -1):
            layer = layers[i]
            if not layer.linear:
                e = e * saved[i]
                continue
            if layer.owns_parameters:
                if layer.prefix in factors:
                    return None
                factors[layer.prefix] = (saved[i], e)
            if i > 0:
                e = e @ tensors[layer.names()[0]]
    return factors
