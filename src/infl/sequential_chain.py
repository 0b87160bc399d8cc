"""An ``nn.Sequential`` of ``nn.Linear`` layers and element-wise activations, run and
differentiated by hand.

When :func:`infl.model_checks.rowwise_by_construction` holds (the objective's built-in loss on
a plain ``nn.Sequential`` of exactly ``nn.Linear`` and element-wise activation modules, no
hooks), the model is the chain :math:`t_k = W_k t_{k-1} + c_k` or :math:`t_k =
\\sigma_k(t_{k-1})` applied to ``[b, in]`` inputs, and its derivatives need no autograd
graph: the gradient of the loss at the output is carried back as :math:`e_{k-1} = W_k^T e_k`
or :math:`\\sigma_k'(t_{k-1}) \\odot e_k`. This module holds that chain
(:func:`chain_layers`), the activations' first and second derivatives (:func:`derivatives`),
the loss's in the outputs (:func:`output_derivatives`), one forward and backward pass of a
batch (:func:`primal_pass`, :class:`ChainPrimal`), and from it the training gradients'
factors (:func:`chain_factors`: each layer's input and the gradient at its output, what
:meth:`LinearPerExampleGradients.factors <infl.linear_grads.LinearPerExampleGradients.factors>`
records with forward hooks and a backward pass through the module).
:mod:`infl.sequential_hessian` builds the exact Hessian on the chain and :mod:`infl.chain_hvp`
its Hessian-vector products.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from infl.data import Batch
from infl.linear_grads import Factors
from infl.losses import IGNORE_INDEX, SupervisedLoss
from infl.model_checks import rowwise_by_construction
from infl.spatial_layers import (
    ConvPrimal,
    conv_forward,
    conv_input_gradient,
    pool_forward,
    pool_input_gradient,
    spatial_layer_supported,
    with_gradient,
)

if TYPE_CHECKING:
    from infl.model import ModelWrapper

__all__ = [
    "ChainLayer",
    "ChainPrimal",
    "chain_factors",
    "chain_layers",
    "derivatives",
    "output_derivatives",
    "primal_pass",
]

PIECEWISE_LINEAR = (nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh)
"""Activations whose second derivative is zero wherever it exists."""


_KINDS: dict[type, str] = {
    nn.Linear: "linear",
    nn.Conv2d: "conv",
    nn.MaxPool2d: "pool",
    nn.Flatten: "flatten",
}


@dataclass(frozen=True)
class ChainLayer:
    """One module of the chain: a linear layer or a convolution (``weight``/``bias`` are the
    flat-space offsets of its trainable tensors, ``None`` when frozen or absent), a max-pooling,
    a flatten, or an activation."""

    prefix: str
    module: nn.Module
    weight: int | None = None
    bias: int | None = None

    @property
    def kind(self) -> str:
        """``"linear"``, ``"conv"``, ``"pool"``, ``"flatten"`` or ``"activation"``."""
        return _KINDS.get(type(self.module), "activation")

    @property
    def linear(self) -> bool:
        return type(self.module) is nn.Linear

    @property
    def weighted(self) -> bool:
        """A linear layer or a convolution: the modules that may own parameters."""
        return self.kind in ("linear", "conv")

    @property
    def owns_parameters(self) -> bool:
        return self.weight is not None or self.bias is not None

    @property
    def smooth(self) -> bool:
        """An activation with a second derivative that is not zero everywhere."""
        return self.kind == "activation" and type(self.module) not in PIECEWISE_LINEAR

    def names(self) -> tuple[str, str]:
        """The names of the layer's weight and bias in the model."""
        dot = f"{self.prefix}." if self.prefix else ""
        return f"{dot}weight", f"{dot}bias"


