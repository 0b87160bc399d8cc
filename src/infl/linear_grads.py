"""Per-example gradients of ``nn.Linear`` layers from one batched backward pass.

For a linear layer :math:`o = W a + c` applied to a batch, the gradient of example ``i``'s
value :math:`f_i` is the outer product of the gradient at the layer's output and its input:

.. math::

    \\nabla_W f_i = g_i a_i^T,\\qquad \\nabla_c f_i = g_i,\\qquad
    g_i = \\partial \\Big(\\sum_j f_j\\Big) / \\partial o_i,

exact when example ``i``'s output depends on example ``i``'s input alone (an eval-mode model
that does not mix the examples of a batch). One forward and one backward pass of the whole
batch give every :math:`g_i` and :math:`a_i`, then one batched outer product per layer: no
``vmap``, whose per-example backward costs about 2.4x more on the 85k-parameter digits MLP
(``benchmarks/bench_hvp.py``, ``train_grads``).

:class:`~infl.model.ModelWrapper` uses it for models whose every trainable parameter is the
weight or bias of a plain ``nn.Linear`` called once per forward pass on ``[b, in]`` inputs, and
only after checking the first and last rows of the first batch it sees against the plain
autograd gradients of those examples alone (batches of one): a model that mixes the examples of a
batch, or a value that depends on the parameters other than through the layers' outputs, fails
that check and keeps ``vmap``. (The objective's built-in loss on a plain ``nn.Sequential`` of
these layers and element-wise activations, with no hooks, is row by row by construction and is
not checked: :func:`infl.model_checks.rowwise_by_construction`.)

Scoring needs only products of these gradients with a few vectors (inverse-HVPs, a low-rank
basis), and :meth:`LinearPerExampleGradients.products` forms those from the same two passes
without the ``[b, p]`` gradients: for a weight, :math:`V \\cdot g_i a_i^T = g_i^T V a_i`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["Factors", "LinearPerExampleGradients"]

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Per layer prefix, ``(a, g)``: the layer's inputs ``[b, in]`` and the gradients of the summed
per-example values at its outputs ``[b, o]``; example ``i``'s weight gradient is
:math:`g_i a_i^T`, its bias gradient :math:`g_i`."""


