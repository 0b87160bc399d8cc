"""Convolutions and max-pooling in the hand-run chain, as matrix products.

A ``nn.Conv2d`` (one group, zero padding) is a linear layer applied at every output position
:math:`l` to the patch :math:`U_{:,l}` of its input: :math:`t_{:,l} = W U_{:,l} + c`, ``W``
the weight viewed ``[O, I]`` (:math:`I = C\\,k_h k_w`), the patches ``[b, I, L]``
(``F.unfold``). Patches are a fixed linear map of the input plane, :math:`U_{(c,q),l} =
\\sum_h x_{c,h} S_{h,q,l}` (:func:`unfold_matrix`: ``S`` ``[H W, k_h k_w, L]``, zero padding
included), so the chain's derivatives (:mod:`infl.sequential_chain`, :mod:`infl.chain_hvp`)
carry over:

* tangent :math:`\\dot t = M \\dot x + dW\\,U + dc`, with :math:`M` ``[O L, C H W]`` the
  layer's dense matrix (:math:`M_{(o,l),(c,h)} = \\sum_q W_{o,c,q} S_{h,q,l}`);
* gradient at the input :math:`M^T e`, its tangent :math:`M^T \\dot e + \\sum_{o,q}
  dW_{o,c,q} E_{(b,h),(o,q)}` with :math:`E_{(b,h),(o,q)} = \\sum_l S_{h,q,l}\\, e_{b,o,l}`
  (the gradient's patches, :attr:`ConvPrimal.gradient_patches`);
* the layer's rows of :math:`H v`: :math:`\\sum_{b,l} \\dot e\\, U^T + \\sum_{b,h} \\dot x\\,
  E` for the weight, :math:`\\sum_{b,l} \\dot e` for the bias.

``M`` and ``E`` are made once per primal pass, so that a product is six matrix products per
convolution with no ``unfold`` or ``fold`` of a tangent: on a CPU those loop over the
examples (0.9-1.0 ms for 256 planes of 12x4x4, against 0.28 ms for the layer's largest matrix
product). ``M`` has :math:`O L \\times C H W` entries, more than the convolution's
:math:`O L \\times C k_h k_w` weights read: the chain runs a convolution with an input tangent
by hand while ``M`` has at most :data:`DENSE_ENTRIES` entries (small planes, as in the digits
CNN), and leaves the model to autograd otherwise.

A ``nn.MaxPool2d`` is, at a given input, the selection of each window's argmax (the index
PyTorch's own backward routes to, ties included): its tangent is a gather at those indices,
its adjoint a scatter-add, and its second derivative zero. ``nn.Flatten`` is a reshape.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input

__all__ = [
    "DENSE_ENTRIES",
    "ConvPrimal",
    "conv_back",
    "conv_forward",
    "conv_input_gradient",
    "conv_rows",
    "conv_tangent",
    "pool_forward",
    "pool_input_gradient",
    "pool_tangent",
    "spatial_layer_supported",
    "unfold_matrix",
    "with_gradient",
]

DENSE_ENTRIES = 1 << 22
"""Most entries of a convolution's dense matrix ``M`` (``[O L, C H W]``) for the chain to run
a convolution with an input tangent by hand (16 MiB in float32)."""


def spatial_layer_supported(module: nn.Module) -> bool:
    """Whether the chain runs ``module`` by hand: a ``Conv2d`` with one group, zero padding
    given as numbers; a ``MaxPool2d`` that returns no indices; a ``Flatten`` of every
    dimension after the batch's. Other settings leave the model to autograd."""
    if type(module) is nn.Conv2d:
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
    if type(module) is nn.MaxPool2d:
        return not module.return_indices
    if type(module) is nn.Flatten:
        return module.start_dim == 1 and module.end_dim == -1
    return False


@dataclass(frozen=True)
class ConvPrimal:
    """What a convolution's products read from the primal pass: its input's patches, one
    column per example and position ``[I, b L]`` (column ``j L + l``: example ``j`` at
    position ``l``), and, for a convolution with an input tangent, its dense matrix ``M``
    ``[O L, C H W]`` and the gradient's patches transposed, ``E^T`` ``[O k_h k_w, b H W]``
    (only for the Hessian's terms in the gradient). Measured on the digits CNN's first
    convolution (``I = 9``, one thread): the rows' product with the patches' columns read
    transposed took 137 µs against 371-611 µs with the patches stored as rows."""

    columns: torch.Tensor
    dense: torch.Tensor | None = None
    gradient_patches: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        held = (self.columns, self.dense, self.gradient_patches)
        return sum(t.numel() * t.element_size() for t in held if t is not None)


def _padding(conv: nn.Conv2d) -> tuple[int, ...]:
    """The convolution's padding in numbers (``spatial_layer_supported`` refuses a string)."""
    padding = conv.padding
    assert not isinstance(padding, str)
    return padding


