"""The gradient of mean cross-entropy for a Linear/ReLU/Tanh MLP, without the autograd engine.

The fragility study trains its Iris MLPs with tens of thousands of full-batch steps, each a
forward pass, a backward pass and an SGD update on a few dozen parameters. There the autograd
engine's bookkeeping costs more than the arithmetic. :class:`MlpCrossEntropyGradient` computes

.. math::

    \\nabla_\\theta \\frac1n\\sum_{i=1}^n -\\log \\mathrm{softmax}(f(x_i;\\theta))_{y_i}

for an ``nn.Sequential`` of ``nn.Linear`` layers (with bias) separated by ``nn.ReLU`` or
``nn.Tanh``, by calling the kernels autograd itself calls for these layers, in the same order
and on tensors of the same layout:

* forward: ``addmm(c, a, W^T)`` per layer, ``relu``/``tanh``, ``_log_softmax``;
* backward from :math:`1`: ``nll_loss_backward`` (mean, ``ignore_index=-100``; it does not
  depend on the log-probabilities, so it is computed once for the full batch's targets),
  ``_log_softmax_backward_data``, then per layer :math:`\\nabla_c = \\sum_i \\delta_i`
  (``sum`` over the batch), :math:`\\nabla_W = \\delta^T a` (``mm``), :math:`\\delta
  \\leftarrow \\delta W` (``mm``) and ``threshold_backward`` / ``tanh_backward``.

So the result equals ``torch.autograd.grad`` bit for bit; :meth:`MlpCrossEntropyGradient.check`
verifies that on the first step (a torch version that computes any of these differently fails
the check, and the caller keeps autograd). Cost: the same kernels, about 2.3x less time per
gradient on the study's Iris MLP (no graph is recorded or walked).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MlpCrossEntropyGradient"]

_aten = torch.ops.aten
_MEAN = 1  # at::Reduction::Mean
_IGNORE_INDEX = -100  # F.cross_entropy's default


class MlpCrossEntropyGradient:
    """``torch.autograd.grad(F.cross_entropy(model(x), y), params)``, engine-free.

    Parameters
    ----------
    model
        Applicable when it is exactly an ``nn.Sequential`` of ``nn.Linear`` layers with bias
        separated by single ``nn.ReLU`` / ``nn.Tanh`` layers, starting and ending with an
        ``nn.Linear``.
    params
        The parameters to differentiate, which must be every parameter of ``model`` in
        ``parameters()`` order (weight, bias per layer). They are held, not looked up on each
        call: updating them in place is seen, replacing a layer's parameter objects is not
        (build a new instance then).

    Attributes
    ----------
    applicable : bool
        Whether the model has that form. When ``False``, :meth:`__call__` must not be used.
    """

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor]) -> None:
        self.layers = list(model) if type(model) is nn.Sequential else []
        self.applicable = self._qualifies(model, params)
        self._seed: tuple[torch.Tensor, torch.Tensor, int] | None = None
        # per nn.Linear: W, W^T (a view, so it follows in-place updates of W), c, and the
        # activation after it (True: ReLU, False: Tanh, None: the output layer)
        self._plan: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool | None]] = []
        if self.applicable:
            for j in range(0, len(params), 2):
                after = self.layers[j + 1] if j + 1 < len(self.layers) else None
                relu = None if after is None else type(after) is nn.ReLU
                weight = params[j]
                self._plan.append((weight, weight.t(), params[j + 1], relu))

    def _qualifies(self, model: nn.Module, params: Sequence[torch.Tensor]) -> bool:
        layers = self.layers
        if not layers or len(layers) % 2 == 0:
            return False
        for k, layer in enumerate(layers):
            if k % 2 == 0:
                if type(layer) is not nn.Linear or layer.bias is None:
                    return False
            elif type(layer) not in (nn.ReLU, nn.Tanh):
                return False
        every = list(model.parameters())
        return len(every) == len(params) and all(a is b for a, b in zip(every, params, strict=True))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The gradient, one tensor per parameter (``x``: ``[n, in]`` inputs, ``y``: ``[n]``
        class indices)."""
        with torch.no_grad():
            return self.without_grad_mode(x, y)

    def without_grad_mode(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`__call__` for a caller already under ``torch.no_grad()`` (a training loop
        enters it once instead of once per step)."""
        h = x
        inputs: list[torch.Tensor] = []  # of each nn.Linear
        outputs: list[torch.Tensor] = []  # of each activation
        for _, weight_t, bias, relu in self._plan:
            inputs.append(h)
            h = torch.addmm(bias, h, weight_t)
            if relu is not None:
                h = torch.relu(h) if relu else torch.tanh(h)
                outputs.append(h)
        logp = torch._log_softmax(h, 1, False)
        d = _aten._log_softmax_backward_data(self._loss_seed(logp, y), logp, 1, logp.dtype)
        grads: list[torch.Tensor] = []
        for j in range(len(self._plan) - 1, -1, -1):
            weight, _, _, relu = self._plan[j]
            if relu is not None:
                if relu:
                    d = _aten.threshold_backward(d, outputs[j], 0)
                else:
                    d = _aten.tanh_backward(d, outputs[j])
            grads.append(d.sum([0], keepdim=True).view(-1))  # bias (autograd's sum_to)
            grads.append(d.t().mm(inputs[j]))  # weight
            if j > 0:
                d = d.mm(weight)
        return grads[::-1]

    def _loss_seed(self, logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``nll_loss_backward`` from 1: :math:`-1/n` at each example's class, 0 elsewhere.

        It depends on the targets and the shape only, not on the log-probabilities, so it is
        computed once per ``y`` (the study's full batch) and reused on every step."""
        if self._seed is not None:
            seed, targets, version = self._seed
            same = targets is y and version == y._version  # and not modified in place
            if same and seed.shape == logp.shape and seed.dtype == logp.dtype:
                return seed
        loss, total = _aten.nll_loss_forward(logp, y, None, _MEAN, _IGNORE_INDEX)
        seed = _aten.nll_loss_backward(
            torch.ones_like(loss), logp, y, None, _MEAN, _IGNORE_INDEX, total
        )
        self._seed = (seed, y, y._version)
        return seed

    def check(self, x: torch.Tensor, y: torch.Tensor, reference: Sequence[torch.Tensor]) -> bool:
        """Whether :meth:`__call__` gives ``reference`` (autograd's gradient) bit for bit."""
        if not self.applicable:
            return False
        try:
            mine = self(x, y)
        except (RuntimeError, TypeError, ValueError):  # a kernel signature torch changed
            return False
        return len(mine) == len(reference) and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(mine, reference, strict=True)
        )
