"""Per-example gradients of ``nn.Conv2d`` + ``nn.Linear`` models from one batched backward pass.

For a convolution with weight :math:`W` (``[o, c, kh, kw]``) applied to a batch, example
``i``'s gradient is the weight gradient of the convolution on that example alone,

.. math::

    \\nabla_W f_i = \\sum_t g_{i,t}\\, \\mathrm{patch}_t(a_i)^T, \\qquad
    \\nabla_c f_i = \\sum_t g_{i,t}, \\qquad g_{i,t} = \\partial\\Big(\\sum_j f_j\\Big) /
    \\partial o_{i,t},

with :math:`a_i` the layer's input and :math:`o_{i,t}` its output at location :math:`t`:
exact when example ``i``'s output depends on example ``i``'s input alone. One forward and one
backward pass of the whole batch give every :math:`a_i` and :math:`g_i`; each example's weight
gradient is then PyTorch's own convolution weight-gradient kernel on that example
(``torch.nn.grad.conv2d_weight``), which on a CPU was faster than both ``vmap(grad)`` and the
``unfold`` + batched-product route on every layer of a width-64 CIFAR ResNet
(``benchmarks/bench_conv_grads.py``). ``nn.Linear`` layers in the same model take the outer
products of :mod:`infl.linear_grads`.

:class:`~infl.model.ModelWrapper` uses it, as it uses :mod:`infl.linear_grads`, for models
whose every trainable parameter is the weight or bias of a plain ``nn.Conv2d`` (zero padding)
or ``nn.Linear`` called once per forward pass, and only after checking the first and last rows
of the first batch against the plain autograd gradients of those examples alone. Only the
``[b, p]`` gradients come from here: products and moments without forming them stay
``nn.Linear``-only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

__all__ = ["KERNEL_PER_EXAMPLE_MACS", "ConvPerExampleGradients", "conv_padding"]

KERNEL_PER_EXAMPLE_MACS = 1_000_000
"""A convolution whose weight gradient costs at least this many multiply-adds per example
(``weight.numel() * locations``) takes PyTorch's weight-gradient kernel example by example;
a smaller one one batched product of ``unfold`` patches. Per-example kernel calls cost tens of
microseconds each, which a digits CNN (thousands of multiply-adds per example) cannot
amortise; on a width-64 CIFAR ResNet (millions) they beat the patches' memory traffic."""


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
    if type(module) is nn.Linear:
        return True
    return (
        type(module) is nn.Conv2d
        and module.padding_mode == "zeros"
        and conv_padding(module) is not None
    )


