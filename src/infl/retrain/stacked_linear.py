"""Gradients of ``R`` stacked runs of a Linear/activation ``nn.Sequential``, by batched products.

:class:`~infl.retrain.batched.BatchedSGD` needs, per step, every run's weighted objective and
its gradient,

.. math::

    V_r(\\theta_r) = \\sum_{i\\in B} w_{ri}\\,\\ell(z_i;\\theta_r),\\qquad
    \\nabla_{\\theta_r} V_r ,\\qquad r = 1..R,

which it gets from ``vmap`` of ``grad_and_value``. On the tiny MLPs of the fragility study
that costs far more in per-call transform overhead than in arithmetic. For a model that is an
``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations, :class:`StackedSequential`
computes the same quantities by hand:

* every tensor of the batch is tiled ``R`` times along its first dimension (example ``i`` of
  run ``r`` at row :math:`rb + i`);
* forward: every ``nn.Linear`` :math:`z = a W^T + c` is one batched product over the runs,
  ``baddbmm(c_r, a_r, W_r^T)`` (:math:`a_r` the rows of run ``r``); an activation acts on the
  stacked tensor as on any batch;
* the loss's derivative in the outputs, :math:`\\delta_{ri} = w_{ri}\\,\\partial\\ell_i/
  \\partial f_{ri}`: in closed form, :math:`w_{ri}(\\mathrm{softmax}(f_{ri}) - e_{y_i})`, for the
  built-in ``"cross_entropy"`` with class-index targets (evaluated classes-major, where
  ``log_softmax`` over a handful of classes is slow), else by autograd through the loss alone
  (called once with a stand-in model on the tiled batch);
* backward by the chain rule, layer by layer: :math:`\\nabla_{W_r} = \\delta_r^T a_r`,
  :math:`\\nabla_{c_r} = \\sum_i \\delta_{ri}`, :math:`\\delta \\leftarrow \\delta W_r` times the
  activation's derivative (closed form for ReLU, LeakyReLU, Tanh, Sigmoid, Identity; autograd
  of the layer alone for the others).

The result equals the vmapped one up to floating-point round-off when the loss treats the
examples of a batch independently (the contract of a per-example loss). The engine checks this
once, on its first evaluation, against ``vmap`` at parameters that differ from run to run, and
keeps ``vmap`` when they disagree (as :mod:`infl.linear_grads` does for per-example gradients).

Cost per evaluation: three batched products per ``nn.Linear`` (two for the first) over
``R b`` examples and a few elementwise passes; no ``torch.func`` transform, and no autograd
graph for the built-in cross-entropy and the closed-form activations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from infl.data import batch_size, tree_map_tensors
from infl.errors import InputError
from infl.losses import PerExampleFn, SupervisedLoss

__all__ = ["AUTOGRAD_ELEMENTWISE", "CLOSED_FORM", "StackedBatch", "StackedSequential"]

Forward = Callable[[torch.Tensor, nn.Module], torch.Tensor]
"""``(input, layer) -> output`` of an elementwise layer."""

Derivative = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, nn.Module], torch.Tensor]
"""``(delta_out, input, output, layer) -> delta_in`` of an elementwise layer."""

_aten = torch.ops.aten


def _slope(layer: nn.Module) -> float:
    assert isinstance(layer, nn.LeakyReLU)
    return layer.negative_slope


CLOSED_FORM: dict[type[nn.Module], tuple[Forward, Derivative]] = {
    nn.ReLU: (lambda x, _: torch.relu(x), lambda d, _x, y, _m: _aten.threshold_backward(d, y, 0)),
    nn.LeakyReLU: (
        lambda x, m: F.leaky_relu(x, _slope(m)),
        lambda d, x, _y, m: _aten.leaky_relu_backward(d, x, _slope(m), False),
    ),
    nn.Tanh: (lambda x, _: torch.tanh(x), lambda d, _x, y, _m: _aten.tanh_backward(d, y)),
    nn.Sigmoid: (lambda x, _: torch.sigmoid(x), lambda d, _x, y, _m: _aten.sigmoid_backward(d, y)),
    nn.Identity: (lambda x, _: x, lambda d, _x, _y, _m: d),
}
"""Elementwise layers with their forward pass and derivative written out (the derivatives are
the kernels autograd itself uses for these layers; inplace flags are ignored: the stacked
forward never overwrites a tensor it still needs)."""

AUTOGRAD_ELEMENTWISE: tuple[type[nn.Module], ...] = (nn.GELU, nn.SiLU, nn.ELU, nn.Softplus)
"""Parameter-free elementwise layers differentiated by autograd of the layer alone."""


def _layers(net: nn.Module) -> list[nn.Module] | None:
    """The layers of ``net`` in call order (nested ``nn.Sequential`` unrolled), or ``None``
    when it is not exactly an ``nn.Sequential`` of supported layers (a subclass may change
    ``forward``, so types must match exactly)."""
    if type(net) is not nn.Sequential:
        return None
    out: list[nn.Module] = []
    for layer in net:
        kind = type(layer)
        if kind is nn.Sequential:
            inner = _layers(layer)
            if inner is None:
                return None
            out += inner
        elif kind is nn.Flatten:
            if not (layer.start_dim == 1 and layer.end_dim == -1):  # must keep examples apart
                return None
            out.append(layer)
        elif kind is nn.Linear or kind in CLOSED_FORM or kind in AUTOGRAD_ELEMENTWISE:
            out.append(layer)
        else:
            return None
    return out


@dataclass
class StackedBatch:
    """A batch prepared for ``runs`` stacked runs (:meth:`StackedSequential.prepare`).

    Attributes
    ----------
    runs, size
        ``R`` and the number of examples ``b``.
    tiled
        The batch with every tensor tiled ``R`` times along dimension 0.
    inputs
        For the closed-form cross-entropy: the inputs, ``[b, in]`` when the first layer is an
        ``nn.Linear`` (one product with all runs' weights side by side), else tiled
        ``[R b, in]``; ``None`` when that path does not apply.
    targets, onehot
        For the closed-form cross-entropy: class indices ``[R, 1, b]`` (for ``gather``) and
        one-hot targets ``[C, b]``.
    """

    runs: int
    size: int
    tiled: Any
    inputs: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    onehot: torch.Tensor | None = None


class _Recorder:
    """The model as the loss sees it on the generic path: runs the stacked forward pass on
    whatever inputs the loss gives it, and returns its output as a leaf to differentiate."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.forward = forward
        self.output: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.output is not None:
            raise InputError("the loss called the model twice; the stacked path needs one call")
        self.output = self.forward(x).detach().requires_grad_(True)
        return self.output


class StackedSequential:
    """Weighted objectives and gradients of ``R`` stacked runs of a Linear/activation MLP.

    Parameters
    ----------
    net
        The model. Applicable when it is exactly an ``nn.Sequential`` (nested ones unrolled)
        of ``nn.Linear``, ``nn.Flatten()`` and elementwise layers (:data:`CLOSED_FORM`,
        :data:`AUTOGRAD_ELEMENTWISE`); its parameters that are not trainable keep the module's
        values, shared by every run.
    params
        The trainable parameters, in the order of the flat parameter space.

    Attributes
    ----------
    applicable : bool
        Whether the model has that form and every trainable parameter is the weight or bias
        of one of its ``nn.Linear`` layers. When ``False``, :meth:`__call__` raises.
    """

    def __init__(self, net: nn.Module, params: Sequence[torch.Tensor]) -> None:
        self.layers = _layers(net) or []
        self.sizes = [p.numel() for p in params]
        self.shapes = [tuple(p.shape) for p in params]
        position = {id(p): k for k, p in enumerate(params)}
        # per layer: (weight, bias), each a position in params, a fixed tensor, or None
        self.slots: list[tuple[int | torch.Tensor | None, int | torch.Tensor | None]] = []
        covered: set[int] = set()
        self.first = len(self.layers)  # the first layer with a trainable parameter
        for k, layer in enumerate(self.layers):
            if type(layer) is not nn.Linear:
                self.slots.append((None, None))
                continue
            pair: list[int | torch.Tensor | None] = []
            for tensor in (layer.weight, layer.bias):
                if tensor is not None and id(tensor) in position:
                    pair.append(position[id(tensor)])
                    covered.add(id(tensor))
                    self.first = min(self.first, k)
                else:
                    pair.append(tensor)
            self.slots.append((pair[0], pair[1]))
        self.applicable = bool(self.layers) and bool(position) and covered == set(position)
        last = [k for k, layer in enumerate(self.layers) if type(layer) is not nn.Identity]
        self.head = last[-1] if last and type(self.layers[last[-1]]) is nn.Linear else None
        self.flat = not any(type(layer) is nn.Flatten for layer in self.layers)
        self._views: tuple[torch.Tensor, list[tuple[Any, Any]]] | None = None

    # -- preparing a batch ------------------------------------------------------------------
    def prepare(self, loss: PerExampleFn, batch: Any, runs: int) -> StackedBatch:
        """Tile ``batch`` for ``runs`` runs; set up the closed-form cross-entropy if it applies
        (the built-in ``"cross_entropy"``, 2-d inputs, class indices in ``0..C-1``)."""

        def tile(t: torch.Tensor) -> torch.Tensor:
            return t if t.dim() == 0 else t.repeat(runs, *([1] * (t.dim() - 1)))

        size = batch_size(batch)
        prepared = StackedBatch(runs, size, tree_map_tensors(tile, batch))
        if not (isinstance(loss, SupervisedLoss) and loss.name == "cross_entropy"):
            return prepared
        if self.head is None or not self.flat:
            return prepared
        try:
            inputs, targets = loss.split(batch)
        except InputError:
            return prepared
        head = self.layers[self.head]
        assert isinstance(head, nn.Linear)
        classes = head.out_features
        if not (
            isinstance(inputs, torch.Tensor)
            and isinstance(targets, torch.Tensor)
            and inputs.dim() == 2
            and targets.dim() == 1
            and not targets.is_floating_point()
            and len(inputs) == len(targets) == size
            and bool(((targets >= 0) & (targets < classes)).all())
        ):
            return prepared
        index = targets.long()
        prepared.inputs = inputs if type(self.layers[0]) is nn.Linear else tile(inputs)
        prepared.targets = index.reshape(1, 1, size).expand(runs, 1, size)
        prepared.onehot = F.one_hot(index, classes).T.to(inputs.dtype)
        return prepared

    # -- the pieces -------------------------------------------------------------------------
    def _weights(self, theta: torch.Tensor) -> list[tuple[Any, Any]]:
        """Each layer's (weight, bias) of every run: views into ``theta`` ``[R, p]``, kept
        for the next call with the same tensor (the batched engine updates it in place)."""
        if self._views is not None and self._views[0] is theta:
            return self._views[1]
        weights = self._split(theta.detach())
        self._views = (theta, weights)
        return weights

    def _split(self, theta: torch.Tensor) -> list[tuple[Any, Any]]:
        runs = theta.shape[0]
        pieces = [
            piece.reshape(runs, *shape)
            for piece, shape in zip(theta.split(self.sizes, dim=1), self.shapes, strict=True)
        ]

        def pick(slot: int | torch.Tensor | None) -> torch.Tensor | None:
            if isinstance(slot, int):
                return pieces[slot]
            if slot is None:
                return None
            return slot.detach().expand(runs, *slot.shape)

        return [(pick(w), pick(b)) for w, b in self.slots]

    def _forward(
        self,
        h: torch.Tensor,
        weights: list[tuple[Any, Any]],
        upto: int,
        runs: int,
        shared: bool,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Layers ``0..upto-1`` on ``h``, ``[R b, ...]`` (or, with ``shared``, ``[b, in]``
        inputs of an ``nn.Linear`` layer 0 that every run shares); returns the output
        ``[R b, ...]`` and, per layer, what its backward pass needs."""
        saved = []
        for k, (layer, (weight, bias)) in enumerate(
            zip(self.layers[:upto], weights[:upto], strict=True)
        ):
            kind = type(layer)
            if k == 0 and shared:
                # the untiled [b, in] inputs, shared by every run: one product for all runs,
                # [b, in] x [in, R out] (the gradient takes them expanded, [R, b, in])
                rows, width = h.shape
                flat = weight.reshape(-1, width)
                if bias is None:
                    z = torch.mm(h, flat.T)
                else:
                    z = torch.addmm(bias.reshape(1, -1), h, flat.T)
                saved.append((h.expand(runs, rows, width), h))
                h = z.reshape(rows, runs, -1).transpose(0, 1).reshape(runs * rows, -1)
            elif kind is nn.Linear:
                a = h.reshape(runs, -1, h.shape[-1])  # [R, b * (middle dims), in]
                if bias is None:
                    z = torch.bmm(a, weight.transpose(1, 2))
                else:
                    z = torch.baddbmm(bias.unsqueeze(1), a, weight.transpose(1, 2))
                saved.append((a, h))
                h = z.reshape(*h.shape[:-1], z.shape[-1])
            elif kind is nn.Flatten:
                saved.append((h, h))
                h = layer(h)
            elif kind in CLOSED_FORM:
                out = CLOSED_FORM[kind][0](h, layer)
                saved.append((h, out))
                h = out
            else:
                leaf = h.detach().requires_grad_(True)
                with torch.enable_grad():
                    out = layer(leaf.clone() if getattr(layer, "inplace", False) else leaf)
                saved.append((leaf, out))
                h = out.detach()
        return h, saved

    def _backward(
        self,
        d: torch.Tensor,
        saved: list[tuple[torch.Tensor, torch.Tensor]],
        weights: list[tuple[Any, Any]],
        grads: list[torch.Tensor | None],
        runs: int,
    ) -> None:
        """The chain rule from ``d`` (the derivative at the output of layer ``len(saved)-1``)
        back through ``saved``; adds each trainable parameter's gradient into ``grads``."""
        for k in range(len(saved) - 1, self.first - 1, -1):
            layer = self.layers[k]
            kind = type(layer)
            x, y = saved[k]
            if kind is nn.Linear:
                weight, _ = weights[k]
                dz = d.reshape(runs, -1, d.shape[-1])
                self._linear_grads(k, dz.transpose(1, 2), x, grads)
                if k > self.first:
                    d = torch.bmm(dz, weight).reshape(*y.shape)
            elif kind is nn.Flatten:
                d = d.reshape(x.shape)
            elif kind in CLOSED_FORM:
                d = CLOSED_FORM[kind][1](d, x, y, layer)
            else:
                (d,) = torch.autograd.grad(y, x, d)

    def _linear_grads(
        self, k: int, dz_t: torch.Tensor, a: torch.Tensor, grads: list[torch.Tensor | None]
    ) -> None:
        """Layer ``k``'s weight and bias gradients from ``dz^T`` ``[R, out, m]`` and its input
        ``a`` ``[R, m, in]``."""
        weight_slot, bias_slot = self.slots[k]
        for slot, grad in (
            (weight_slot, None if not isinstance(weight_slot, int) else torch.bmm(dz_t, a)),
            (bias_slot, None if not isinstance(bias_slot, int) else dz_t.sum(dim=2)),
        ):
            if isinstance(slot, int) and grad is not None:
                before = grads[slot]
                grads[slot] = grad if before is None else before + grad

    # -- the evaluation ---------------------------------------------------------------------
    def __call__(
        self,
        loss: PerExampleFn,
        theta: torch.Tensor,
        w: torch.Tensor,
        batch: StackedBatch,
        *,
        with_value: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:math:`\\nabla_{\\theta_r} V_r` ``[R, p]`` and :math:`V_r` ``[R]`` of every run.

        Parameters
        ----------
        loss
            The per-example loss ``(model, batch) -> Tensor[b]`` the batch was prepared for.
        theta
            ``[R, p]``, the runs' flat parameters.
        w
            ``[R, b]``, the runs' example weights :math:`w_{ri}`.
        batch
            The batch, from :meth:`prepare` with the same ``R``.
        with_value
            ``False``: the closed-form cross-entropy skips :math:`V_r` and returns ``None``
            in its place (the gradient is the same, bit for bit).
        """
        if not self.applicable:
            raise InputError(
                "StackedSequential applies to an nn.Sequential of nn.Linear and elementwise "
                "layers only; use the vmapped gradient for this model"
            )
        runs = theta.shape[0]
        if batch.runs != runs or w.shape != (runs, batch.size):
            raise InputError(
                f"the batch was prepared for {batch.runs} runs of {batch.size} examples; got "
                f"{runs} runs and weights of shape {tuple(w.shape)}"
            )
        grads: list[torch.Tensor | None] = [None] * len(self.sizes)
        with torch.no_grad():
            weights = self._weights(theta)
            value: torch.Tensor | None
            if batch.inputs is not None:
                value = self._cross_entropy(weights, w, batch, grads, with_value)
            else:
                value = self._generic(loss, weights, w, batch, grads)
            flat = [
                torch.zeros(runs, size, dtype=theta.dtype, device=theta.device)
                if g is None
                else g.reshape(runs, size)
                for g, size in zip(grads, self.sizes, strict=True)
            ]
            return torch.cat(flat, dim=1), value

    def _cross_entropy(
        self,
        weights: list[tuple[Any, Any]],
        w: torch.Tensor,
        batch: StackedBatch,
        grads: list[torch.Tensor | None],
        with_value: bool = True,
    ) -> torch.Tensor | None:
        """The built-in cross-entropy, classes-major: :math:`\\ell = \\log\\sum_c e^{f_c} -
        f_y`, :math:`\\delta = w\\,(\\mathrm{softmax}(f) - e_y)` (:math:`\\ell` only
        ``with_value``)."""
        assert batch.inputs is not None
        assert batch.targets is not None
        assert batch.onehot is not None
        assert self.head is not None
        runs = batch.runs
        shared = batch.inputs.shape[0] != runs * batch.size  # untiled: layer 0 is a Linear
        h, saved = self._forward(batch.inputs, weights, self.head, runs, shared)
        if shared and self.head == 0:  # the inputs go straight into the head
            a = h.expand(runs, *h.shape)
        else:
            a = h.reshape(runs, -1, h.shape[-1])  # [R, b, in]
        weight, bias = weights[self.head]
        if bias is None:
            f = torch.bmm(weight, a.transpose(1, 2))  # [R, C, b]
        else:
            f = torch.baddbmm(bias.unsqueeze(2), weight, a.transpose(1, 2))
        top = f.amax(dim=1, keepdim=True)
        e = (f - top).exp()
        total = e.sum(dim=1, keepdim=True)
        value = None
        if with_value:
            losses = (total.log() + top - f.gather(1, batch.targets)).squeeze(1)  # [R, b]
            value = (w * losses).sum(dim=1)
        d = (e / total - batch.onehot) * w.unsqueeze(1)  # [R, C, b]
        self._linear_grads(self.head, d, a, grads)
        if self.head > self.first:
            d_in = torch.bmm(d.transpose(1, 2), weight).reshape(h.shape)
            self._backward(d_in, saved, weights, grads, runs)
        return value

    def _generic(
        self,
        loss: PerExampleFn,
        weights: list[tuple[Any, Any]],
        w: torch.Tensor,
        batch: StackedBatch,
        grads: list[torch.Tensor | None],
    ) -> torch.Tensor:
        """Any per-example loss: autograd through the loss alone for :math:`\\delta`."""
        runs, size = batch.runs, batch.size
        record: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

        def forward(x: torch.Tensor) -> torch.Tensor:
            out, saved = self._forward(x, weights, len(self.layers), runs, False)
            record.append(saved)
            return out

        model = _Recorder(forward)
        with torch.enable_grad():
            losses = loss(model, batch.tiled)
            if not isinstance(losses, torch.Tensor) or losses.shape != (runs * size,):
                shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else losses
                raise InputError(
                    f"the loss returned {shape} for {runs * size} stacked examples; it must "
                    "return one value per example (Tensor[b])"
                )
            if model.output is None:
                raise InputError("the loss never called the model")
            value = (w * losses.reshape(runs, size)).sum(dim=1)
            (d,) = torch.autograd.grad(
                value.sum(), model.output, allow_unused=True, materialize_grads=True
            )
        self._backward(d, record[0], weights, grads, runs)
        return value.detach()
