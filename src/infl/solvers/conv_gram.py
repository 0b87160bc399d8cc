"""The patch Gram matrix of a stride-1 convolution from shifted correlations of its input.

K-FAC's input factor of a convolution sums the outer products of its ``unfold`` patches,

.. math::

    A = \\sum_i \\sum_t a_{i,t} a_{i,t}^T, \\qquad
    a_{i,t}[(c, k)] = \\tilde x_i[c,\\ t + d \\odot k],

(:math:`\\tilde x` the zero-padded input, :math:`k` a kernel offset, :math:`d` the dilation,
rows ordered as ``weight.reshape(out, -1)``): :math:`2 b T (C K)^2` flops for ``b`` examples,
``T`` output pixels and ``K = kh·kw`` taps. With stride 1 the block of taps :math:`(k, k')` is
a correlation of the input with itself at the shift :math:`\\delta = d \\odot (k' - k)`, taken
over the input pixels :math:`u = t + d \\odot k` that tap ``k`` reads:

.. math::

    A_{k k'} = \\sum_i \\sum_{u \\in U_k} x_i[u]\\, \\hat x_i[u + \\delta]^T
    = F_\\delta - \\sum_{u \\in \\bar U_k} x_i[u]\\, \\hat x_i[u + \\delta]^T,
    \\qquad F_\\delta = \\sum_i \\sum_{u} x_i[u]\\, \\hat x_i[u + \\delta]^T,

(:math:`\\hat x` zero outside the image, :math:`u` over the image's pixels). :math:`U_k` is the
image minus a few rows and columns at its borders (:math:`\\bar U_k`; none for the centre tap of
a ``"same"`` convolution), so each block is one full correlation :math:`F_\\delta` less a few
one-pixel-wide strips (rows plus columns minus their crossings). :math:`K^2` blocks share
:math:`(2k_h-1)(2k_w-1)` shifts, and :math:`F_{-\\delta} = F_\\delta^T`: a 3x3 kernel needs 13
correlations of ``2 b H W C²`` flops instead of the 81 blocks of the patch product, and no
``unfold`` copy of the input (9 times its size for 3x3). The strips cost ``O(b (H + W) C²)``
per border row or column, each shared by the tap pairs that need it. The result is the patch
product's, up to round-off.

The correlations read one copy of the input, channel-major, the examples end to end, each
image followed by zero rows and each row by zero columns (:class:`_Layout`): there a shift is
a constant flat offset, so every :math:`F_\\delta` is one ``[C, N] @ [N, C]`` product of two
views of the same memory (``N`` covers the zeros too, which add nothing).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from infl.layer_grads import conv_padding

__all__ = [
    "MAX_MACS_RATIO",
    "MIN_PATCH_MACS",
    "applies",
    "output_size",
    "patch_gram",
    "patch_sums",
    "prefer",
]

MIN_PATCH_MACS = 100_000_000
"""Below this many multiply-adds of the patch product the fixed cost of the correlations'
~100 small operations outweighs their saving (``benchmarks/bench_conv_gram.py``: a
12-channel 3x3 convolution on 4x4 inputs, 256 examples, 48M multiply-adds, 3.3-3.8 ms by
``unfold`` against 3.9-4.5 ms by correlation)."""

MAX_MACS_RATIO = 0.5
"""The correlations are used when they need at most this fraction of the multiply-adds of the
full patch product (``unfold``'s route computes 5/8 to all of it, :func:`~infl.solvers.
kronecker._gram_edges`). Measured by ``benchmarks/bench_conv_gram.py`` (256 examples,
float32, one thread): 64 channels of 8x8, at an estimated 0.30, 2.2x faster; 256 channels of
4x4, at 0.48, 1.2x faster."""


Pair = tuple[int, int]


def applies(conv: nn.Module) -> bool:
    """Whether :func:`patch_gram` computes ``conv``'s patch Gram: a plain ``nn.Conv2d`` with
    stride 1, one group and symmetric zero padding."""
    return (
        type(conv) is nn.Conv2d
        and tuple(conv.stride) == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv_padding(conv) is not None
    )


@dataclass(frozen=True)
class _Plan:
    """What :func:`patch_gram` computes for one input size and convolution geometry.

    ``pairs``: each tap pair ``(a, a2)``, ``a <= a2`` in row-major order (block ``(a2, a)``
    is the transpose), with its shift and the input rows and columns tap ``a`` never reads;
    ``correlations``: the distinct shifts of the pairs (the lexicographically non-negative
    half, 13 of the 25 for 3x3); ``strips``: each border row, column or pixel (a crossing of
    the two) with the shifts it is needed at.
    """

    taps: int
    pairs: list[tuple[int, int, Pair, list[int], list[int]]]
    correlations: list[Pair]
    strips: dict[tuple[str, Any], list[Pair]]
    margins: Pair

    def macs(self, b: int, c: int, h: int, w: int) -> int:
        """Multiply-adds of the products: ``b C^2`` times the pixels each one covers."""
        mr, mc = self.margins
        pixels = len(self.correlations) * (h + mr) * (w + mc)
        sizes = {"row": w, "col": h, "pixel": 1}
        pixels += sum(sizes[kind] * len(set(d)) for (kind, _), d in self.strips.items())
        return b * c * c * pixels


@functools.lru_cache(maxsize=256)
def _plan(size: Pair, kernel: Pair, dilation: Pair, padding: Pair) -> _Plan | None:
    (h, w), (kh, kw), (dr, dc), (pr, pc) = size, kernel, dilation, padding
    h_out, w_out = h + 2 * pr - dr * (kh - 1), w + 2 * pc - dc * (kw - 1)
    if h_out <= 0 or w_out <= 0:
        return None
    taps = [(i, j) for i in range(kh) for j in range(kw)]
    rows = [_excluded(i, dr, pr, h, h_out) for i in range(kh)]
    cols = [_excluded(j, dc, pc, w, w_out) for j in range(kw)]
    pairs: list[tuple[int, int, Pair, list[int], list[int]]] = []
    correlations: list[Pair] = []
    strips: dict[tuple[str, Any], list[Pair]] = {}
    for a, (i, j) in enumerate(taps):
        for a2 in range(a, len(taps)):
            i2, j2 = taps[a2]
            delta = (dr * (i2 - i), dc * (j2 - j))
            pairs.append((a, a2, delta, rows[i], cols[j]))
            if delta not in correlations:
                correlations.append(delta)
            for row in rows[i]:
                strips.setdefault(("row", row), []).append(delta)
                for col in cols[j]:
                    strips.setdefault(("pixel", (row, col)), []).append(delta)
            for col in cols[j]:
                strips.setdefault(("col", col), []).append(delta)
    margins = (dr * (kh - 1), dc * (kw - 1))
    return _Plan(len(taps), pairs, correlations, strips, margins)


def _plan_of(x: torch.Tensor, conv: nn.Conv2d) -> _Plan | None:
    padding = conv_padding(conv)
    assert padding is not None
    kernel = (int(conv.kernel_size[0]), int(conv.kernel_size[1]))
    dilation = (int(conv.dilation[0]), int(conv.dilation[1]))
    return _plan((x.shape[2], x.shape[3]), kernel, dilation, padding)


def _excluded(tap: int, dilation: int, padding: int, size: int, size_out: int) -> list[int]:
    """The input rows (or columns) that tap ``tap`` never reads: outside
    ``[tap·d - p, tap·d - p + size_out)``."""
    start = tap * dilation - padding
    return [r for r in range(size) if not start <= r < start + size_out]


def prefer(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether :func:`patch_gram` is the cheaper way to ``conv``'s patch Gram on ``x``
    (``[b, C, H, W]``; needs :func:`applies`): the patch product would take at least
    :data:`MIN_PATCH_MACS` multiply-adds and the correlations at most
    :data:`MAX_MACS_RATIO` of them."""
    plan = _plan_of(x, conv)
    if plan is None:
        return False
    b, c, h, w = x.shape
    h_out, w_out = output_size(x, conv)
    patch = b * h_out * w_out * (c * plan.taps) ** 2
    return patch >= MIN_PATCH_MACS and plan.macs(b, c, h, w) <= MAX_MACS_RATIO * patch


def patch_gram(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """:math:`\\sum_i \\sum_t a_{i,t} a_{i,t}^T` over ``conv``'s patches of ``x`` (``[b, C, H,
    W]``), as ``[C K, C K]`` in the order of ``weight.reshape(out, -1)`` (no bias column).

    Equal, up to round-off, to ``P^T P`` for the ``[b L, C K]`` rows of ``F.unfold``; needs
    :func:`applies`. Cost: ``(2k_h-1)(2k_w-1)/2`` products of ``[C, N]`` by ``[N, C]`` with
    ``N = b (H + m_h)(W + m_w)`` (``m = d (k - 1)``), and one product per border row, column
    and corner pixel that some tap does not read (``_Plan.macs``).
    """
    c = x.shape[1]
    plan = _plan_of(x, conv)
    if plan is None:
        k = conv.kernel_size[0] * conv.kernel_size[1]
        return x.new_zeros(c * k, c * k)
    layout = _Layout(x, *plan.margins)
    correlations = {delta: layout.correlation(delta) for delta in plan.correlations}
    strips = {key: layout.strips(*key, deltas) for key, deltas in plan.strips.items()}
    k = plan.taps
    blocks = x.new_empty(k, k, c, c)
    for a, a2, delta, rows, cols in plan.pairs:
        block = correlations[delta].clone()
        for row in rows:
            block -= strips[("row", row)][delta]
            for col in cols:
                block += strips[("pixel", (row, col))][delta]
        for col in cols:
            block -= strips[("col", col)][delta]
        blocks[a, a2] = block
        if a2 != a:
            blocks[a2, a] = block.T
    return blocks.permute(2, 0, 3, 1).reshape(c * k, c * k)


class _Layout:
    """The examples' images one after another in a zero buffer ``[C, total]`` (channel-major),
    each followed by ``m_h`` zero rows and each row by ``m_w`` zero columns.

    Pixel ``(r, s)`` of example ``i`` sits at ``origin + i·R·P + r·P + s`` (``R = H + m_h``,
    ``P = W + m_w``), so a shift ``delta`` is the flat offset ``delta_r·P + delta_s``, and a
    pixel shifted by at most ``(m_h, m_w)`` lands on its own image or on zeros: a column left
    of the first wraps to the zero columns that end the row above, a row above the first to the
    zero rows that end the previous image (or the buffer's leading zeros).
    """

    def __init__(self, x: torch.Tensor, mr: int, mc: int) -> None:
        b, c, h, w = x.shape
        self.b, self.c, self.h, self.w = b, c, h, w
        self.pitch = w + mc
        self.stride = (h + mr) * self.pitch  # one example
        self.origin = mr * self.pitch + mc
        self.length = b * self.stride  # every pixel of every image, with their zeros
        self.total = self.origin + self.length + mr * self.pitch + mc
        self.flat = x.new_zeros(c, self.total)
        self.view((b, h, w), (self.stride, self.pitch, 1), 0).copy_(x.transpose(0, 1))

    def view(self, shape: tuple[int, ...], strides: tuple[int, ...], at: int) -> torch.Tensor:
        """``[C, *shape]`` view of the buffer from flat position ``origin + at``."""
        return self.flat.as_strided((self.c, *shape), (self.total, *strides), self.origin + at)

    def offset(self, delta: Pair) -> int:
        return delta[0] * self.pitch + delta[1]

    def correlation(self, delta: Pair) -> torch.Tensor:
        """:math:`F_\\delta`, ``[C, C]``: one product over every pixel of the buffer."""
        first = self.view((self.length,), (1,), 0)
        second = self.view((self.length,), (1,), self.offset(delta))
        return first @ second.T

    def strips(self, kind: str, where: Any, shifts: list[Pair]) -> dict[Pair, torch.Tensor]:
        """``{delta: sum over the strip's pixels u of x[u] x[u + delta]^T}`` for one image row
        (``kind="row"``, ``where`` its index), column (``"col"``) or pixel (``"pixel"``,
        ``(row, col)``) of every example: one product for all ``shifts``."""
        shape: tuple[int, ...]
        strides: tuple[int, ...]
        if kind == "row":
            shape, strides, at = (self.b, self.w), (self.stride, 1), where * self.pitch
        elif kind == "col":
            shape, strides, at = (self.b, self.h), (self.stride, self.pitch), where
        else:
            shape, strides = (self.b,), (self.stride,)
            at = where[0] * self.pitch + where[1]
        unique = list(dict.fromkeys(shifts))
        first = self.view(shape, strides, at).reshape(self.c, -1)
        second = torch.cat(
            [self.view(shape, strides, at + self.offset(d)).reshape(self.c, -1) for d in unique]
        )
        products = (first @ second.T).split(self.c, dim=1)
        return dict(zip(unique, products, strict=True))


def output_size(x: torch.Tensor, conv: nn.Conv2d) -> tuple[int, int]:
    """``(H', W')``: the output pixels of ``conv`` on ``x`` (any stride)."""
    padding = conv_padding(conv)
    assert padding is not None
    sizes = []
    for size, pad, d, k, s in zip(
        x.shape[2:], padding, conv.dilation, conv.kernel_size, conv.stride, strict=True
    ):
        sizes.append(max((size + 2 * pad - d * (k - 1) - 1) // s + 1, 0))
    return sizes[0], sizes[1]


def patch_sums(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """:math:`\\sum_i \\sum_t a_{i,t}` (``[C K]``): the bias row of K-FAC's factor, from one
    ``unfold`` of the examples' summed image."""
    padding = conv_padding(conv)
    assert padding is not None
    summed = x.sum(0, keepdim=True)
    patches = F.unfold(
        summed, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride
    )
    return patches.sum((0, 2))