class ConvPerExampleGradients:
    """Exact per-example gradients when every trainable parameter is in a plain ``nn.Conv2d``
    or ``nn.Linear``, at least one of them a convolution.

    Parameters
    ----------
    model
        The module (hooks are added for the duration of a call and removed after it).
    names
        The trainable parameter names, in the order of the flat parameter space.

    Attributes
    ----------
    applicable : bool
        Whether every name is the ``weight`` or ``bias`` of a module whose type is exactly
        ``nn.Conv2d`` (zero padding, any stride, dilation and groups) or ``nn.Linear``, and one
        is a convolution. When ``False`` :meth:`__call__` always returns ``None``.
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.names = names
        self.owner: dict[str, tuple[str, str]] = {}
        layers: dict[str, nn.Module] = {}
        for prefix, module in model.named_modules():
            if not _supported(module):
                continue
            for kind in ("weight", "bias"):
                self.owner[f"{prefix}.{kind}" if prefix else kind] = (prefix, kind)
            layers[prefix] = module
        used = {self.owner[n][0] for n in names if n in self.owner}
        self.layers = {prefix: m for prefix, m in layers.items() if prefix in used}
        self.applicable = all(n in self.owner for n in names) and any(
            isinstance(m, nn.Conv2d) for m in self.layers.values()
        )

    def __call__(
        self,
        evaluate: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        params: dict[str, torch.Tensor],
        batch_size: int,
    ) -> torch.Tensor | None:
        """Per-example gradients ``[b, p]`` of ``evaluate(params)`` (``[b]``), or ``None``.

        ``None`` when the forward pass does not have the expected shape: a layer called other
        than exactly once, a convolution on inputs that are not ``[b, c, h, w]``, a linear
        layer on inputs that are not ``[b, in]``. Cost: one forward and one backward pass of
        the batch, then per example and convolution one weight-gradient kernel (the work of
        the backward pass's, example by example), plus :math:`O(b p)` to write the result.
        """
        recorded = self._record(evaluate, params, batch_size)
        if recorded is None:
            return None
        inputs, out_grads = recorded
        flat = torch.empty(
            batch_size,
            sum(params[n].numel() for n in self.names),
            dtype=next(iter(out_grads.values())).dtype,
            device=next(iter(out_grads.values())).device,
        )
        start = 0
        for name in self.names:
            prefix, kind = self.owner[name]
            layer, a, g = self.layers[prefix], inputs[prefix], out_grads[prefix]
            size = params[name].numel()
            columns = flat[:, start : start + size]
            start += size
            if kind == "bias":
                columns.copy_(g.sum(dim=(2, 3)) if g.dim() == 4 else g)
            elif isinstance(layer, nn.Conv2d):
                try:
                    _conv_weight_grads(layer, a, g, columns)
                except RuntimeError:  # a configuration the kernel refuses: leave it to vmap
                    return None
            else:
                rows = columns.view(batch_size, g.shape[1], a.shape[1])
                torch.mul(g.unsqueeze(2), a.unsqueeze(1), out=rows)
        return flat

    def _record(
        self,
        evaluate: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        params: dict[str, torch.Tensor],
        batch_size: int,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """Each layer's input (detached) and the gradient at its output, or ``None``."""
        seen: dict[str, list[tuple[Any, Any]]] = {prefix: [] for prefix in self.layers}
        handles = []
        for prefix, module in self.layers.items():

            def hook(_mod: nn.Module, args: Any, out: Any, prefix: str = prefix) -> None:
                seen[prefix].append((args[0] if args else None, out))

            handles.append(module.register_forward_hook(hook))
        with torch.enable_grad():
            try:
                leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
                values = evaluate(leaves)
            finally:
                for handle in handles:
                    handle.remove()
            if not isinstance(values, torch.Tensor) or not values.requires_grad:
                return None
            inputs, outputs = {}, {}
            for prefix, calls in seen.items():
                if len(calls) != 1:
                    return None
                a, o = calls[0]
                dims = 4 if isinstance(self.layers[prefix], nn.Conv2d) else 2
                if not (isinstance(a, torch.Tensor) and isinstance(o, torch.Tensor)):
                    return None
                if a.dim() != dims or o.dim() != dims or a.shape[0] != batch_size:
                    return None
                inputs[prefix], outputs[prefix] = a.detach(), o
            order = list(outputs)
            grads = torch.autograd.grad(
                values.sum(),
                [outputs[p] for p in order],
                allow_unused=True,
                materialize_grads=True,
            )
        return inputs, {p: g.detach() for p, g in zip(order, grads, strict=True)}


def _conv_weight_grads(
    conv: nn.Conv2d, inputs: torch.Tensor, out_grads: torch.Tensor, columns: torch.Tensor
) -> None:
    """Write each example's weight gradient of ``conv`` into its row of ``columns``.

    Small layers (under :data:`KERNEL_PER_EXAMPLE_MACS` multiply-adds per example) take one
    batched product of ``unfold`` patches, whose fixed cost is shared by the batch; larger
    ones the weight-gradient kernel example by example, which reads the input in place."""
    padding = conv_padding(conv)
    assert padding is not None  # _supported
    shape = conv.weight.shape
    b, locations = inputs.shape[0], out_grads[0, 0].numel()
    if conv.groups == 1 and shape.numel() * locations < KERNEL_PER_EXAMPLE_MACS:
        patches = F.unfold(
            inputs, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride
        )  # [b, c*kh*kw, L]
        grads = out_grads.reshape(b, shape[0], locations)
        columns.copy_(torch.bmm(grads, patches.transpose(1, 2)).reshape(b, -1))
        return
    for i in range(b):
        weight_grad = conv2d_weight(
            inputs[i : i + 1],
            shape,
            out_grads[i : i + 1],
            stride=conv.stride,
            padding=padding,
            dilation=conv.dilation,
            groups=conv.groups,
        )
        columns[i].copy_(weight_grad.reshape(-1))