@dataclass(frozen=True)
class ChainPrimal:
    """One pass of the chain over a batch (:func:`primal_pass`), per module: what it read in
    ``inputs`` (a linear layer's input ``[b, in]``, a max-pooling's argmax indices ``[b, C,
    L]``), a convolution's :class:`~infl.spatial_layers.ConvPrimal` in ``convs``, an
    activation's first and second derivatives (the second ``None`` when zero or not asked
    for), the gradient of the per-example losses at the module's output (its shape), and the
    shape of its input; and the batch's outputs ``[b, K]`` and targets. What the chain's
    per-example gradients (:func:`chain_factors`) and its Hessian-vector products
    (:mod:`infl.chain_hvp`, which keeps one per chunk) are made of."""

    inputs: tuple[torch.Tensor | None, ...]
    slopes: tuple[torch.Tensor | None, ...]
    curves: tuple[torch.Tensor | None, ...]
    grads: tuple[torch.Tensor, ...]
    outputs: torch.Tensor
    targets: Any
    shapes: tuple[torch.Size, ...] = ()
    convs: tuple[ConvPrimal | None, ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held."""
        held = [*self.inputs, *self.slopes, *self.curves, *self.grads, self.outputs]
        if isinstance(self.targets, torch.Tensor):
            held.append(self.targets)
        convs = sum(conv.nbytes for conv in self.convs if conv is not None)
        return convs + sum(t.numel() * t.element_size() for t in held if t is not None)


def chain_layers(
    wrapper: ModelWrapper, fn: Any, *, spatial: bool = False
) -> list[ChainLayer] | None:
    """The modules of ``wrapper.model`` in the order they run, when ``fn`` on the model is the
    chain of the module docstring and every trainable parameter is a weight or bias of one of
    its linear layers; else ``None``. With ``spatial``, the chain may also hold convolutions,
    max-poolings and flattens (:func:`~infl.spatial_layers.spatial_layer_supported`), whose
    parameters count as the linear layers' do: what :mod:`infl.chain_hvp` runs, but not
    :func:`chain_factors` (a convolution's per-example gradient is not one outer product).

    The structure is checked on every call (a hook may have been added since the last); the
    layers are built once per wrapper and the modules it runs, in order and by name."""
    if not rowwise_by_construction(wrapper, fn, spatial=spatial):
        return None
    order = _in_order(wrapper.model, "", {})
    key = tuple((name, id(module)) for name, module in order)
    built = _BUILT.setdefault(wrapper, {})
    cached = built.get(spatial)
    if cached is None or cached[0] != key:  # the cached layers hold the modules: ids stay
        cached = key, _layers(wrapper, order)
        built[spatial] = cached
    return None if cached[1] is None else list(cached[1])


_Built = tuple[tuple[tuple[str, int], ...], list[ChainLayer] | None]
_BUILT: weakref.WeakKeyDictionary[Any, dict[bool, _Built]] = weakref.WeakKeyDictionary()


def _layers(wrapper: ModelWrapper, order: list[tuple[str, nn.Module]]) -> list[ChainLayer] | None:
    offsets: dict[str, int] = {}
    start = 0
    for name, size in zip(wrapper.names, wrapper.numels, strict=True):
        offsets[name] = start
        start += size
    layers = []
    claimed: set[str] = set()
    for prefix, module in order:
        layer = ChainLayer(prefix, module)
        if layer.kind in ("conv", "pool", "flatten") and not spatial_layer_supported(module):
            return None
        if layer.weighted:
            weight, bias = layer.names()
            layer = ChainLayer(prefix, module, offsets.get(weight), offsets.get(bias))
            claimed.update(name for name in (weight, bias) if name in offsets)
        layers.append(layer)
    if claimed != set(offsets):  # a trainable tensor outside the weighted layers
        return None
    return layers


def _in_order(
    sequential: nn.Module, path: str, first: dict[int, str]
) -> list[tuple[str, nn.Module]]:
    """The modules a (nested) ``nn.Sequential`` runs, in order, each with its first name (the
    one ``named_modules`` and ``named_parameters`` give it; ``first`` collects them); one
    held twice runs twice (``named_modules`` would list it once)."""
    order: list[tuple[str, nn.Module]] = []
    for key, child in sequential._modules.items():  # children() would skip a repeat
        if child is None:
            continue
        name = first.setdefault(id(child), f"{path}.{key}" if path else key)
        if type(child) is nn.Sequential:
            order.extend(_in_order(child, name, first))
        else:
            order.append((name, child))
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
        minus_one = outputs.new_full((b, 1), -1.0)
        # no ignore_index label: p - y in one scatter (asked on a CPU only: off it, reading
        # the answer would wait for the device, which the masked route below does not)
        if b == 0 or (outputs.device.type == "cpu" and int(targets.min()) >= 0):
            if not hessian:
                return prob.scatter_add_(1, targets.unsqueeze(1), minus_one), None
            gradient = prob.scatter_add(1, targets.unsqueeze(1), minus_one)
            return gradient, torch.diag_embed(prob) - prob.unsqueeze(2) * prob.unsqueeze(1)
        ignored = (targets == IGNORE_INDEX).unsqueeze(1)
        gradient = prob.scatter_add(1, targets.clamp_min(0).unsqueeze(1), minus_one)
        gradient.masked_fill_(ignored, 0.0)
        if not hessian:
            return gradient, None
        curvature = torch.diag_embed(prob) - prob.unsqueeze(2) * prob.unsqueeze(1)
        return gradient, curvature.masked_fill_(ignored.unsqueeze(2), 0.0)
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


def primal_pass(
    layers: list[ChainLayer],
    tensors: dict[str, torch.Tensor],
    loss: SupervisedLoss,
    batch: Batch,
    *,
    curves: bool,
) -> ChainPrimal | None:
    """One forward and one backward pass of the chain over a prepared batch, no autograd
    graph: what every module reads (a linear layer's input, a max-pooling's argmax, a
    convolution's :class:`~infl.spatial_layers.ConvPrimal`), each activation's
    :math:`\\sigma'`, the gradient of the per-example losses at every module's output, and
    every module's input shape. With ``curves``, the terms of the Hessian in the gradient
    too: the smooth activations' :math:`\\sigma''` and the convolutions' gradient patches.
    ``None`` where a linear layer's input is not ``[b, in]``, a convolution's or pooling's
    not ``[b, C, H, W]``, the outputs not ``[b, K]``, or a convolution after a trainable
    layer has a dense matrix larger than :data:`~infl.spatial_layers.DENSE_ENTRIES`."""
    inputs_, targets = loss.split(batch)
    if not isinstance(inputs_, torch.Tensor) or inputs_.dim() < 2:
        return None
    first = next((i for i, layer in enumerate(layers) if layer.owns_parameters), len(layers))
    inputs: list[torch.Tensor | None] = []
    slopes: list[torch.Tensor | None] = []
    second: list[torch.Tensor | None] = []
    shapes: list[torch.Size] = []
    convs: list[ConvPrimal | None] = []
    t = inputs_
    with torch.no_grad():
        for i, layer in enumerate(layers):
            shapes.append(t.shape)
            kind = layer.kind
            read = slope = curve = conv = None
            if kind in ("linear", "conv", "pool") and t.dim() != (2 if kind == "linear" else 4):
                return None
            if kind == "linear":
                weight, bias = layer.names()
                read = t
                t = F.linear(t, tensors[weight], tensors.get(bias))
            elif kind == "conv":
                weight, bias = layer.names()
                module = layer.module
                assert isinstance(module, nn.Conv2d)
                ran = conv_forward(module, tensors[weight], tensors.get(bias), t, dense=i > first)
                if ran is None:
                    return None
                t, conv = ran
            elif kind == "pool":
                assert isinstance(layer.module, nn.MaxPool2d)
                t, read = pool_forward(layer.module, t)
            elif kind == "flatten":
                t = t.flatten(1)
            else:
                t, slope, curve = derivatives(layer.module, t, curves and layer.smooth)
            inputs.append(read)
            slopes.append(slope)
            second.append(curve)
            convs.append(conv)
        if t.dim() != 2:
            return None
        e, _ = output_derivatives(loss, t, targets, hessian=False)
        grads: list[torch.Tensor] = [e] * len(layers)
        for i in range(len(layers) - 1, 0, -1):
            grads[i] = e
            e = _input_gradient(layers[i], tensors, inputs[i], slopes[i], convs[i], shapes[i], e)
        grads[0] = e
        for i, conv in enumerate(convs):
            module = layers[i].module
            if conv is not None and curves and i > first and layers[i].weight is not None:
                assert isinstance(module, nn.Conv2d)
                convs[i] = with_gradient(module, conv, grads[i], shapes[i][2:])
    return ChainPrimal(
        tuple(inputs),
        tuple(slopes),
        tuple(second),
        tuple(grads),
        t,
        targets,
        tuple(shapes),
        tuple(convs),
    )


def _input_gradient(
    layer: ChainLayer,
    tensors: dict[str, torch.Tensor],
    read: torch.Tensor | None,
    slope: torch.Tensor | None,
    conv: ConvPrimal | None,
    shape: torch.Size,
    e: torch.Tensor,
) -> torch.Tensor:
    """The gradient at the module's input (``shape``) from ``e`` at its output."""
    kind = layer.kind
    if kind == "linear":
        return e @ tensors[layer.names()[0]]
    if kind == "conv":
        assert conv is not None  # kept for every convolution
        assert isinstance(layer.module, nn.Conv2d)
        return conv_input_gradient(layer.module, tensors[layer.names()[0]], conv, e, shape)
    if kind == "pool":
        assert read is not None  # the argmax, kept for every pooling
        into = e.new_empty(*shape[:2], shape[2] * shape[3])
        return pool_input_gradient(read, e, shape[2:], into)
    if kind == "flatten":
        return e.reshape(shape)
    assert slope is not None  # kept for every activation
    return e * slope


def chain_factors(wrapper: ModelWrapper, fn: Any, batch: Batch) -> Factors | None:
    """The per-example gradients' factors of ``fn`` on a prepared batch, by one pass of the
    chain (:func:`primal_pass`): for each linear layer with a trainable tensor, its input
    ``[b, in]`` and the gradient of the per-example values at its output ``[b, out]``;
    ``None`` where the chain does not apply (see :func:`chain_layers`), the inputs are not
    ``[b, in]``, the outputs not ``[b, K]``, or a layer runs twice.

    The same numbers as :meth:`LinearPerExampleGradients.factors
    <infl.linear_grads.LinearPerExampleGradients.factors>`, without the module's forward
    hooks, the functional call or an autograd graph.
    """
    layers = chain_layers(wrapper, fn)
    if layers is None:
        return None
    tensors = {**wrapper.fixed, **wrapper.params}
    primal = primal_pass(layers, tensors, fn, batch, curves=False)
    if primal is None:
        return None
    factors: Factors = {}
    for i, layer in enumerate(layers):
        x = primal.inputs[i]
        if layer.owns_parameters and x is not None:
            if layer.prefix in factors:
                return None
            factors[layer.prefix] = (x, primal.grads[i])
    return factors
