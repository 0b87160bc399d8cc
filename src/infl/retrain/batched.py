"""The batched SGD engine: many training runs of one model side by side, under one ``vmap``.

:class:`BatchedSGD` trains ``R`` runs at once. Run ``r`` has its own parameters (row ``r`` of
a flat ``[R, p]`` tensor) and its own example weights :math:`w_{r\\cdot}` (row ``r`` of
``[R, n]``); every run sees the same minibatches :math:`B` (``B`` = all ``n`` examples for a
full-batch step), and minimises on each

.. math::

    J_r^B(\\theta_r) = \\frac1{|B|}\\sum_{i\\in B} w_{ri}\\,\\ell(z_i;\\theta_r)
    + \\frac12\\theta_r^T\\Lambda\\theta_r ,

:math:`\\Lambda` the weight decay, one :math:`\\lambda_j` per parameter tensor.

With :math:`w_{ri} = n/(n-|R_r|)` for kept examples and :math:`0` for the removed set
:math:`R_r`, the full-batch :math:`J_r` is exactly :math:`J_{-R_r}`, and a minibatch gradient
is an unbiased estimate of it. The gradients of all runs come from one
:func:`torch.func.vmap` of :func:`torch.func.grad_and_value` over
:func:`torch.func.functional_call`, per chunk of examples. The update is
``torch.optim.SGD``'s heavy ball: :math:`b \\leftarrow \\mu b + g` (:math:`b = g` on the first
step), :math:`\\theta \\leftarrow \\theta - \\eta b`; runs can be frozen individually (masked).

Users: :mod:`infl.retrain` (leave-one-out / group retraining with full-batch SGD) and
:func:`infl.experiments.influence_fading` (control and removal runs over many horizons).
Plain autograd only: nothing here imports :mod:`infl.calculator` or :mod:`infl.model`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from infl.data import IndexedData, batch_to, tensor_leaves
from infl.errors import InputError
from infl.objective import PerExampleFn
from infl.retrain.single import flat_params, trainable

__all__ = ["BatchedSGD"]


class _Bound(nn.Module):
    """``forward(batch) = fn(net, batch)``, so that ``functional_call`` can swap ``net``'s
    parameters while ``fn`` still receives the real module (as in a plain retrain)."""

    def __init__(self, net: nn.Module, fn: PerExampleFn) -> None:
        super().__init__()
        self.net = net
        self.fn = fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.fn(self.net, batch)


class BatchedSGD:
    """``R`` SGD runs of one model, stacked along a leading dimension and vmapped.

    Parameters
    ----------
    model
        The module whose trainable parameters (``requires_grad``, in ``named_parameters()``
        order) every run starts from. It is deep-copied, never modified.
    loss
        Per-example loss ``(model, batch) -> Tensor[b]``, :math:`\\ell`.
    weight_decay
        :math:`\\lambda_{wd}` of the objective, or one :math:`\\lambda_j` per trainable
        parameter in ``named_parameters()`` order (``Objective.decay_values(names)``).
    train
        The ``n`` training examples, in the order of the columns of the weights.
    lr, momentum
        :math:`\\eta` and :math:`\\mu` of the update.
    chunk_size
        Examples per vmapped evaluation (memory grows with ``R * chunk_size``).

    Attributes
    ----------
    start : Tensor ``[p]``
        The starting parameters.
    theta : Tensor ``[R, p]``
        The runs' current parameters (after :meth:`begin`).
    weights : Tensor ``[R, n]``
        The runs' example weights (after :meth:`begin`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: PerExampleFn,
        weight_decay: float | Sequence[float],
        train: IndexedData,
        *,
        lr: float,
        momentum: float = 0.0,
        chunk_size: int = 1024,
    ) -> None:
        if chunk_size < 1:
            raise InputError(f"chunk_size must be positive, got {chunk_size}")
        self.net = copy.deepcopy(model)
        names = [name for name, p in self.net.named_parameters() if p.requires_grad]
        params = trainable(self.net)
        if not params:
            raise InputError("the model has no trainable parameters (requires_grad=True)")
        self.keys = [f"net.{name}" for name in names]
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.start = flat_params(params)
        self.dtype = self.start.dtype
        self.device = self.start.device
        if isinstance(weight_decay, (int, float)):
            decays = [float(weight_decay)] * len(params)
        else:
            decays = [float(v) for v in weight_decay]
        if len(decays) != len(params):
            raise InputError(
                f"weight_decay has {len(decays)} values for {len(params)} trainable parameters "
                f"{names}; give one per parameter (Objective.decay_values(names)) or a number"
            )
        self.decays = decays
        self.decay = torch.repeat_interleave(
            torch.tensor(decays, dtype=self.dtype, device=self.device),
            torch.tensor(self.sizes, device=self.device),
        )
        self.has_decay = any(v > 0 for v in decays)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.chunk_size = int(chunk_size)
        self.train = train
        self.call = _Bound(self.net, loss)
        self._chunks: list[tuple[int, Any]] | None = None
        self._grad = vmap(grad_and_value(self._weighted), in_dims=(0, 0, None))
        self.theta = self.start.unsqueeze(0).clone()
        self.weights = torch.ones(1, len(train), dtype=self.dtype, device=self.device)
        self.buf: torch.Tensor | None = None

    # -- one run's pieces (vmapped over runs) ------------------------------------------------
    def _params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        pieces = flat.split(self.sizes, dim=-1)
        return {
            key: piece.reshape(*flat.shape[:-1], *shape)
            for key, piece, shape in zip(self.keys, pieces, self.shapes, strict=True)
        }

    def _weighted(self, flat: torch.Tensor, w: torch.Tensor, batch: Any) -> torch.Tensor:
        losses = functional_call(self.call, self._params(flat), (batch,))
        if losses.shape != w.shape:
            raise InputError(
                f"the loss returned shape {tuple(losses.shape)} for {w.shape[0]} examples; it "
                "must return one value per example (Tensor[b])"
            )
        return (w * losses).sum()

    def _prepared_chunks(self) -> list[tuple[int, Any]]:
        if self._chunks is None:
            self._chunks = [
                (start, batch_to(batch, self.device, self.dtype))
                for start, batch in self.train.chunks(self.chunk_size)
            ]
        return self._chunks

    # -- the runs ----------------------------------------------------------------------------
    def begin(self, weights: torch.Tensor) -> None:
        """Start ``R = weights.shape[0]`` runs at :attr:`start` with these example weights."""
        if weights.dim() != 2 or weights.shape[1] != len(self.train):
            raise InputError(
                f"weights must have shape [runs, n={len(self.train)}], got {tuple(weights.shape)}"
            )
        self.weights = weights.to(device=self.device, dtype=self.dtype)
        self.theta = self.start.unsqueeze(0).repeat(weights.shape[0], 1)
        self.buf = None

    def gradient(
        self, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every run's :math:`\\nabla J_r^B`, :math:`J_r^B` and :math:`\\|\\nabla J_r^B\\|_2`.

        Parameters
        ----------
        index
            The minibatch :math:`B` (training indices, shared by all runs); ``None``: all
            ``n`` examples, in chunks.

        Returns
        -------
        tuple of Tensor
            Gradients ``[R, p]``, objective values ``[R]`` and gradient norms ``[R]``.
        """
        theta = self.theta
        grad = torch.zeros_like(theta)
        value = torch.zeros(theta.shape[0], dtype=theta.dtype, device=theta.device)
        if index is None:
            count = len(self.train)
            for start, batch in self._prepared_chunks():
                w = self.weights[:, start : start + len(tensor_leaves(batch)[0])]
                g, v = self._grad(theta, w, batch)
                grad += g
                value += v.detach()
        else:
            count = int(index.numel())
            batch = batch_to(self.train.select(index), self.device, self.dtype)
            g, v = self._grad(theta, self.weights[:, index.to(self.weights.device)], batch)
            grad += g
            value += v.detach()
        grad = grad / count
        value = value / count
        if self.has_decay:
            grad = grad + self.decay * theta
            value = value + 0.5 * (self.decay * theta * theta).sum(dim=1)
        return grad, value, torch.linalg.vector_norm(grad, dim=1)

    def step(self, grad: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """One SGD step of every run (``active[r] = False`` keeps run ``r`` where it is)."""
        if self.momentum:
            self.buf = grad if self.buf is None else self.momentum * self.buf + grad
            grad = self.buf
        if active is None:
            self.theta = self.theta - self.lr * grad
        else:
            self.theta = torch.where(active[:, None], self.theta - self.lr * grad, self.theta)

    # -- measuring ---------------------------------------------------------------------------
    def measure(self, fn: PerExampleFn, test: IndexedData) -> torch.Tensor:
        """``fn`` on every test example for every run: ``[R, m]`` (one vmap per chunk)."""
        bound = _Bound(self.net, fn)

        def one(flat: torch.Tensor, batch: Any) -> torch.Tensor:
            out: torch.Tensor = functional_call(bound, self._params(flat), (batch,))
            return out

        out = []
        with torch.no_grad():
            for _, batch in test.chunks(self.chunk_size):
                prepared = batch_to(batch, self.device, self.dtype)
                out.append(vmap(one, in_dims=(0, None))(self.theta, prepared))
        return torch.cat(out, dim=1)

    def module(self, theta: torch.Tensor) -> nn.Module:
        """The engine's copy of the model with its trainable parameters set to ``theta``."""
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(theta, trainable(self.net))
        return self.net
