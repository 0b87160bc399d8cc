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
:func:`torch.func.functional_call`, per chunk of examples; for an ``nn.Sequential`` of
``nn.Linear`` layers and elementwise activations, from batched matrix products with a
hand-written backward pass instead (:mod:`infl.retrain.stacked_linear`, about 3x less per
step on the fragility study's Iris MLPs), once it has matched ``vmap`` on the first
evaluation. The update is
``torch.optim.SGD``'s heavy ball: :math:`b \\leftarrow \\mu b + g` (:math:`b = g` on the first
step), :math:`\\theta \\leftarrow \\theta - \\eta b`; runs can be frozen individually (masked).

Users: :mod:`infl.retrain` (leave-one-out / group retraining with full-batch SGD) and
:func:`infl.experiments.influence_fading` (control and removal runs over many horizons).
Plain autograd only: nothing here imports :mod:`infl.calculator` or :mod:`infl.model`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from infl.data import IndexedData, batch_to, tensor_leaves
from infl.errors import InputError
from infl.objective import PerExampleFn
from infl.retrain.single import flat_params, trainable
from infl.retrain.stacked_linear import StackedBatch, StackedSequential

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
        self.loss = loss
        self.call = _Bound(self.net, loss)
        self._chunks: list[tuple[int, int, Any]] | None = None  # (start, size, batch)
        self._grad = vmap(grad_and_value(self._weighted), in_dims=(0, 0, None))
        stacked = StackedSequential(self.net, params)
        self._stacked: StackedSequential | None = stacked if stacked.applicable else None
        self._stacked_verified = False
        self._prepared: dict[
            int, StackedBatch
        ] = {}  # chunk start -> that chunk, for len(theta) runs
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

    def _evaluate(
        self,
        theta: torch.Tensor,
        w: torch.Tensor,
        batch: Any,
        start: int | None,
        with_value: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every run's weighted loss gradient ``[R, p]`` and value ``[R]`` on ``batch``.

        By :class:`~infl.retrain.stacked_linear.StackedSequential` once it has been verified
        (:meth:`_verify`), else by ``vmap``. ``start`` keys the cache of full-batch chunks
        prepared for the stacked path (``None``: a minibatch, prepared afresh). Without
        ``with_value`` the stacked path may skip the value (returned as ``None``); the
        gradient is the same either way.
        """
        stacked = self._stacked
        if stacked is None:
            g, v = self._grad(theta, w, batch)
            return g, v.detach()
        runs = theta.shape[0]
        prepared = None if start is None else self._prepared.get(start)
        if prepared is None:
            prepared = stacked.prepare(self.loss, batch, runs)
            if start is not None:
                self._prepared[start] = prepared
        if self._stacked_verified:
            return stacked(self.loss, theta, w, prepared, with_value=with_value)
        g, v = self._grad(theta, w, batch)
        self._stacked_verified = self._verify(theta, w, batch, prepared)
        if not self._stacked_verified:
            self._stacked = None
            self._prepared = {}
        return g, v.detach()

    def _verify(self, theta: torch.Tensor, w: torch.Tensor, batch: Any, prepared: Any) -> bool:
        """The stacked path equals ``vmap`` to :math:`\\sqrt{\\varepsilon}` (relative to the
        largest entry), at parameters perturbed differently for every run (a loss that mixes
        the examples of a batch cannot pass on identical runs); both its closed-form
        cross-entropy (where it applies) and its generic loss path are checked."""
        stacked = self._stacked
        assert stacked is not None
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(theta.shape, generator=gen, dtype=theta.dtype).to(theta.device)
        scale = float(theta.abs().mean()) if theta.numel() else 0.0
        probe = theta + 0.1 * (scale if scale > 0 else 1.0) * noise
        ref_g, ref_v = self._grad(probe, w, batch)
        candidates = [prepared]
        if prepared.inputs is not None:
            candidates.append(dataclasses.replace(prepared, inputs=None))
        tol = torch.finfo(theta.dtype).eps ** 0.5
        for candidate in candidates:
            try:
                got_g, got_v = stacked(self.loss, probe, w, candidate)
            except Exception:  # a loss or layer the stacked path does not support
                return False
            if got_v is None:  # with_value=True always returns the value
                return False
            for got, ref in ((got_g, ref_g), (got_v, ref_v.detach())):
                if got.shape != ref.shape or not bool(torch.isfinite(ref).all()):
                    return False
                largest = float(ref.abs().max()) if ref.numel() else 0.0
                if not bool(((got - ref).abs() <= tol * max(largest, 1.0)).all()):
                    return False
        return True

    def _prepared_chunks(self) -> list[tuple[int, int, Any]]:
        if self._chunks is None:
            self._chunks = [
                (start, len(tensor_leaves(batch)[0]), batch_to(batch, self.device, self.dtype))
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
        if weights.shape[0] != self.theta.shape[0]:
            self._prepared = {}
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
        grad, value = self._objective(index, with_value=True)
        assert value is not None
        return grad, value, torch.linalg.vector_norm(grad, dim=1)

    def gradient_only(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Every run's :math:`\\nabla J_r^B` ``[R, p]``, equal to :meth:`gradient`'s first
        output bit for bit, without the objective values and norms (on the stacked path the
        value's logarithms and sums are skipped: a few fewer passes per step)."""
        return self._objective(index, with_value=False)[0]

    def _objective(
        self, index: torch.Tensor | None, *, with_value: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        theta = self.theta
        if index is None:
            count = len(self.train)
            chunks = iter(self._prepared_chunks())
            start, size, batch = next(chunks)  # n >= 1: at least one chunk
            grad, value = self._evaluate(
                theta, self.weights[:, start : start + size], batch, start, with_value
            )
            for start, size, batch in chunks:
                g, v = self._evaluate(
                    theta, self.weights[:, start : start + size], batch, start, with_value
                )
                grad = grad + g
                value = None if value is None or v is None else value + v
        else:
            count = int(index.numel())
            batch = batch_to(self.train.select(index), self.device, self.dtype)
            w = self.weights[:, index.to(self.weights.device)]
            grad, value = self._evaluate(theta, w, batch, None, with_value)
        grad = grad / count
        value = value / count if with_value and value is not None else None
        if self.has_decay:
            decayed = self.decay * theta
            grad = grad + decayed
            if value is not None:
                value = value + 0.5 * (decayed * theta).sum(dim=1)
        return grad, value

    def step(self, grad: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """One SGD step of every run (``active[r] = False`` keeps run ``r`` where it is).

        The buffer and (without ``active``) the parameters are updated in place, by the same
        operations as :math:`b \\leftarrow \\mu b + g`, :math:`\\theta \\leftarrow \\theta -
        \\eta b` out of place (so to the same bits); ``grad`` itself is left as it is."""
        if self.momentum:
            if self.buf is None:
                self.buf = grad.clone()
            else:
                self.buf.mul_(self.momentum).add_(grad)
            grad = self.buf
        if active is None:
            self.theta.sub_(self.lr * grad)
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
