"""Per-example gradients of convolutional and normalised models from one batched backward pass.

Every trainable parameter of the layers below enters the model only through its layer's
output, and for one example that output depends on that example's input alone. One forward
pass of the whole batch records each layer's input :math:`a_i`, one backward pass gives the
gradient :math:`g_i = \\partial(\\sum_j f_j)/\\partial o_i` at its output, and example ``i``'s
gradient follows in closed form:

* ``nn.Conv2d`` (zero padding, any stride, dilation and groups):
  :math:`\\nabla_W f_i = \\sum_t g_{i,t}\\,\\mathrm{patch}_t(a_i)^T` over the output locations
  :math:`t`, :math:`\\nabla_c f_i = \\sum_t g_{i,t}` — narrow layers by one convolution with
  the batch as groups, wide ones by PyTorch's weight-gradient kernel example by example
  (:data:`GROUPED_MAX_INPUTS`);
* ``nn.Linear`` on ``[b, in]`` or ``[b, ..., in]``: :math:`\\sum_t g_{i,t} a_{i,t}^T` and
  :math:`\\sum_t g_{i,t}`;
* ``nn.GroupNorm``, ``nn.LayerNorm`` and ``nn.BatchNorm2d`` in eval mode with running
  statistics (affine): :math:`\\nabla_\\gamma f_i = \\sum g_i \\odot \\hat a_i`,
  :math:`\\nabla_\\beta f_i = \\sum g_i` over the positions that share a :math:`\\gamma`, with
  :math:`\\hat a_i` the layer's normalised input (recomputed without the affine part).

:class:`~infl.model.ModelWrapper` uses it for models whose every trainable parameter is in
such a layer, one of them not a plain ``nn.Linear`` on ``[b, in]`` (those models take
:mod:`infl.linear_grads`, which also multiplies without forming the gradients), and only
after checking the first and last rows of the first batch against the plain autograd
gradients of those examples alone: a model that mixes the examples of a batch keeps
``vmap``. The ``[b, p]`` gradients come from here, and their products with a few vectors
(:meth:`LayerPerExampleGradients.products`), which form each layer's columns a few examples at
a time into one reused buffer (:data:`SLICE_BYTES`, :class:`SliceBuffers`) instead of the
whole ``[b, p]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

from infl.linear_grads import layer_owners, output_gradients, record_layer_calls

__all__ = [
    "GROUPED_MAX_INPUTS",
    "SLICE_BYTES",
    "LayerPerExampleGradients",
    "SliceBuffers",
    "conv_padding",
    "conv_weight_grads",
    "example_slices",
]

GROUPED_MAX_INPUTS = 288
"""A convolution whose filters read at most this many inputs each (``c/groups * kh * kw``; 288
is 32 channels of 3x3) gets its per-example weight gradients from one convolution with the
batch as groups; a wider one from PyTorch's weight-gradient kernel example by example. On a
CPU the grouped call was 1.7-10x faster for 3-32 channels and 1.4-2x slower for 64-256
(width-16/64 CIFAR ResNets, digits CNN; ``benchmarks/bench_conv_grads.py``)."""

SLICE_BYTES = 64 << 20
"""Per-example gradients that are only multiplied (:meth:`LayerPerExampleGradients.products`,
EK-FAC's eigenvalue pass) are formed a few examples at a time, into a buffer of about this size
reused by every slice and layer. Forming a chunk's ``[b, p]`` at once writes fresh memory
(1.25 GB for ``b = 256`` on a 1.2M-parameter ResNet), and on a CPU the first write of fresh
pages costs more than the products: one thread, that ResNet's per-example gradients of 256
examples took 2.9-3.5 s into a new ``[b, p]`` and 1.7 s into a reused one."""

NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)


def example_slices(b: int, row_elements: int, dtype: torch.dtype) -> list[slice]:
    """``b`` examples in slices of at most :data:`SLICE_BYTES` of ``row_elements`` each (at
    least one example per slice)."""
    step = max(1, min(b, SLICE_BYTES // max(1, row_elements * dtype.itemsize)))
    return [slice(lo, min(lo + step, b)) for lo in range(0, b, step)]


class SliceBuffers:
    """``count`` buffers that the slices of :func:`example_slices` are formed into, reused by
    every slice and layer (and every chunk, while the object lives), grown when a layer needs
    more and never shrunk."""

    def __init__(self, count: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.buffers: list[torch.Tensor | None] = [None] * count

    def get(self, which: int, rows: slice, shape: tuple[int, ...]) -> torch.Tensor:
        """Buffer ``which`` as a ``[len(rows), *shape]`` tensor (its contents undefined)."""
        count = (rows.stop - rows.start) * math.prod(shape)
        buffer = self.buffers[which]
        if buffer is None or buffer.numel() < count:
            buffer = torch.empty(count, dtype=self.dtype, device=self.device)
            self.buffers[which] = buffer
        return buffer[:count].view(-1, *shape)


def conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Explicit symmetric padding of ``conv``, or ``None`` when no ``(ph, pw)`` expresses it
    (an asymmetric ``"same"``)."""
    pad = conv.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0)
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(t % 2 for t in totals):
            return None
        return (totals[0] // 2, totals[1] // 2)
    return (int(pad[0]), int(pad[1]))


def _supported(module: nn.Module) -> bool:
    kind = type(module)
    if kind is nn.Linear:
        return True
    if kind is nn.Conv2d:
        assert isinstance(module, nn.Conv2d)
        return module.padding_mode == "zeros" and conv_padding(module) is not None
    if kind is nn.BatchNorm2d:  # batch statistics would mix the examples
        assert isinstance(module, nn.BatchNorm2d)
        return module.running_mean is not None and module.running_var is not None
    return kind in NORMS


class LayerPerExampleGradients:
    """Exact per-example gradients when every trainable parameter is in a supported layer.

    Parameters
    ----------
    model
        The module (hooks are added for the duration of a call and removed after it).
    names
        The trainable parameter names, in the order of the flat parameter space.

    Attributes
    ----------
    applicable : bool
        Whether every name is the ``weight`` or ``bias`` of a module whose type is exactly one
        of those of the module docstring, one of them not an ``nn.Linear``. When ``False``
        :meth:`__call__` always returns ``None``.
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.names = names
        self.owner, self.layers = layer_owners(model, names, _supported)
        self.applicable = all(n in self.owner for n in names) and any(
            type(m) is not nn.Linear for m in self.layers.values()
        )

    def __call__(
        self,
        evaluate: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        params: dict[str, torch.Tensor],
        batch_size: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Per-example gradients ``[b, p]`` of ``evaluate(params)`` (``[b]``), or ``None``;
        written into ``out`` (``[b, p]``, returned) when given.

        ``None`` when the forward pass does not have the expected shape (a layer called other
        than exactly once, or not on the batch's examples along dim 0) or a kernel refuses
        the layer. Cost: one forward and one backward pass of the batch, then per convolution
        the work of its weight gradient split by example, plus :math:`O(b p)` for the rest.
        """
        recorded = self._record(evaluate, params, batch_size)
        if recorded is None:
            return None
        inputs, out_grads = recorded
        sizes = [params[n].numel() for n in self.names]
        return self.from_recorded(inputs, out_grads, sizes, out=out)

    def from_recorded(
        self,
        inputs: dict[str, torch.Tensor],
        out_grads: dict[str, torch.Tensor],
        sizes: list[int],
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """``[b, p]`` from each layer's recorded input and output gradient (by layer prefix;
        ``sizes[j]`` the number of elements of ``names[j]``), or ``None`` when a kernel refuses
        a layer; written into ``out`` when given. The inputs must have passed :meth:`accepts`."""
        first = next(iter(out_grads.values()))
        b = first.shape[0]
        flat = out
        if flat is None:
            flat = torch.empty(b, sum(sizes), dtype=first.dtype, device=first.device)
        start = 0
        for name, size in zip(self.names, sizes, strict=True):
            prefix, kind = self.owner[name]
            columns = flat[:, start : start + size]
            start += size
            layer, a, g = self.layers[prefix], inputs[prefix], out_grads[prefix]
            try:
                _layer_grads(layer, kind, a, g, columns)
            except RuntimeError:  # a configuration a kernel refuses: leave it to vmap
                return None
        return flat

    def products(
        self,
        evaluate: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        params: dict[str, torch.Tensor],
        batch_size: int,
        vectors: torch.Tensor,
    ) -> torch.Tensor | None:
        """``vectors @ G^T`` (``[k, b]``, in ``vectors.dtype``) for the per-example gradients
        ``G`` (``[b, p]``) of :meth:`__call__`, or ``None`` where :meth:`__call__` gives
        ``None``.

        The same forward and backward pass and the same kernels as :meth:`__call__`, but each
        layer's columns of ``G`` are formed :func:`example_slices` at a time into one reused
        buffer and multiplied by their columns of ``vectors`` at once: ``G`` is never whole
        (peak memory :data:`SLICE_BYTES`, not ``b p``) and no fresh ``[b, p]`` is written.
        Cost: :meth:`__call__`'s, plus :math:`2 k b p` flops.
        """
        recorded = self._record(evaluate, params, batch_size)
        if recorded is None:
            return None
        inputs, out_grads = recorded
        first = next(iter(out_grads.values()))
        out = torch.zeros(batch_size, vectors.shape[0], dtype=vectors.dtype, device=first.device)
        buffers = SliceBuffers(1, first.dtype, first.device)
        start = 0
        for name in self.names:
            size = params[name].numel()
            block = vectors[:, start : start + size]
            start += size
            prefix, kind = self.owner[name]
            layer, a, g = self.layers[prefix], inputs[prefix], out_grads[prefix]
            for rows in example_slices(batch_size, size, first.dtype):
                columns = buffers.get(0, rows, (size,))
                try:
                    _layer_grads(layer, kind, a[rows], g[rows], columns)
                except RuntimeError:  # a configuration a kernel refuses: leave it to vmap
                    return None
                out[rows].addmm_(columns.to(vectors.dtype), block.T)
        return out.T.contiguous()

    @staticmethod
    def accepts(module: nn.Module, a: torch.Tensor, batch_size: int) -> bool:
        """Whether a call of ``module`` on ``a`` is one the closed forms read: the batch's
        examples along dim 0 (and ``[b, C, H, W]`` images for the 2-d layers)."""
        images = isinstance(module, (nn.Conv2d, nn.BatchNorm2d))
        return a.shape[0] == batch_size and (a.dim() == 4 if images else a.dim() >= 2)

    def _record(
        self,
        evaluate: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        params: dict[str, torch.Tensor],
        batch_size: int,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """Each layer's input (detached) and the gradient at its output, or ``None``."""

        def accepts(module: nn.Module, a: torch.Tensor, _out: torch.Tensor) -> bool:
            return self.accepts(module, a, batch_size)

        with torch.enable_grad():
            return output_gradients(record_layer_calls(self.layers, evaluate, params, accepts))


def _layer_grads(
    layer: nn.Module, kind: str, a: torch.Tensor, g: torch.Tensor, columns: torch.Tensor
) -> None:
    """Write each example's gradient of ``layer.<kind>`` into its row of ``columns``."""
    b = a.shape[0]
    if isinstance(layer, nn.Conv2d):
        if kind == "bias":
            columns.copy_(g.sum(dim=(2, 3)))
        else:
            conv_weight_grads(layer, a, g, columns)
        return
    if isinstance(layer, nn.Linear):
        if kind == "bias":
            columns.copy_(g.reshape(b, -1, g.shape[-1]).sum(dim=1))
        elif a.dim() == 2:
            torch.mul(g.unsqueeze(2), a.unsqueeze(1), out=columns.view(b, g.shape[1], a.shape[1]))
        else:  # [b, ..., in]: sum over the positions
            locs_g, locs_a = g.reshape(b, -1, g.shape[-1]), a.reshape(b, -1, a.shape[-1])
            columns.copy_(torch.bmm(locs_g.transpose(1, 2), locs_a).reshape(b, -1))
        return
    # a normalisation layer: gamma and beta are shared by the positions other than theirs
    shared = _shared_dims(layer, a)
    per_position = g if kind == "bias" else g * _normalised(layer, a)
    # sum(dim=()) would sum over every dim: a [b, d] LayerNorm shares nothing
    columns.copy_((per_position.sum(dim=shared) if shared else per_position).reshape(b, -1))


def _shared_dims(layer: nn.Module, a: torch.Tensor) -> tuple[int, ...]:
    """The dims of the input that share one affine parameter (never the batch dim)."""
    if isinstance(layer, nn.LayerNorm):
        return tuple(range(1, a.dim() - len(layer.normalized_shape)))
    return tuple(range(2, a.dim()))  # per channel: GroupNorm, BatchNorm2d


def _normalised(layer: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """The layer's input normalised as the layer does it, before its affine part."""
    if isinstance(layer, nn.GroupNorm):
        return F.group_norm(a, layer.num_groups, eps=layer.eps)
    if isinstance(layer, nn.LayerNorm):
        return F.layer_norm(a, layer.normalized_shape, eps=layer.eps)
    assert isinstance(layer, nn.BatchNorm2d)
    return F.batch_norm(a, layer.running_mean, layer.running_var, training=False, eps=layer.eps)


def conv_weight_grads(
    conv: nn.Conv2d, inputs: torch.Tensor, out_grads: torch.Tensor, columns: torch.Tensor
) -> None:
    """Write each example's weight gradient :math:`\\sum_t g_{i,t}\\,\\mathrm{patch}_t(a_i)^T`
    of ``conv`` into its row of ``columns``, from the layer's inputs ``[b, C, H, W]`` and
    output gradients ``[b, O, H', W']``, without ``unfold`` (:data:`GROUPED_MAX_INPUTS`
    chooses the route). ``columns`` is ``[b, weight.numel()]`` (the order of
    ``weight.flatten()``) or ``[b, O, weight[0].numel()]``, which may be a view with a row
    stride of its own (the weight part of a ``[b, O, C k_h k_w + 1]`` matrix with a bias
    column)."""
    padding = conv_padding(conv)
    assert padding is not None  # _supported
    shape = conv.weight.shape
    b = inputs.shape[0]
    options: dict[str, Any] = {
        "stride": conv.stride,
        "padding": padding,
        "dilation": conv.dilation,
    }
    if shape[1:].numel() <= GROUPED_MAX_INPUTS:
        # the batch as groups of one convolution: [1, b c, h, w] -> [b o, c, kh, kw]
        grads = conv2d_weight(
            inputs.reshape(1, -1, *inputs.shape[2:]),
            (b * shape[0], *shape[1:]),
            out_grads.reshape(1, -1, *out_grads.shape[2:]),
            groups=b * conv.groups,
            **options,
        )
        columns.copy_(grads.reshape(columns.shape))
        return
    row = columns.shape[1:]
    for i in range(b):
        one = conv2d_weight(
            inputs[i : i + 1], shape, out_grads[i : i + 1], groups=conv.groups, **options
        )
        columns[i].copy_(one.reshape(row))
