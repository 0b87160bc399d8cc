"""Hessian-vector products of an ``nn.Sequential`` chain of ``nn.Linear`` layers and
element-wise activations, as matrix products with no autograd graph.

On the chain of :mod:`infl.sequential_chain` (module :math:`k` maps :math:`t_{k-1}` to
:math:`t_k = W_k t_{k-1} + c_k` or :math:`\\sigma_k(t_{k-1})`, the loss :math:`\\ell(t_L)`,
:math:`e_k = \\partial\\ell/\\partial t_k`), :math:`H v` is the derivative of the gradient
along :math:`v = (dW_k, dc_k)_k` (Pearlmutter's R-operator), written out:

* forward, the tangents :math:`\\dot t_k = W_k \\dot t_{k-1} + dW_k\\, t_{k-1} + dc_k` or
  :math:`\\sigma_k'(t_{k-1}) \\odot \\dot t_{k-1}`, with :math:`\\dot t_0 = 0`;
* at the output :math:`\\dot e_L = H_{out} \\dot t_L` (the loss's Hessian in the outputs);
* backward, :math:`\\dot e_{k-1} = W_k^T \\dot e_k + dW_k^T e_k` or
  :math:`\\sigma_k' \\odot \\dot e_k + \\sigma_k'' \\odot \\dot t_{k-1} \\odot e_k`;
* and the layer's rows of :math:`H v`: :math:`\\dot e_k t_{k-1}^T + e_k \\dot t_{k-1}^T`
  for :math:`W_k`, :math:`\\dot e_k` for :math:`c_k`, summed over the examples.

The primal pass (each linear layer's input, each activation's :math:`\\sigma'` and
:math:`\\sigma''`, every :math:`e_k`: :func:`~infl.sequential_chain.primal_pass`) does not
depend on :math:`v`; it is kept per chunk in the operator's
:class:`~infl.second_order.GradientGraphs`, like the autograd graphs it replaces, or once
for all the examples when their tangents fit the work memory (:func:`whole_data_products`).
A product of ``k`` vectors is then six matrix products per linear layer (two at the first
trainable one) over the chunk's examples and all ``k`` vectors at once: the floating-point
work of the double backward, without its graph walk, its per-node buffers or its one pass
per vector.
Measured (``benchmarks/bench_hvp_routes.py``, one thread, float32, against the kept
double-backward graph): 1.10-1.16x per product on the 85k-parameter digits MLP with one
vector, 1.19-1.21x with ten; 1.24-1.28x on a minibatch of 128 examples with ten vectors (no
graph kept); 1.14x on the Iris MLP (ten vectors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from infl.data import Batch, IndexedData
from infl.losses import SupervisedLoss
from infl.sequential_chain import ChainLayer, ChainPrimal, chain_layers, primal_pass
from infl.spatial_layers import (
    conv_back,
    conv_rows,
    conv_tangent,
    pool_input_gradient,
    pool_tangent,
)

if TYPE_CHECKING:
    from infl.model import ModelWrapper
    from infl.second_order import GradientGraphs

__all__ = ["chain_hvp", "whole_data_products"]

WORK_BYTES = 1 << 27
"""Most bytes of one vector's tangents over all the data for a product to run over all of it
at once (:func:`whole_data_products`)."""

GROUP_BYTES = 1 << 25
"""Most bytes of tangents one product of a chunk holds; more vectors are taken in groups.
Measured on the digits MLP (ten vectors over all 1,438 examples, one thread, alternating in
one process): groups of three vectors (32 MiB) against all ten at once (128 MiB), one
product 168 against 176 ms best (medians 182 against 194), the three-iteration block CG job
0.667-0.701 against 0.721-0.727 s best; groups of one (16 MiB) about the same as three.
Where the primal pass, which every group reads whole, is larger (the digits CNN's over all
its examples: 96 MB in float64, 50 MB in float32, half of it the convolutions' patches and
dense matrices), a group may hold as many bytes of tangents as it: both of two vectors in
one pass, 78-86 against 97-114 ms per product in float64, 37 against 46-57 ms in float32."""


def chain_hvp(
    wrapper: ModelWrapper,
    batch: Batch,
    vectors: torch.Tensor,
    graphs: GradientGraphs | None = None,
    chunk: int = 0,
    *,
    gauss_newton: bool = False,
    into: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Summed (not averaged) HVPs ``[k, p]`` of the per-example losses of one prepared chunk,
    by the matrix products of the module docstring, or with ``gauss_newton`` the Gauss-Newton
    products :math:`\\sum_i J_i^T H_{out,i} J_i v` (every term with :math:`e_k` dropped);
    ``None`` where the chain does not apply (:func:`~infl.sequential_chain.chain_layers`;
    inputs not ``[b, in]``, outputs not ``[b, K]``) or the wrapper was asked for a
    ``second_order`` mode (``"auto"`` is the default).

    With ``graphs``, the chunk's :class:`~infl.sequential_chain.ChainPrimal` (key ``chunk``)
    is taken from ``graphs.primals`` when kept, and kept there when computed while
    :attr:`~infl.second_order.GradientGraphs.keeping_sized` and within its budget; so are the
    tangents' buffers (:class:`Buffers`), shared by the chunks. With ``into`` (``[k, p]``)
    the products are added into it in place and it is returned.

    Cost: a primal pass (one forward and one backward pass, no graph) unless kept, then
    about six ``[b, in] x [in, out]`` matrix products per linear layer and vector.
    """
    if wrapper.requested_second_order != "auto":  # a mode asked for is kept
        return None
    loss = wrapper.objective.per_example_loss
    layers = chain_layers(wrapper, loss, spatial=True)
    if layers is None:
        return None
    assert isinstance(loss, SupervisedLoss)  # rowwise_by_construction
    tensors = {**wrapper.fixed, **wrapper.params}
    primal = graphs.primals.get(chunk) if graphs is not None else None
    if primal is None:
        primal = primal_pass(layers, tensors, loss, batch, curves=not gauss_newton)
        if primal is None:
            return None
        if graphs is not None and graphs.keeping_sized and graphs.admit(primal.nbytes):
            graphs.primals[chunk] = primal
    return _summed(layers, tensors, loss, primal, vectors, graphs, gauss_newton, into)