def _out_size(conv: nn.Conv2d, size: tuple[int, ...]) -> tuple[int, int]:
    """The convolution's output height and width for an input of height and width ``size``."""
    dims = []
    for n, k, s, p, d in zip(
        size, conv.kernel_size, conv.stride, _padding(conv), conv.dilation, strict=True
    ):
        dims.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
    return dims[0], dims[1]


def unfold_matrix(
    conv: nn.Conv2d, size: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``S`` ``[H W, k_h k_w, L]``: patch entry ``(q, l)`` of a one-channel ``H x W`` plane is
    :math:`\\sum_h x_h S_{h,q,l}` (zero padding is a zero row)."""
    geometry = (conv.kernel_size, conv.dilation, _padding(conv), conv.stride)
    return _unfold_matrix(geometry, size, dtype, device)


@functools.lru_cache(maxsize=32)
def _unfold_matrix(
    geometry: tuple[tuple[int, ...], ...],
    size: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    kernel, dilation, padding, stride = geometry
    plane = size[0] * size[1]
    basis = torch.eye(plane, dtype=dtype, device=device).view(plane, 1, *size)
    return F.unfold(basis, kernel, dilation, padding, stride)


def conv_forward(
    conv: nn.Conv2d,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    x: torch.Tensor,
    *,
    dense: bool,
) -> tuple[torch.Tensor, ConvPrimal] | None:
    """The convolution's output ``[b, O, H', W']`` and its :class:`ConvPrimal` (with the
    dense matrix when ``dense``); ``None`` when ``dense`` and the matrix would have more than
    :data:`DENSE_ENTRIES` entries."""
    b, c, h, w = x.shape
    out_size = _out_size(conv, (h, w))
    o = weight.shape[0]
    positions = out_size[0] * out_size[1]
    matrix = None
    if dense:
        if o * positions * c * h * w > DENSE_ENTRIES:
            return None
        s = unfold_matrix(conv, (h, w), x.dtype, x.device)
        matrix = torch.einsum("ocq,hql->olch", weight.reshape(o, c, -1), s)
        matrix = matrix.reshape(o * positions, c * h * w)
    patches = F.unfold(x, conv.kernel_size, conv.dilation, _padding(conv), conv.stride)
    out = torch.matmul(weight.view(o, -1), patches)
    if bias is not None:
        out.add_(bias.unsqueeze(1))
    columns = patches.transpose(0, 1).reshape(patches.shape[1], b * positions)
    return out.view(b, o, *out_size), ConvPrimal(columns, matrix)


def with_gradient(
    conv: nn.Conv2d, primal: ConvPrimal, e: torch.Tensor, size: tuple[int, ...]
) -> ConvPrimal:
    """``primal`` with the gradient's patches ``E`` of ``e`` ``[b, O, H', W']`` (the input
    plane ``size = (H, W)``)."""
    s = unfold_matrix(conv, (size[0], size[1]), e.dtype, e.device)
    b, o = e.shape[:2]
    patches = torch.einsum("hql,bol->oqbh", s, e.reshape(b, o, -1))
    return ConvPrimal(primal.columns, primal.dense, patches.reshape(-1, b * s.shape[0]))


def conv_input_gradient(
    conv: nn.Conv2d,
    weight: torch.Tensor,
    primal: ConvPrimal,
    e: torch.Tensor,
    shape: torch.Size,
) -> torch.Tensor:
    """The gradient at the input (``shape`` ``[b, C, H, W]``) from ``e`` ``[b, O, H', W']``:
    :math:`M^T e` (by ``torch.nn.grad.conv2d_input`` without ``M``)."""
    if primal.dense is not None:
        return torch.mm(e.reshape(e.shape[0], -1), primal.dense).view(shape)
    stride, padding, dilation = conv.stride, _padding(conv), conv.dilation
    return conv2d_input(list(shape), weight, e, stride, padding, dilation)


def pool_forward(pool: nn.MaxPool2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled output ``[b, C, H', W']`` and each window's argmax in the flattened input
    plane ``[b, C, H' W']`` (int64)."""
    out, index = F.max_pool2d(
        x,
        pool.kernel_size,
        pool.stride,
        pool.padding,
        pool.dilation,
        ceil_mode=pool.ceil_mode,
        return_indices=True,
    )
    return out, index.flatten(2)


def pool_tangent(
    index: torch.Tensor, t: torch.Tensor, out_size: tuple[int, ...], into: torch.Tensor
) -> torch.Tensor:
    """The output's tangent ``[..., C, H', W']`` (``out_size``) from the input's ``t``
    ``[..., C, H, W]``: each window's argmax entry, gathered into ``into``."""
    flat = t.flatten(-2)
    torch.gather(flat, -1, index.expand(*flat.shape[:-1], index.shape[-1]), out=into)
    return into.view(*t.shape[:-2], *out_size)


