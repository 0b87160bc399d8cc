"""A functional view of a trained model: flat parameters, per-example gradients, HVPs, GGN-VPs.

Everything here goes through :mod:`torch.func` (``functional_call``, ``vmap``, ``grad``,
``jvp``) and never mutates the user's module: the parameters are detached copies, so training
can continue on the module without changing what infl computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from infl.data import Batch, IndexedData, batch_size, batch_to, tree_map_tensors
from infl.errors import InputError, ModelStateError, NonFiniteError
from infl.objective import Objective, PerExampleFn, output_hessian_loss

_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def check_eval_mode(model: nn.Module) -> None:
    """Refuse a model whose output depends on train/eval mode and that is in train mode.

    Raises
    ------
    ModelStateError
        Naming the first dropout or batch-norm submodule found in training mode.
    """
    for name, module in model.named_modules():
        if isinstance(module, _MODE_DEPENDENT) and module.training:
            kind = type(module).__name__
            raise ModelStateError(
                f"submodule {name or '<root>'!r} ({kind}) is in training mode, so its output is "
                "random or depends on the batch and influence scores would be meaningless. "
                "Call model.eval() before building the influence calculator."
            )


class ModelWrapper:
    """The trainable parameters of ``model`` as one flat vector space of dimension ``p``.

    Parameters
    ----------
    model
        A trained ``nn.Module`` in eval mode. Only parameters with ``requires_grad=True`` are
        in the parameter space, in ``named_parameters()`` order; buffers stay fixed.
    objective
        The training objective (per-example loss and weight decay).

    Attributes
    ----------
    names : list[str]
        Names of the trainable parameters.
    num_params : int
        ``p``, the dimension of the parameter space.
    device, dtype
        Those of the parameters; data is moved to them (floating tensors are cast to ``dtype``).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from infl import Objective
    >>> w = ModelWrapper(nn.Linear(3, 2), Objective("cross_entropy"))
    >>> w.num_params
    8
    """

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_eval_mode(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ModelStateError(
                "the model has no trainable parameters (none with requires_grad=True); "
                "influence is defined over trainable parameters, so unfreeze the ones to study"
            )
        for name, param in named:
            if not torch.isfinite(param).all():
                raise ModelStateError(
                    f"parameter {name!r} contains NaN or infinite values; the model must be a "
                    "finished, finite training run (check the learning rate and the loss)"
                )
        dtypes = {p.dtype for _, p in named}
        devices = {p.device for _, p in named}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ModelStateError(
                f"trainable parameters mix dtypes {sorted(map(str, dtypes))} or devices "
                f"{sorted(map(str, devices))}; convert the model with model.to(...) first"
            )
        self.model = model
        self.objective = objective
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.num_params = sum(self.numels)
        self.dtype: torch.dtype = named[0][1].dtype
        self.device: torch.device = named[0][1].device
        self.params = {n: p.detach().clone() for n, p in named}
        frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        self.fixed = {**frozen, **{n: b.detach() for n, b in model.named_buffers()}}
        self.flat_params = self.flatten(self.params)

    # ---------------------------------------------------------------- flat <-> dict
    def flatten(self, tensors: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Concatenate per-parameter tensors into ``[*batch, p]`` in parameter order."""
        parts = []
        for name in self.names:
            t = tensors[name]
            parts.append(t.reshape(*t.shape[:batch_dims], -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a ``[*batch, p]`` tensor into per-parameter tensors ``[*batch, *shape]``."""
        if flat.shape[-1] != self.num_params:
            raise InputError(
                f"expected vectors of length p={self.num_params}, got shape {tuple(flat.shape)}"
            )
        lead = flat.shape[:-1]
        pieces = torch.split(flat, self.numels, dim=-1)
        return {
            n: piece.reshape(*lead, *shape)
            for n, piece, shape in zip(self.names, pieces, self.shapes, strict=True)
        }

    # ---------------------------------------------------------------- evaluation
    def prepare(self, batch: Batch) -> Batch:
        """Move a batch to the model's device, casting floating tensors to its dtype."""
        return batch_to(batch, self.device, self.dtype)

    def functional_model(self, params: dict[str, torch.Tensor]) -> Callable[..., Any]:
        """The module as a callable of its inputs, evaluated at ``params``."""
        fixed = self.fixed

        def call(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.model, {**fixed, **params}, args, kwargs)

        return call

    def _batch_value(self, fn: PerExampleFn, params: dict[str, torch.Tensor], batch: Batch) -> Any:
        values = fn(self.functional_model(params), batch)
        if not isinstance(values, torch.Tensor) or values.dim() != 1:
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values)
            raise InputError(
                f"the loss/measurement callable must return one value per example (a 1-d "
                f"tensor of length b), got {shape}"
            )
        return values

    def values(self, fn: PerExampleFn, batch: Batch) -> torch.Tensor:
        """``fn`` evaluated on every example of ``batch`` at the wrapper's parameters: ``[b]``."""
        batch = self.prepare(batch)
        with torch.no_grad():
            return self._batch_value(fn, self.params, batch).detach()

    def per_example_grads(
        self, fn: PerExampleFn, batch: Batch, *, add_weight_decay: bool = False
    ) -> torch.Tensor:
        """Per-example gradients :math:`\\nabla_\\theta f(z)` of a batch: ``[b, p]``.

        Parameters
        ----------
        fn
            ``(model, batch) -> Tensor[b]``; it is called on single examples (batch of one)
            under ``vmap``, so each row is the gradient of that example alone.
        batch
            ``b`` examples.
        add_weight_decay
            Add :math:`\\lambda_{wd}\\theta` to each row (the training-gradient convention of
            :class:`~infl.objective.Objective`).
        """
        batch = self.prepare(batch)
        b = batch_size(batch)

        def single(params: dict[str, torch.Tensor], example: Batch) -> torch.Tensor:
            one = tree_map_tensors(lambda t: t.unsqueeze(0), example)
            return self._batch_value(fn, params, one).sum()

        grads = vmap(grad(single), in_dims=(None, 0))(self.params, batch)
        flat = self.flatten(grads, batch_dims=1)
        if add_weight_decay and self.objective.weight_decay:
            flat = flat + self.objective.weight_decay * self.flat_params
        if not torch.isfinite(flat).all():
            bad = int((~torch.isfinite(flat)).any(dim=1).nonzero()[0])
            raise NonFiniteError(
                f"the gradient of example {bad} of this chunk (of {b}) is not finite; check the "
                "inputs for NaN/inf and that the loss is finite at the trained parameters"
            )
        return flat

    def train_grads(self, batch: Batch) -> torch.Tensor:
        """Training gradients :math:`g_i = \\nabla\\ell(z_i) + \\lambda_{wd}\\theta`: ``[b, p]``."""
        return self.per_example_grads(self.objective.per_example_loss, batch, add_weight_decay=True)

    def iter_train_grads(
        self, data: IndexedData, chunk_size: int
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, g[start:start+b])`` over the training data in chunks."""
        for start, batch in data.chunks(chunk_size):
            yield start, self.train_grads(batch)

    def objective_grad(self, data: IndexedData, chunk_size: int) -> torch.Tensor:
        """:math:`\\nabla J(\\theta)` over the whole data set: ``[p]``."""
        loss = self.objective.per_example_loss
        total = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)

        def summed(params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
            return self._batch_value(loss, params, batch).sum()

        for _, batch in data.chunks(chunk_size):
            total += self.flatten(grad(summed)(self.params, self.prepare(batch)))
        return total / len(data) + self.objective.weight_decay * self.flat_params

    def hvp(
        self, data: IndexedData | Batch, vectors: torch.Tensor, chunk_size: int
    ) -> torch.Tensor:
        """Hessian-vector products :math:`H V^T` with :math:`H = \\nabla^2 J`: ``[k, p]``.

        Forward-over-reverse (``jvp`` of ``grad``), ``vmap``-ed over the ``k`` vectors and
        summed over chunks of the data; :math:`H` is the Hessian of the *mean* loss plus
        :math:`\\lambda_{wd} I`.

        Parameters
        ----------
        data
            The examples defining :math:`H` (an :class:`IndexedData`, or a single batch).
        vectors
            ``[k, p]``.
        chunk_size
            Examples per chunk: peak memory grows with ``chunk_size * k``.
        """
        self._check_vectors(vectors, "HVP")
        loss = self.objective.per_example_loss

        def summed(params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
            return self._batch_value(loss, params, batch).sum()

        def one_chunk(batch: Batch) -> torch.Tensor:
            grad_fn = grad(summed)

            def hv(v: torch.Tensor) -> torch.Tensor:
                out = jvp(lambda p: grad_fn(p, batch), (self.params,), (self.unflatten(v),))
                return self.flatten(out[1])

            return vmap(hv)(vectors)

        return self._curvature_products(
            data, vectors, chunk_size, one_chunk, "a Hessian-vector product"
        )

    def ggn_vp(
        self, data: IndexedData | Batch, vectors: torch.Tensor, chunk_size: int
    ) -> torch.Tensor:
        """Generalised Gauss-Newton products :math:`G V^T`: ``[k, p]``.

        :math:`G = \\frac1n\\sum_i J_i^T H_{out,i} J_i + \\lambda_{wd} I`, where
        :math:`J_i = \\partial f(x_i;\\theta)/\\partial\\theta` is the Jacobian of the model's
        output for example ``i`` and :math:`H_{out,i} = \\partial^2\\ell/\\partial f^2` the
        output-space Hessian of its loss. Per chunk: one forward pass, then for each vector
        ``jvp`` through the model (:math:`J v`), the output Hessian, and ``vjp`` back
        (:math:`J^T \\cdot`), ``vmap``-ed over the ``k`` vectors; :math:`J` is never formed.
        :math:`G` is positive semi-definite when every :math:`H_{out,i}` is (all built-in
        losses: they are convex in the outputs).

        Parameters
        ----------
        data
            The examples defining :math:`G` (an :class:`IndexedData`, or a single batch).
        vectors
            ``[k, p]``.
        chunk_size
            Examples per chunk: peak memory grows with ``chunk_size * k`` (activations and
            their tangents).

        Raises
        ------
        InputError
            If the objective's loss has no output-space Hessian (see
            :func:`~infl.objective.output_hessian_loss`).
        """
        self._check_vectors(vectors, "GGN-vector product")
        loss = output_hessian_loss(self.objective.per_example_loss)

        def one_chunk(batch: Batch) -> torch.Tensor:
            inputs, targets = loss.split(batch)

            def forward(params: dict[str, torch.Tensor]) -> Any:
                return self.functional_model(params)(inputs)

            primal = vjp(forward, self.params)
            outputs, pullback = primal[0], primal[1]

            def gv(v: torch.Tensor) -> torch.Tensor:
                jv = jvp(forward, (self.params,), (self.unflatten(v),))[1]
                (jt,) = pullback(loss.output_hessian_product(outputs, targets, jv))
                return self.flatten(jt)

            return vmap(gv)(vectors)

        return self._curvature_products(
            data, vectors, chunk_size, one_chunk, "a Gauss-Newton-vector product"
        )

    def _check_vectors(self, vectors: torch.Tensor, what: str) -> None:
        if vectors.dim() != 2 or vectors.shape[1] != self.num_params:
            raise InputError(
                f"{what} right-hand sides must have shape [k, p={self.num_params}], "
                f"got {tuple(vectors.shape)}"
            )

    def _curvature_products(
        self,
        data: IndexedData | Batch,
        vectors: torch.Tensor,
        chunk_size: int,
        one_chunk: Callable[[Batch], torch.Tensor],
        what: str,
    ) -> torch.Tensor:
        """Mean over the examples of ``one_chunk``'s summed products, plus weight decay."""
        if isinstance(data, IndexedData):
            out = torch.zeros_like(vectors)
            for _, batch in data.chunks(chunk_size):
                out += one_chunk(self.prepare(batch))
            n = len(data)
        else:
            batch = self.prepare(data)
            n = batch_size(batch)
            out = one_chunk(batch)
        out = out / n
        if self.objective.weight_decay:
            out = out + self.objective.weight_decay * vectors
        if not torch.isfinite(out).all():
            raise NonFiniteError(
                f"{what} is not finite; the loss or its curvature overflows "
                "at the trained parameters (check for exploding logits or NaN inputs)"
            )
        return out