def whole_data_products(
    wrapper: ModelWrapper,
    vectors: torch.Tensor,
    graphs: GradientGraphs | None,
    data: IndexedData,
    *,
    gauss_newton: bool = False,
) -> torch.Tensor | None:
    """The products of :func:`chain_hvp` over all of ``data`` as one batch, whatever the
    chunk size, or ``None`` (then the caller goes chunk by chunk): when the chain applies,
    ``data`` is held in memory (not streamed), and one vector's tangents over all its
    examples fit :data:`WORK_BYTES`.

    Within that bound the tangents of one group of vectors are no larger than a chunk's
    could be, and the primal pass (kept under key :data:`WHOLE` by the graphs' rule) is the
    chunks' together; a product is then one call over every example: fewer, larger matrix
    products and no per-chunk overhead. Every product of the operator takes the same route,
    so its sums are the same from call to call, bit for bit. Measured on the digits MLP
    (1,438 examples, chunks of 256 against all at once, one thread, alternating): 1.18-1.22x
    per product with one vector (Lanczos, Arnoldi), none beyond the noise with ten."""
    if data.streamed or len(data) == 0 or wrapper.requested_second_order != "auto":
        return None
    loss = wrapper.objective.per_example_loss
    layers = chain_layers(wrapper, loss, spatial=True)
    if layers is None:
        return None
    assert isinstance(loss, SupervisedLoss)  # rowwise_by_construction
    kept = graphs.primals.get(WHOLE) if graphs is not None else None
    widths = _widths(layers, kept) if kept is not None else _data_widths(wrapper, layers, data)
    if widths is None or _per_vector(widths, len(data), vectors.element_size()) > WORK_BYTES:
        return None
    if kept is not None:
        batch: Batch = ()  # not read: the primal pass is kept
    else:
        _, batch = next(data.chunks(max(1, len(data))))
        batch = wrapper.prepare(batch)
    return chain_hvp(wrapper, batch, vectors, graphs, WHOLE, gauss_newton=gauss_newton)


