"""The exact Hessian of an ``nn.Sequential`` of ``nn.Linear`` layers and element-wise
activations, in closed form.

For one example, let the model's modules map :math:`t_0 = x` to :math:`t_k = m_k(t_{k-1})`
(a linear layer :math:`t_k = W_k t_{k-1} + c_k`, or an activation
:math:`t_k = \\sigma_k(t_{k-1})` applied element by element), with output :math:`f = t_L`
and loss :math:`\\ell(f)`. Write :math:`T_k = \\partial t_k / \\partial\\theta`
(``[d_k, p]``, carried forward: :math:`T_k = W_k T_{k-1}` plus the layer's own columns, or
:math:`\\sigma_k' \\odot T_{k-1}`) and :math:`e_k = \\partial \\ell / \\partial t_k` (carried
backward). Differentiating :math:`\\ell` twice along a direction and collecting terms,

.. math::

    \\nabla^2_\\theta \\ell = T_L^T H_{out} T_L
      + \\sum_{k\\,\\in\\,\\text{act.}} T_{k-1}^T \\,\\mathrm{diag}\\big(e_k \\odot
        \\sigma_k''(t_{k-1})\\big)\\, T_{k-1}
      + \\sum_{k\\,\\in\\,\\text{lin.}} \\big(E_k + E_k^T\\big),
    \\qquad E_k[(r, s), :] = e_k[r]\\; T_{k-1}[s, :],

where :math:`E_k` fills the rows of :math:`W_k`'s entries (the term
:math:`2\\, e_k^T\\, dW_k\\, dt_{k-1}` of the second differential) and :math:`H_{out}` is the
loss's Hessian in the outputs. Piecewise-linear activations (ReLU, leaky ReLU, ReLU6, hard
tanh) have :math:`\\sigma'' = 0` and add nothing. The mean over the examples plus
:math:`\\Lambda` is the Hessian of the training objective.

Every term is one matrix product over a chunk of examples, where assembling the matrix from
``p`` Hessian-vector products runs ``p`` vmapped forward-over-reverse passes. The work grows
as ``b p^2`` times :math:`K + 2 + \\sum d_k` over the smooth activations (``d_k`` their
widths, ``K`` the outputs), so it pays where that sum is small (:data:`MAX_ROWS`) and ``p``
is below :data:`~infl.structured_hessian.STRUCTURED_MIN_PARAMS`, where the alternative is
``p`` products. Measured (``benchmarks/bench_dense_hessian.py --closed-form``, one thread,
float64): 3.1x faster than the products on the Iris MLP (``p = 43``, sum 5), 1.5x on a
64-8-10 ReLU MLP of the digits (``p = 610``, 1,438 examples, sum 12), 0.7x on its tanh
version (sum 20); at ``p = 1,210`` the structured route (Kronecker Gauss-Newton matrix plus a
few HVP columns) beat it 2.4x on the ReLU MLP.

:func:`sequential_hessian` applies where the structure makes this exact:
:func:`infl.model_checks.rowwise_by_construction` (the objective's built-in loss, a plain
``nn.Sequential`` of exactly ``nn.Linear`` and element-wise activation modules, no hooks),
every trainable parameter a weight or bias of one of those layers, ``[b, in]`` inputs and
``[b, K]`` outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from infl.data import Batch, IndexedData
from infl.factor_cache import FitFactors, factors_nbytes
from infl.linear_ggn import MAX_JACOBIAN_OUTPUTS
from infl.linear_grads import Factors
from infl.losses import SupervisedLoss
from infl.sequential_chain import ChainLayer, chain_layers, derivatives, output_derivatives

if TYPE_CHECKING:
    from infl.model import ModelWrapper

__all__ = ["MAX_ROWS", "sequential_hessian"]

MAX_ROWS = 12
"""The closed form is used when :math:`K + 2 + \\sum d_k` (smooth activations) is at most this,
its ``b p^2`` work factor: the products' time matched a factor of about 14 to 17 on the
digits MLPs of the module docstring."""

_WORK_BYTES = 1 << 28
"""Bytes of forward Jacobians ``T_k`` a chunk may hold (its examples are cut to fit)."""

_BROADCAST_MAX_OUTPUTS = 8
"""Up to this many outputs, ``H_out T_L`` is one broadcast product, not ``b`` small ones."""


def sequential_hessian(
    wrapper: ModelWrapper,
    data: IndexedData | Batch,
    chunk_size: int,
    *,
    keep_bytes: int = 0,
    max_rows: int = MAX_ROWS,
) -> tuple[torch.Tensor, FitFactors | None] | None:
    """:math:`\\frac1n \\sum_i \\nabla^2 \\ell(z_i) + \\Lambda` (``[p, p]``, symmetric) by the
    closed form of the module docstring, and the training gradients' factors it computed
    on the way; ``None`` where it does not apply (the model or loss is not of that form,
    inputs are not ``[b, in]``, more than :data:`~infl.linear_ggn.MAX_JACOBIAN_OUTPUTS`
    outputs, or a work factor over ``max_rows``).

    Parameters
    ----------
    wrapper
        The model's functional view (the objective's loss and weight decay).
    data
        The training data, or one batch.
    chunk_size
        Examples per chunk (fewer where a chunk's forward Jacobians would exceed
        ``_WORK_BYTES``).
    keep_bytes
        Keep every chunk's layer inputs and output gradients, the training gradients'
        :data:`~infl.linear_grads.Factors` (:class:`~infl.factor_cache.FitFactors`), while
        they fit in this many bytes, when ``data`` is an :class:`~infl.data.IndexedData`
        read in chunks of ``chunk_size`` and each layer runs once; else the factors are
        ``None``.
    max_rows
        The largest work factor :math:`K + 2 + \\sum d_k` to take (:data:`MAX_ROWS`).

    Returns
    -------
    (matrix, factors)
        The Hessian of the training objective and the kept factors (or ``None``).

    Notes
    -----
    Cost: per example :math:`O(p^2 (K + 2 + \\sum_{smooth} d_k))` multiply-adds in matrix
    products; memory ``p^2`` plus the forward Jacobians of a chunk.
    """
    layers = chain_layers(wrapper, wrapper.objective.per_example_loss)
    if layers is None:
        return None
    loss = wrapper.objective.per_example_loss
    assert isinstance(loss, SupervisedLoss)  # rowwise_by_construction
    p = wrapper.num_params
    item = torch.finfo(wrapper.dtype).bits // 8
    widths = sum(int(getattr(layer.module, "out_features", 0)) for layer in layers)
    per_example = max(1, 2 * (widths + 1) * p * item)
    step = max(1, min(chunk_size, _WORK_BYTES // per_example))
    tensors = {**wrapper.fixed, **wrapper.params}
    total = torch.zeros(p, p, dtype=wrapper.dtype, device=wrapper.device)
    chunks = data.chunks(step) if isinstance(data, IndexedData) else [(0, data)]
    prefixes = [layer.prefix for layer in layers if layer.owns_parameters]
    keep = (
        keep_bytes > 0
        and isinstance(data, IndexedData)
        and step == chunk_size
        and len(set(prefixes)) == len(prefixes)
    )
    kept: dict[int, Factors] = {}
    batches: dict[int, Batch] = {}
    count, held = 0, 0
    for start, raw in chunks:
        batch = wrapper.prepare(raw)
        inputs, targets = loss.split(batch)
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2:
            return None
        factors = _add_chunk(total, layers, tensors, loss, inputs, targets, p, max_rows)
        if factors is None:
            return None
        count += inputs.shape[0]
        held += factors_nbytes(factors)
        keep = keep and held <= keep_bytes
        if keep:
            kept[start], batches[start] = factors, batch
    if count == 0:
        return None
    total /= count
    total.diagonal().add_(wrapper.decay)
    found = None
    if keep:
        assert isinstance(data, IndexedData)  # keep
        found = FitFactors(chunk_size, data, wrapper, kept, batches)
    return (total + total.T) / 2, found


def _add_chunk(
    total: torch.Tensor,
    layers: list[ChainLayer],
    tensors: dict[str, torch.Tensor],
    loss: SupervisedLoss,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    p: int,
    max_rows: int,
) -> Factors | None:
    """Add the summed Hessians of one chunk's examples to ``total`` and return the chunk's
    training-gradient factors (of the layers that own trainable parameters); ``None`` where
    the closed form turns out not to apply (too many outputs or rows)."""
    b = inputs.shape[0]
    t, jac = inputs, None  # t_k [b, d] and T_k [b, d, p] (None: not a function of theta)
    # per module: its input's Jacobian, and for an activation sigma' and sigma'' (or None)
    saved: list[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]] = []
    rows = 2
    layer_inputs: list[torch.Tensor] = []  # of the linear layers, in order
    for layer in layers:
        if layer.linear:
            weight, bias = layer.names()
            w, c = tensors[weight], tensors.get(bias)
            saved.append((jac, None, None))
            layer_inputs.append(t)
            out = F.linear(t, w, c)
            if jac is None:
                new = torch.zeros(b, w.shape[0], p, dtype=t.dtype, device=t.device)
            else:
                new = torch.matmul(w, jac)
            if layer.weight is not None:
                own = new[:, :, layer.weight : layer.weight + w.numel()]
                own.view(b, w.shape[0], w.shape[0], w.shape[1]).diagonal(0, 1, 2).add_(
                    t.unsqueeze(2)
                )
            if layer.bias is not None:
                new[:, :, layer.bias : layer.bias + w.shape[0]].diagonal(0, 1, 2).add_(1)
            t, jac = out, new
            continue
        y, slope, curve = derivatives(layer.module, t, layer.smooth)
        if curve is not None:
            rows += t.shape[1]
        if rows > max_rows:
            return None
        saved.append((jac, slope, curve))
        t = y
        jac = None if jac is None else slope.unsqueeze(2) * jac
    outputs = t
    k = outputs.shape[1]
    rows += k
    if jac is None or k > MAX_JACOBIAN_OUTPUTS or rows > max_rows:
        return None
    e, h_out = output_derivatives(loss, outputs, targets, hessian=True)
    assert h_out is not None  # hessian=True
    if k <= _BROADCAST_MAX_OUTPUTS:  # a batch of tiny matrix products is slower
        curved = (h_out.unsqueeze(3) * jac.unsqueeze(1)).sum(2)
    else:
        curved = torch.bmm(h_out, jac)
    total.addmm_(jac.reshape(b * k, p).T, curved.reshape(b * k, p))
    factors: Factors = {}
    for layer, (jac_in, first, second) in zip(reversed(layers), reversed(saved), strict=True):
        if layer.linear:
            w = tensors[layer.names()[0]]
            t_in = layer_inputs.pop()
            if layer.owns_parameters:
                factors[layer.prefix] = (t_in, e)
            if layer.weight is not None and jac_in is not None:
                cross = (e.T @ jac_in.reshape(e.shape[0], -1)).reshape(w.numel(), p)
                block = slice(layer.weight, layer.weight + w.numel())
                total[block] += cross
                total[:, block] += cross.T
            e = e @ w
            continue
        if second is not None and jac_in is not None:
            scaled = (e * second).unsqueeze(2) * jac_in
            total.addmm_(jac_in.reshape(-1, p).T, scaled.reshape(-1, p))
        assert first is not None  # saved for every activation
        e = e * first
    return factors