def pool_input_gradient(
    index: torch.Tensor, e: torch.Tensor, size: tuple[int, ...], into: torch.Tensor
) -> torch.Tensor:
    """The gradient (or its tangent) at the input ``[..., C, H, W]`` (``size = (H, W)``)
    from ``e`` ``[..., C, H', W']`` at the output: scattered back to the argmax entries
    (added where windows overlap), zero elsewhere, written into ``into``."""
    flat = e.flatten(-2)
    into.zero_().scatter_add_(-1, index.expand(*flat.shape[:-1], index.shape[-1]), flat)
    return into.view(*e.shape[:-2], *size)


def conv_tangent(
    primal: ConvPrimal,
    t_in: torch.Tensor | None,
    d_weight: torch.Tensor | None,
    d_bias: torch.Tensor | None,
    into: torch.Tensor,
) -> torch.Tensor:
    """The output's tangent ``[k, b, O, L]``, written into ``into``: :math:`M \\dot x + dW\\,
    U + dc` (terms with ``None`` left out; at least one given). ``t_in`` ``[k, b, C, H, W]``
    (needs :attr:`ConvPrimal.dense`), ``d_weight`` ``[k, O, I]`` and ``d_bias`` ``[k, O]``
    the vectors' blocks."""
    k, b, o, positions = into.shape
    started = False
    if t_in is not None:
        assert primal.dense is not None  # made for every convolution with an input tangent
        torch.mm(t_in.reshape(k * b, -1), primal.dense.T, out=into.view(k * b, o * positions))
        started = True
    if d_weight is not None:
        # one matrix product over all examples and positions: [k O, I] x [I, b L]
        spread = torch.mm(d_weight.reshape(k * o, -1), primal.columns)
        spread = spread.view(k, o, b, positions).transpose(1, 2)
        if started:
            into.add_(spread)
        else:
            into.copy_(spread)
        started = True
    if d_bias is not None:
        if started:
            into.add_(d_bias.view(k, 1, o, 1))
        else:
            into.copy_(d_bias.view(k, 1, o, 1).expand(k, b, o, positions))
    return into


def conv_rows(
    primal: ConvPrimal,
    et: torch.Tensor,
    t_in: torch.Tensor | None,
    rows: torch.Tensor | None,
    bias_rows: torch.Tensor | None,
) -> None:
    """Add the convolution's rows of the products: to ``rows`` ``[k, O, C, k_h k_w]`` (the
    weight's) :math:`\\sum_{b,l} \\dot e\\, U^T + \\sum_{b,h} \\dot x\\, E` (the second term
    only with ``t_in`` ``[k, b, C, H, W]`` and :attr:`ConvPrimal.gradient_patches`), to
    ``bias_rows`` ``[k, O]`` :math:`\\sum_{b,l} \\dot e`. ``et`` ``[k, b, O, L]`` is the
    tangent of the gradient at the output."""
    k, b, o, positions = et.shape
    if rows is not None:
        # [k O, b L] x [b L, I]: every example and position in one matrix product
        spread = et.transpose(1, 2).reshape(k * o, b * positions)
        rows.view(k, o, -1).add_(torch.mm(spread, primal.columns.T).view(k, o, -1))
        patches = primal.gradient_patches
        if t_in is not None and patches is not None:
            c = t_in.shape[2]
            planes = t_in.reshape(k, b, c, -1).transpose(1, 2).reshape(k * c, -1)
            cross = torch.mm(planes, patches.T).view(k, c, o, -1)  # [k C, b H W] x [b H W, O q]
            rows.add_(cross.transpose(1, 2))
    if bias_rows is not None:
        bias_rows.add_(et.sum((1, 3)))


def conv_back(
    primal: ConvPrimal,
    et: torch.Tensor,
    d_weight: torch.Tensor | None,
    into: torch.Tensor,
) -> torch.Tensor:
    """The tangent of the gradient at the input, written into ``into`` ``[k, b, C, H, W]``:
    :math:`M^T \\dot e + \\sum_{o,q} dW_{o,c,q} E_{(b,h),(o,q)}` (the first term alone without
    ``d_weight`` ``[k, O, C, k_h k_w]`` or :attr:`ConvPrimal.gradient_patches`). ``et``
    ``[k, b, O, L]``."""
    assert primal.dense is not None  # made for every convolution with an input tangent
    k, b, c = into.shape[:3]
    torch.mm(et.reshape(k * b, -1), primal.dense, out=into.view(k * b, -1))
    patches = primal.gradient_patches
    if d_weight is not None and patches is not None:
        # [k C, O q] x [O q, b H W] -> [k, C, b, H W]
        mixed = d_weight.transpose(1, 2).reshape(k * c, patches.shape[0])
        cross = torch.mm(mixed, patches).view(k, c, b, -1)
        into.view(k, b, c, -1).add_(cross.transpose(1, 2))
    return into