WHOLE = -1
"""The key in :attr:`GradientGraphs.primals <infl.second_order.GradientGraphs.primals>` of
the primal pass over all the data at once (:func:`whole_data_products`)."""


def _per_vector(widths: int, examples: int, element_size: int) -> int:
    """Bytes of one vector's tangents over ``examples`` examples (an upper estimate), from the
    numbers per example the weighted layers output (:func:`_widths`)."""
    return max(1, 3 * examples * widths * element_size)


def _widths(layers: list[ChainLayer], primal: ChainPrimal | None) -> int:
    """The numbers per example the linear layers and convolutions output: a linear layer's
    ``out_features``, a convolution's channels times positions (read from ``primal``, which
    a chain with convolutions needs)."""
    total = 0
    for i, layer in enumerate(layers):
        if isinstance(layer.module, nn.Linear):
            total += layer.module.out_features
        elif layer.weighted:
            assert primal is not None  # the positions depend on the input's size
            total += primal.grads[i][0].numel()
    return total


def _data_widths(wrapper: ModelWrapper, layers: list[ChainLayer], data: IndexedData) -> int | None:
    """:func:`_widths` of ``data``'s examples: for a chain with convolutions, by a primal pass
    of its first example (``None`` where the chain does not apply to it)."""
    if not any(layer.kind == "conv" for layer in layers):
        return _widths(layers, None)
    loss = wrapper.objective.per_example_loss
    assert isinstance(loss, SupervisedLoss)  # rowwise_by_construction
    _, batch = next(data.chunks(1))
    tensors = {**wrapper.fixed, **wrapper.params}
    primal = primal_pass(layers, tensors, loss, wrapper.prepare(batch), curves=False)
    return None if primal is None else _widths(layers, primal)


