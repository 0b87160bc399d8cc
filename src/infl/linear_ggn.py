"""The dense Gauss-Newton matrix of an ``nn.Linear`` model from per-example Kronecker factors.

For a layer :math:`z = W a + c` the output Jacobian of example ``i`` with respect to
:math:`W` is :math:`B_i \\otimes a_i^T`, with :math:`B_i = \\partial f_i / \\partial z_i`
(``[K, o]`` for ``K`` outputs). So a block of :math:`G = \\frac1n \\sum_i J_i^T H_i J_i` between
the weights of layers ``l`` and ``m`` is

.. math::

    G_{W_l W_m}[(r, s), (r', s')] = \\frac1n \\sum_i C_i[r, r']\\, a_{l,i}[s]\\, a_{m,i}[s'],
    \\qquad C_i = B_{l,i}^T H_i B_{m,i},

one matrix product of ``[o_l o_m, b]`` by ``[b, i_l i_m]`` per chunk: ``b p_l p_m``
multiply-adds where the product of output Jacobians :func:`infl.second_order.dense_ggn` forms
takes ``b K p_l p_m``. Biases take :math:`C_i a` and :math:`C_i` alone.

:func:`linear_ggn` is used by :func:`~infl.second_order.dense_ggn` for models whose every
trainable parameter is in a plain ``nn.Linear``
(:class:`~infl.linear_grads.LinearPerExampleGradients`) and whose output is ``[b, K]``.
:func:`~infl.second_order.dense_ggn` checks the result against one Gauss-Newton-vector product
and recomputes it from the Jacobians if they differ (a model that mixes the examples of a
batch, or whose output depends on the parameters other than through the layers).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from infl.data import Batch, batch_size
from infl.losses import SupervisedLoss

if TYPE_CHECKING:
    from infl.model import ModelWrapper

__all__ = ["MAX_JACOBIAN_OUTPUTS", "linear_ggn"]

MAX_JACOBIAN_OUTPUTS = 256
"""Models with more outputs per example get their dense Gauss-Newton matrix from products, not
from per-example Jacobians or factors (``K`` backward passes and ``[b, K, p]`` Jacobians or
``[b, K, K]`` output Hessians per chunk)."""


def linear_ggn(
    wrapper: ModelWrapper,
    batches: Iterable[Batch],
    loss: SupervisedLoss,
    index: torch.Tensor,
) -> tuple[torch.Tensor, int] | None:
    """``(total, count)``: :math:`\\sum_i J_i^T H_i J_i` restricted to ``index`` (``[q, q]``,
    summed over the ``count`` examples of ``batches``, one chunk at a time; not averaged, no
    weight decay), or ``None`` where the model is not a stack of ``nn.Linear`` layers called
    once each on ``[b, in]`` inputs with ``[b, K]`` outputs.

    ``index`` holds flat parameter indices; only the parameters it touches are formed.
    """
    linear = wrapper._linear_grads
    if not linear.applicable:
        return None
    wanted = torch.zeros(wrapper.num_params, dtype=torch.bool)
    wanted[index.cpu()] = True
    start, ranges = 0, {}
    for name, size in zip(wrapper.names, wrapper.numels, strict=True):
        ranges[name] = (start, size)
        start += size
    names = [n for n in wrapper.names if bool(wanted[ranges[n][0] : sum(ranges[n])].any())]
    local, width = {}, 0
    for name in names:
        local[name] = width
        width += ranges[name][1]
    total = torch.zeros(width, width, dtype=wrapper.dtype, device=wrapper.device)
    count = 0
    for batch in batches:
        factors = _factors(wrapper, batch, loss)
        if factors is None:
            return None
        inputs, jacobians, h_out = factors
        count += batch_size(batch)
        cores: dict[tuple[str, str], torch.Tensor] = {}  # C_i of a layer pair, for every kind
        for i, n1 in enumerate(names):
            first, kind_1 = linear.owner[n1]
            for n2 in names[i:]:
                second, kind_2 = linear.owner[n2]
                if (first, second) not in cores:
                    cores[first, second] = torch.einsum(
                        "bkr,bkj,bjs->brs", jacobians[first], h_out, jacobians[second]
                    )
                block = _block(
                    cores[first, second], (inputs[first], kind_1), (inputs[second], kind_2)
                )
                r, c = local[n1], local[n2]
                total[r : r + block.shape[0], c : c + block.shape[1]] += block
                if n2 != n1:
                    total[c : c + block.shape[1], r : r + block.shape[0]] += block.T
    position = torch.full((wrapper.num_params,), -1, dtype=torch.long)
    for name in names:
        begin, size = ranges[name]
        position[begin : begin + size] = torch.arange(local[name], local[name] + size)
    rows = position[index.cpu()].to(total.device)
    return total[rows][:, rows], count


def _factors(
    wrapper: ModelWrapper, batch: Batch, loss: SupervisedLoss
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor] | None:
    """Per layer its inputs ``[b, i]`` and output Jacobians ``B`` ``[b, K, o]``, and the
    output Hessians ``[b, K, K]``; ``None`` when the forward pass is not of that shape."""
    inputs_, targets = loss.split(batch)
    b = int(targets.shape[0]) if isinstance(targets, torch.Tensor) else None
    if b is None:
        return None
    with torch.enable_grad():
        recorded = wrapper._linear_grads.record(
            lambda params: wrapper.functional_model(params)(inputs_), wrapper.params, b
        )
        if recorded is None:
            return None
        outputs, inputs, layer_outputs = recorded
        if outputs.dim() != 2 or outputs.shape[0] != b or outputs.shape[1] > MAX_JACOBIAN_OUTPUTS:
            return None
        order = list(layer_outputs)
        per_output = [
            torch.autograd.grad(
                outputs[:, k].sum(),
                [layer_outputs[prefix] for prefix in order],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            for k in range(outputs.shape[1])
        ]
    jacobians = {
        prefix: torch.stack([grads[j] for grads in per_output], dim=1).detach()
        for j, prefix in enumerate(order)
    }
    out = outputs.detach()
    basis = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
    columns = [
        loss.output_hessian_product(out, targets, basis[c].expand_as(out))
        for c in range(out.shape[1])
    ]
    return inputs, jacobians, torch.stack(columns, dim=-1)


def _block(
    core: torch.Tensor,
    left: tuple[torch.Tensor, str],
    right: tuple[torch.Tensor, str],
) -> torch.Tensor:
    """The block of :math:`\\sum_i J_i^T H_i J_i` between one parameter of layer ``l`` and one
    of layer ``m`` from :math:`C_i = B_{l,i}^T H_i B_{m,i}` (``core``, ``[b, o_l, o_m]``) and
    each side's ``(inputs [b, i], "weight" or "bias")`` (weights flattened row-major)."""
    a_l, kind_l = left
    a_m, kind_m = right
    batch, o_l, o_m = core.shape
    if kind_l == "bias" and kind_m == "bias":
        return core.sum(dim=0)
    if kind_l == "bias":  # [o_l, o_m i_m]
        return torch.einsum("brq,bs->rqs", core, a_m).reshape(o_l, -1)
    if kind_m == "bias":  # [o_l i_l, o_m]
        return torch.einsum("brq,bs->rsq", core, a_l).reshape(-1, o_m)
    i_l, i_m = a_l.shape[1], a_m.shape[1]
    outer = (a_l.unsqueeze(2) * a_m.unsqueeze(1)).reshape(batch, i_l * i_m)
    product = core.reshape(batch, o_l * o_m).T @ outer  # [o_l o_m, i_l i_m]
    return product.reshape(o_l, o_m, i_l, i_m).permute(0, 2, 1, 3).reshape(o_l * i_l, o_m * i_m)