class LinearPerExampleGradients:
    """Exact per-example gradients when every trainable parameter is in a plain ``nn.Linear``.

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
        ``nn.Linear`` (subclasses may change ``forward``). When ``False`` :meth:`__call__`
        always returns ``None``.
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.names = names
        self.owner, self.layers = layer_owners(model, names, lambda m: type(m) is nn.Linear)
        self.applicable = all(name in self.owner for name in names)
        self.output_width = 0
        for name in names if self.applicable else []:
            prefix, kind = self.owner[name]
            layer = self.layers[prefix]
            if kind == "weight" and isinstance(layer, nn.Linear):
                self.output_width += layer.out_features

    def products_pay(self, k: int, num_params: int) -> bool:
        """Whether :meth:`products` of ``k`` vectors beats forming ``G`` and multiplying:
        ``2 k O <= p``, with ``O`` the output widths of the layers whose weights are in the
        space. Its work tensors hold ``k O`` numbers per example where ``G`` holds ``p``, and
        both make the same multiply-adds (measured on the 85k digits MLP, ``p / 2O = 81``:
        4.7x faster at ``k = 10``, 1.4x at 50, 0.9x at 100; ``benchmarks/bench_scoring.py``)."""
        return 2 * k * self.output_width <= num_params

    def __call__(
        self,
        evaluate: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        params: dict[str, torch.Tensor],
        batch_size: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Per-example gradients ``[b, p]`` of ``evaluate(params)`` (``[b]``), or ``None``;
        written into ``out`` (``[b, p]``, returned) when given.

        ``None`` when the forward pass does not have the expected shape: a layer called other
        than exactly once, or on inputs that are not ``[b, in]``. Cost: one forward and one
        backward pass of the batch, plus :math:`O(b \\cdot p)` for the outer products.
        """
        factors = self.factors(evaluate, params, batch_size)
        if factors is None:
            return None
        return self.gradients_of(factors, [params[name].numel() for name in self.names], out)

    def gradients_of(
        self, factors: Factors, sizes: list[int], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The ``[b, p]`` gradients of :meth:`__call__` from :meth:`factors` (``sizes``: the
        parameters' numbers of elements, in :attr:`names` order); into ``out`` when given."""
        # each layer's outer products are written straight into their columns of the [b, p]
        # result: building them apart and concatenating moved every byte twice (the result is
        # the largest tensor of a scoring pass: 87 MB per 256 examples of an 85k model)
        first = factors[self.owner[self.names[0]][0]][1]
        b = first.shape[0]
        flat = out
        if flat is None:
            flat = torch.empty(b, sum(sizes), dtype=first.dtype, device=first.device)
        start = 0
        for name, size in zip(self.names, sizes, strict=True):
            prefix, kind = self.owner[name]
            a, g = factors[prefix]
            columns = flat[:, start : start + size]
            start += size
            if kind == "bias":
                columns.copy_(g)
            else:
                rows = columns.view(b, g.shape[1], a.shape[1])
                torch.mul(g.unsqueeze(2), a.unsqueeze(1), out=rows)
        return flat

    def products(
        self,
        evaluate: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        params: dict[str, torch.Tensor],
        batch_size: int,
        vectors: torch.Tensor,
    ) -> torch.Tensor | None:
        """``vectors @ G^T`` (``[k, b]``) for the per-example gradients ``G`` (``[b, p]``) of
        :meth:`__call__`, without forming ``G``; ``None`` where :meth:`__call__` gives ``None``.

        For a weight :math:`W` (``[o, i]``) with rows :math:`V_j` of ``vectors`` reshaped to
        ``[o, i]``, :math:`V_j \\cdot (g_x a_x^T) = g_x^T V_j a_x`: one matrix product
        :math:`V_j A^T` (``[o, b]``) per layer and a sum over ``o`` against the output gradients,
        the same multiply-adds as ``vectors @ G^T`` without the :math:`b \\cdot p` outer products
        written and read back (when that pays: :meth:`products_pay`). The work tensor is at
        most ``[i, o, b]`` per layer (row blocks of ``i``), never larger than that layer's
        columns of ``G``. Computed in ``vectors.dtype``.
        """
        factors = self.factors(evaluate, params, batch_size)
        if factors is None:
            return None
        return self.products_of(factors, vectors)

    def products_of(self, factors: Factors, vectors: torch.Tensor) -> torch.Tensor:
        """``vectors @ G^T`` (``[k, b]``) from :meth:`factors` (see :meth:`products`)."""
        k, dtype = vectors.shape[0], vectors.dtype
        b = next(iter(factors.values()))[1].shape[0]
        out = torch.zeros(k, b, dtype=dtype, device=vectors.device)
        start = 0
        for name in self.names:
            prefix, kind = self.owner[name]
            a, g = (t.to(dtype) for t in factors[prefix])
            size = g.shape[1] if kind == "bias" else g.shape[1] * a.shape[1]
            block = vectors[:, start : start + size]
            start += size
            if kind == "bias":
                out.addmm_(block, g.T)
                continue
            o, i = g.shape[1], a.shape[1]
            weights = block.reshape(k, o, i)
            step = max(1, i)
            for r in range(0, k, step):
                through_inputs = torch.matmul(weights[r : r + step], a.T)  # [rows, o, b]
                # the sum over o by broadcasting: 2-3x faster than einsum's batched product
                # (k = 2, o = 5, b = 120: 8 against 20 us; k = 10, o = 128, b = 256: 0.5 / 1.5 ms)
                out[r : r + step] += (through_inputs * g.T).sum(1)
        return out

    def moments(
        self,
        evaluate: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        params: dict[str, torch.Tensor],
        batch_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(sum over the batch of G's rows [p], sum of their squared norms [1])`` for the
        per-example gradients ``G`` of :meth:`__call__`, in float64, without forming ``G``;
        ``None`` where :meth:`__call__` gives ``None``.

        A weight's rows sum to :math:`\\sum_x g_x a_x^T` (one matrix product) and its part of
        example ``x``'s squared norm is :math:`\\|g_x\\|^2 \\|a_x\\|^2`; a bias contributes
        :math:`\\sum_x g_x` and :math:`\\|g_x\\|^2`.
        """
        factors = self.factors(evaluate, params, batch_size)
        if factors is None:
            return None
        return self.moments_of(factors)

    def moments_of(self, factors: Factors) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum of G's rows [p], sum of their squared norms [1])`` in float64 from
        :meth:`factors` (see :meth:`moments`)."""
        parts = []
        device = next(iter(factors.values()))[1].device
        squares = torch.zeros(1, dtype=torch.float64, device=device)
        for name in self.names:
            prefix, kind = self.owner[name]
            a, g = (t.to(torch.float64) for t in factors[prefix])
            g_sq = (g * g).sum(dim=1)
            if kind == "bias":
                parts.append(g.sum(dim=0))
                squares += g_sq.sum()
            else:
                parts.append((g.T @ a).reshape(-1))
                squares += g_sq @ (a * a).sum(dim=1)
        return torch.cat(parts), squares

    def factors(
        self,
        evaluate: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        params: dict[str, torch.Tensor],
        batch_size: int,
    ) -> Factors | None:
        """Per layer, ``(a, g)``: its inputs ``[b, i]`` and the gradients at its outputs
        ``[b, o]`` (one forward and one backward pass), or ``None`` (see :meth:`__call__`)."""
        with torch.enable_grad():
            found = output_gradients(self.record(evaluate, params, batch_size))
        if found is None:
            return None
        inputs, grads = found
        return {prefix: (inputs[prefix], grads[prefix]) for prefix in inputs}

    def record(
        self,
        evaluate: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        params: dict[str, torch.Tensor],
        batch_size: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """``evaluate`` on fresh leaves, recording each layer's call: ``(value, inputs [b, i]
        (detached), outputs [b, o] (in the graph))`` per layer prefix, or ``None`` (see
        :meth:`__call__`). Call it under ``torch.enable_grad()`` to differentiate the value."""
        if not self.applicable:
            return None
        return record_layer_calls(
            self.layers,
            evaluate,
            params,
            lambda _m, a, o: a.dim() == 2 and o.dim() == 2 and a.shape[0] == batch_size,
        )


def layer_owners(
    model: nn.Module, names: list[str], supported: Callable[[nn.Module], bool]
) -> tuple[dict[str, tuple[str, str]], dict[str, nn.Module]]:
    """``(owner, layers)``: ``owner[name] = (module prefix, "weight" | "bias")`` for the
    parameters of every ``supported`` module, and the modules (by prefix) that own one of
    ``names``."""
    owner: dict[str, tuple[str, str]] = {}
    layers: dict[str, nn.Module] = {}
    for prefix, module in model.named_modules():
        if supported(module):
            for kind in ("weight", "bias"):
                owner[f"{prefix}.{kind}" if prefix else kind] = (prefix, kind)
            layers[prefix] = module
    used = {owner[n][0] for n in names if n in owner}
    return owner, {prefix: m for prefix, m in layers.items() if prefix in used}


def output_gradients(
    recorded: tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """From :func:`record_layer_calls`'s ``(value, inputs, outputs)``: ``(inputs, gradients of
    the summed value at each layer's output)``, one backward pass; ``None`` passes through."""
    if recorded is None:
        return None
    values, inputs, outputs = recorded
    order = list(outputs)
    grads = torch.autograd.grad(
        values.sum(), [outputs[p] for p in order], allow_unused=True, materialize_grads=True
    )
    return inputs, {p: g.detach() for p, g in zip(order, grads, strict=True)}


def record_layer_calls(
    layers: dict[str, nn.Module],
    evaluate: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: dict[str, torch.Tensor],
    accepts: Callable[[nn.Module, torch.Tensor, torch.Tensor], bool],
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """``evaluate`` on fresh leaves with temporary forward hooks on ``layers``: ``(value,
    inputs (detached), outputs (in the graph))`` per layer prefix, or ``None`` when the value
    is not a tensor that depends on the parameters, or a layer was not called exactly once
    on tensors that ``accepts(module, input, output)``. Call it under
    ``torch.enable_grad()`` to differentiate the value."""
    seen: dict[str, list[tuple[Any, Any]]] = {prefix: [] for prefix in layers}
    handles = []
    for prefix, module in layers.items():

        def hook(_mod: nn.Module, args: Any, out: Any, prefix: str = prefix) -> None:
            seen[prefix].append((args[0] if args else None, out))

        handles.append(module.register_forward_hook(hook))
    try:
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        values = evaluate(leaves)
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(values, torch.Tensor) or not values.requires_grad:
        return None  # constant in the parameters: leave it to vmap
    inputs, outputs = {}, {}
    for prefix, calls in seen.items():
        if len(calls) != 1:
            return None
        a, o = calls[0]
        if not (isinstance(a, torch.Tensor) and isinstance(o, torch.Tensor)):
            return None
        if not accepts(layers[prefix], a, o):
            return None
        inputs[prefix], outputs[prefix] = a.detach(), o
    return values, inputs, outputs