def _summed(
    layers: list[ChainLayer],
    tensors: dict[str, torch.Tensor],
    loss: SupervisedLoss,
    primal: ChainPrimal,
    vectors: torch.Tensor,
    graphs: GradientGraphs | None,
    gauss_newton: bool,
    into: torch.Tensor | None,
) -> torch.Tensor:
    """The products over ``primal``'s examples, added into ``into`` (or a new ``[k, p]``),
    the vectors taken in groups whose tangents fit :data:`GROUP_BYTES`."""
    owners = [i for i, layer in enumerate(layers) if layer.owns_parameters]
    out = torch.zeros_like(vectors) if into is None else into
    if not owners or vectors.shape[0] == 0:
        return out
    b = primal.outputs.shape[0]
    per_vector = _per_vector(_widths(layers, primal), b, vectors.element_size())
    group = max(1, max(GROUP_BYTES, primal.nbytes) // per_vector)
    buffers = Buffers(graphs)
    with torch.no_grad():
        for start in range(0, vectors.shape[0], group):
            rows = slice(start, start + group)
            _products(
                layers,
                tensors,
                loss,
                primal,
                owners[0],
                vectors[rows],
                out[rows],
                gauss_newton,
                buffers,
            )
    return out


class Buffers:
    """The tangents' memory: named buffers kept in an operator's
    :attr:`~infl.second_order.GradientGraphs.buffers` and reused by its later products.

    A fresh tensor of a few MiB is mapped memory the kernel zero-fills page by page on first
    touch: a ten-vector product on the digits MLP took 12,063 page faults with fresh
    tangents and 1,957 with kept ones, 1.08-1.16x faster. Buffers are kept once products
    repeat (:attr:`~infl.second_order.GradientGraphs.repeated`: from the second product on,
    or the first when a solver announced two or more calls), each while it fits the graphs' budget
    (:meth:`~infl.second_order.GradientGraphs.admit`, without closing it to primal passes);
    without ``graphs``, or past the budget, a product allocates its own. A buffer never
    leaves the product that fills it: the products are added into the caller's sum or a
    fresh tensor.
    """

    def __init__(self, graphs: GradientGraphs | None) -> None:
        self.graphs = graphs

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A tensor of ``shape`` with ``like``'s dtype and device, its values undefined: a view
        of the kept buffer ``name`` when it is large enough, else a new one (kept if admitted)."""
        numel = 1
        for size in shape:
            numel *= size
        graphs = self.graphs
        kept = graphs.buffers.get(name) if graphs is not None else None
        same = kept is not None and kept.dtype == like.dtype and kept.device == like.device
        if kept is not None and same and kept.numel() >= numel:
            return kept[:numel].view(shape)
        new = torch.empty(numel, dtype=like.dtype, device=like.device)
        if graphs is not None and graphs.repeated:
            grown = new.nbytes - (kept.nbytes if kept is not None else 0)
            if graphs.admit(grown, close=False):  # a refusal leaves room for primal passes
                graphs.buffers[name] = new
        return new.view(shape)


def _products(
    layers: list[ChainLayer],
    tensors: dict[str, torch.Tensor],
    loss: SupervisedLoss,
    primal: ChainPrimal,
    first: int,
    vectors: torch.Tensor,
    out: torch.Tensor,
    gauss_newton: bool,
    buffers: Buffers,
) -> None:
    """Add the chunk's summed HVPs of ``vectors`` ``[k, p]`` to ``out`` (a view ``[k, p]``);
    with ``gauss_newton`` the Gauss-Newton products (no term with :math:`e_k`).

    Tangents are ``[k, b, ...]``: a product with a layer's weight is one matrix product over
    ``k * b`` rows, one with a vector's own block of the weight a batched product over the
    ``k`` blocks read in place, and each vector's rows are written into ``out`` in place.
    Convolutions and poolings run as in :mod:`infl.spatial_layers`."""
    k = vectors.shape[0]
    b = primal.outputs.shape[0]
    tangents: list[torch.Tensor | None] = []  # module i's input tangent
    tangent: torch.Tensor | None = None
    for i, layer in enumerate(layers):
        tangents.append(tangent)
        slope = primal.slopes[i]
        kind = layer.kind
        if kind == "linear":
            x = primal.inputs[i]
            tangent = _linear_tangent(layer, tensors, x, tangent, vectors, buffers.take, i)
        elif kind == "conv":
            tangent = _conv_tangent(layer, tensors, primal, i, tangent, vectors, buffers)
        elif tangent is None:
            continue
        elif kind == "pool":
            index = primal.inputs[i]
            assert index is not None  # kept for every pooling
            size = primal.grads[i].shape[2:]
            into = buffers.take(f"t{i}", (k, *index.shape), tangent)
            tangent = pool_tangent(index, tangent, size, into)
        elif kind == "flatten":
            tangent = tangent.reshape(k, b, -1)
        else:
            assert slope is not None  # kept for every activation
            if primal.curves[i] is not None:  # the input tangent is kept
                into = buffers.take(f"a{i}", tangent.shape, tangent)
                tangent = torch.mul(tangent, slope, out=into)
            else:
                tangent = tangent.mul_(slope)
    assert tangent is not None  # a layer owns parameters
    outputs, targets = primal.outputs, primal.targets
    if k > 1:
        outputs = outputs.repeat(k, 1)
        targets = targets.repeat(k, *([1] * (targets.dim() - 1)))
    width = outputs.shape[1]
    et = loss.output_hessian_product(outputs, targets, tangent.reshape(k * b, width))
    et = et.view(k, b, width)
    for i in range(len(layers) - 1, first - 1, -1):
        layer = layers[i]
        kind = layer.kind
        shape = primal.shapes[i]
        if kind == "flatten":
            et = et.reshape(k, *shape)
        elif kind == "pool":
            index = primal.inputs[i]
            assert index is not None  # kept for every pooling
            into = buffers.take(f"p{i}", (k, *shape[:2], shape[2] * shape[3]), et)
            et = pool_input_gradient(index, et, shape[2:], into)
        elif kind == "activation":  # between two trainable layers
            slope = primal.slopes[i]
            assert slope is not None  # kept for every activation
            et = et.mul_(slope)
            curve = primal.curves[i]
            t_in = tangents[i]
            if curve is not None and t_in is not None and not gauss_newton:
                et.add_(t_in * (curve * primal.grads[i]))
        elif kind == "conv":
            t_in = None if gauss_newton else tangents[i]
            held = buffers if i > first else None
            et = _conv_rows_and_back(layer, tensors, primal, i, et, t_in, vectors, out, held)
        else:
            x = primal.inputs[i]
            assert x is not None  # kept for every linear layer
            e = None if gauss_newton else primal.grads[i]
            t_in = tangents[i]
            _linear_rows(layer, tensors, x, e, et, t_in, vectors, out)
            if i > first:
                # the rows read the input tangent for the last time: its memory takes the
                # tangent of the gradient at the same input (half the tangents' memory, fewer
                # page faults)
                in_shape = _in(x, et)
                back = t_in if t_in is not None else buffers.take(f"e{i}", in_shape, et)
                et = _linear_back(layer, tensors, e, et, vectors, back)


def _conv_tangent(
    layer: ChainLayer,
    tensors: dict[str, torch.Tensor],
    primal: ChainPrimal,
    i: int,
    t_in: torch.Tensor | None,
    vectors: torch.Tensor,
    buffers: Buffers,
) -> torch.Tensor | None:
    """A convolution's output tangent ``[k, b, O, H', W']``, ``None`` when zero
    (:func:`~infl.spatial_layers.conv_tangent`)."""
    if t_in is None and not layer.owns_parameters:
        return None
    conv = primal.convs[i]
    assert conv is not None  # kept for every convolution
    k = vectors.shape[0]
    out_shape = primal.grads[i].shape
    o = out_shape[1]
    into = buffers.take(f"t{i}", (k, out_shape[0], o, out_shape[2] * out_shape[3]), vectors)
    d_weight = _conv_block(layer, tensors, vectors)
    d_bias = None if layer.bias is None else vectors[:, layer.bias : layer.bias + o]
    return conv_tangent(conv, t_in, d_weight, d_bias, into).view(k, *out_shape)


def _conv_block(
    layer: ChainLayer, tensors: dict[str, torch.Tensor], flat: torch.Tensor
) -> torch.Tensor | None:
    """Each row's block of a convolution's weight, ``[k, O, C, k_h k_w]`` (a view of ``flat``
    ``[k, p]``), or ``None`` when the weight is not trainable."""
    if layer.weight is None:
        return None
    weight = tensors[layer.names()[0]]
    return _weight_block(layer, weight, flat).view(flat.shape[0], *weight.shape[:2], -1)


def _conv_rows_and_back(
    layer: ChainLayer,
    tensors: dict[str, torch.Tensor],
    primal: ChainPrimal,
    i: int,
    et: torch.Tensor,
    t_in: torch.Tensor | None,
    vectors: torch.Tensor,
    out: torch.Tensor,
    buffers: Buffers | None,
) -> torch.Tensor:
    """Add a convolution's rows of the products to ``out``
    (:func:`~infl.spatial_layers.conv_rows`) and, with ``buffers``, return the tangent of
    the gradient at its input (:func:`~infl.spatial_layers.conv_back`; else ``et``).
    ``t_in`` is ``None`` for the Gauss-Newton products."""
    conv = primal.convs[i]
    assert conv is not None  # kept for every convolution
    k, b, o = et.shape[:3]
    et = et.reshape(k, b, o, -1)
    rows = _conv_block(layer, tensors, out)
    bias_rows = None if layer.bias is None else out[:, layer.bias : layer.bias + o]
    conv_rows(conv, et, t_in, rows, bias_rows)
    if buffers is None:
        return et
    # the rows have read the input tangent for the last time: its memory takes the result
    if t_in is not None and t_in.is_contiguous():
        into = t_in
    else:
        into = buffers.take(f"e{i}", (k, *primal.shapes[i]), et)
    d_weight = None if t_in is None else _conv_block(layer, tensors, vectors)
    return conv_back(conv, et, d_weight, into)


def _weight_block(layer: ChainLayer, weight: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Each row's block of the layer's weight, ``[k, out, in]``: a view of ``flat`` ``[k, p]``."""
    assert layer.weight is not None
    block = flat[:, layer.weight : layer.weight + weight.numel()]
    return block.view(flat.shape[0], *weight.shape)


def _in(x: torch.Tensor, et: torch.Tensor) -> tuple[int, int, int]:
    """The shape ``[k, b, in]`` of the tangent at the input ``x`` ``[b, in]``."""
    return (et.shape[0], et.shape[1], x.shape[1])


def _linear_tangent(
    layer: ChainLayer,
    tensors: dict[str, torch.Tensor],
    x: torch.Tensor | None,
    t_in: torch.Tensor | None,
    vectors: torch.Tensor,
    take: Callable[[str, tuple[int, ...], torch.Tensor], torch.Tensor],
    index: int,
) -> torch.Tensor | None:
    """The layer's output tangent ``[k, b, out]``: :math:`W \\dot t + dW\\,t + dc`, written
    into ``take(f"t{index}", ...)``; ``None`` when all three are zero."""
    assert x is not None  # kept for every linear layer
    weight = tensors[layer.names()[0]]
    k = vectors.shape[0]
    b, (o, n_in) = x.shape[0], weight.shape
    if t_in is None and layer.weight is None and layer.bias is None:
        return None
    new = take(f"t{index}", (k, b, o), vectors)
    if t_in is not None:
        torch.mm(t_in.view(k * b, n_in), weight.T, out=new.view(k * b, o))
    if layer.weight is not None:
        d_weight = _weight_block(layer, weight, vectors).transpose(1, 2)
        if t_in is None:
            torch.bmm(x.expand(k, b, n_in), d_weight, out=new)
        else:
            new.baddbmm_(x.expand(k, b, n_in), d_weight)
    if layer.bias is not None:
        d_bias = vectors[:, layer.bias : layer.bias + o].unsqueeze(1)
        if t_in is None and layer.weight is None:
            new.copy_(d_bias.expand(k, b, o))
        else:
            new.add_(d_bias)
    return new


def _linear_rows(
    layer: ChainLayer,
    tensors: dict[str, torch.Tensor],
    x: torch.Tensor,
    e: torch.Tensor | None,
    et: torch.Tensor,
    t_in: torch.Tensor | None,
    vectors: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Add the layer's rows of the HVPs to ``out``: :math:`\\dot e\\, t^T + e\\, \\dot t^T`
    for the weight, :math:`\\dot e` for the bias (summed over the examples); without the
    second term when ``e`` is ``None`` (Gauss-Newton)."""
    weight = tensors[layer.names()[0]]
    k = vectors.shape[0]
    b, (o, n_in) = x.shape[0], weight.shape
    if layer.weight is not None:
        rows = _weight_block(layer, weight, out)  # the same view of out
        rows.baddbmm_(et.transpose(1, 2), x.expand(k, b, n_in))
        if t_in is not None and e is not None:
            rows.baddbmm_(e.T.expand(k, o, b), t_in)
    if layer.bias is not None:
        out[:, layer.bias : layer.bias + o] += et.sum(1)


def _linear_back(
    layer: ChainLayer,
    tensors: dict[str, torch.Tensor],
    e: torch.Tensor | None,
    et: torch.Tensor,
    vectors: torch.Tensor,
    back: torch.Tensor,
) -> torch.Tensor:
    """The tangent of the gradient at the layer's input, written into ``back`` ``[k, b, in]``:
    :math:`W^T \\dot e + dW^T e` (the first term alone when ``e`` is ``None``)."""
    weight = tensors[layer.names()[0]]
    k, b, o = et.shape
    torch.mm(et.view(k * b, o), weight, out=back.view(k * b, -1))
    if layer.weight is not None and e is not None:
        back.baddbmm_(e.expand(k, b, o), _weight_block(layer, weight, vectors))
    return back
