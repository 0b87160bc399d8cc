"""A functional view of a trained model: flat parameters, per-example gradients, HVPs, GGN-VPs.

Everything here goes through :mod:`torch.func` (``vmap``, ``grad``, ``jvp``; the module is called
at infl's tensors by :mod:`infl.reparametrize`) and leaves the user's module as it was: the
parameters are detached copies, so training can continue on it without changing the answers.

Every evaluation runs inside :func:`functional_evaluation`: PyTorch's math attention kernel
(the fused CPU/GPU kernels have neither forward-mode nor second derivatives) and no
``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` "fast path" (a fused kernel taken
in eval mode when no gradient is recorded, which has no forward-mode derivative and handles
padding masks differently from the differentiable path). Second-order products are
forward-over-reverse by default and switch to reverse-over-reverse, once and with an
:class:`~infl.errors.InflWarning`, on a model with an operation that has no forward-mode
derivative (:attr:`ModelWrapper.second_order`); that machinery is
:mod:`infl.second_order`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import grad, vmap

from infl import gradient_products
from infl.chain_hvp import chain_hvp, whole_data_products
from infl.data import Batch, IndexedData, batch_size, batch_to, tree_map_tensors
from infl.errors import InflWarning, InputError, ModelStateError, NonFiniteError
from infl.finite import all_finite, first_nonfinite_row
from infl.layer_grads import LayerPerExampleGradients
from infl.linear_grads import Factors, LinearPerExampleGradients
from infl.model_checks import (
    CHECK_EXAMPLES,
    Stationarity,
    as_training_data,
    check_eval_mode,
    check_first_examples,
    gradient_moments,
    measure_stationarity,
    shortcut_agrees,
)
from infl.objective import Objective, PerExampleFn, SupervisedLoss, output_hessian_loss
from infl.reparametrize import ModuleCall
from infl.second_order import (
    GradientGraphs,
    SecondOrder,
    _missing_forward_ad,
    _operation_named,
    curvature_products,
    dense_ggn,
    functional_evaluation,
    ggn_chunk,
    hvp_double_backward,
    hvp_forward_over_reverse,
)
from infl.sequential_chain import chain_factors

__all__ = [
    "CHECK_EXAMPLES",
    "ModelWrapper",
    "SecondOrder",
    "Stationarity",
    "as_training_data",
    "check_eval_mode",
    "functional_evaluation",
]


class ModelWrapper:
    """The trainable parameters of ``model`` as one flat vector space of dimension ``p``.

    Parameters
    ----------
    model
        A trained ``nn.Module`` in eval mode. Only parameters with ``requires_grad=True`` are
        in the parameter space, in ``named_parameters()`` order; buffers stay fixed.
    objective
        The training objective (per-example loss and weight decay).
    second_order
        How Hessian-vector products (and the Jacobian products of the Gauss-Newton product)
        are differentiated. ``"auto"`` (default): reverse-over-reverse, by plain
        ``torch.autograd`` double backward (per chunk one forward pass and one backward pass
        that records its graph, then one backward pass of that graph per vector, or one
        batched pass over the ``k`` vectors of a small model): the fastest measured on small
        and mid-sized models (``benchmarks/bench_hvp.py``), at the memory of the gradient's
        backward graph for one chunk. It switches to forward-over-reverse (``torch.func``:
        ``jvp`` of ``grad``, ``vmap``-ed over the vectors) with a one-time
        :class:`~infl.errors.InflWarning` the first time the model hits an operation without
        a second derivative (one whose backward PyTorch cannot differentiate).
        ``"forward-over-reverse"`` or ``"reverse-over-reverse"`` fix the mode (an operation
        the mode cannot differentiate then raises :class:`~infl.errors.ModelStateError`).
        Both give the same products up to round-off.

    Attributes
    ----------
    names : list[str]
        Names of the trainable parameters.
    num_params : int
        ``p``, the dimension of the parameter space.
    decays : list[float]
        :math:`\\lambda_j`, the weight decay of each trainable parameter
        (:meth:`~infl.objective.Objective.decay_values`).
    decay : Tensor ``[p]``
        The diagonal of :math:`\\Lambda` on the flat space: every use of weight decay
        (training gradients, HVP, GGN, stationarity) goes through it.
    device, dtype
        Those of the parameters; data is moved to them (floating tensors are cast to ``dtype``).
    second_order : str
        The mode in use now: ``"forward-over-reverse"`` or ``"reverse-over-reverse"``.
    activation_bytes : int or None
        Bytes per example of the largest tensor a submodule outputs, from the first
        evaluation of :meth:`check_data` (``None`` before it); what
        :func:`~infl.chunking.auto_chunk_size` sizes chunks by.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from infl import Objective
    >>> w = ModelWrapper(nn.Linear(3, 2), Objective("cross_entropy"))
    >>> w.num_params
    8
    """

    def __init__(
        self, model: nn.Module, objective: Objective, *, second_order: SecondOrder = "auto"
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if second_order not in ("auto", "forward-over-reverse", "reverse-over-reverse"):
            raise InputError(
                "second_order must be 'auto', 'forward-over-reverse' or 'reverse-over-reverse', "
                f"got {second_order!r}"
            )
        check_eval_mode(model)
        every = list(model.named_parameters())
        named = [(n, p) for n, p in every if p.requires_grad]
        if not named:
            raise ModelStateError(
                "the model has no trainable parameters (none with requires_grad=True); "
                "influence is defined over trainable parameters, so unfreeze the ones to study"
            )
        for name, param in named:
            if not all_finite(param.detach()):
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
        frozen = {n: p.detach() for n, p in every if not p.requires_grad}
        self.fixed = {**frozen, **{n: b.detach() for n, b in model.named_buffers()}}
        self.module_call = ModuleCall(model, [*self.fixed, *self.names])
        self.flat_params = self.flatten(self.params)
        # the diagonal of Lambda (weight decay per parameter): the one place it is resolved
        self.decays: list[float] = objective.decay_values(self.names)
        self.decay: torch.Tensor = objective.decay_vector(
            self.names, self.numels, dtype=self.dtype, device=self.device
        )
        self.has_decay = any(v > 0 for v in self.decays)
        self.requested_second_order: SecondOrder = second_order
        self.second_order: str = "reverse-over-reverse" if second_order == "auto" else second_order
        self._output_shape: tuple[int, ...] | None = None
        self.activation_bytes: int | None = None  # set by check_data
        # the vmapped forward-over-reverse HVP, built once (torch.func transforms are reusable)
        self._for_hvp: Callable[[torch.Tensor, torch.Tensor, Batch], torch.Tensor] | None = None
        # per-example gradients of nn.Linear-only (else convolutional, normalised) models from
        # one batched backward pass, checked once per measurement callable against vmap(grad)
        self._linear_grads = LinearPerExampleGradients(model, self.names)
        layers = LayerPerExampleGradients(model, self.names)
        self._batched_grads = self._linear_grads if self._linear_grads.applicable else layers
        self._linear_verified: dict[Any, bool] = {}
        # Gauss-Newton J v by the vjp of u -> J^T u (after a missing forward-mode derivative)
        self._ggn_transpose = second_order == "reverse-over-reverse"

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
        fixed, module_call = self.fixed, self.module_call
        return lambda *args, **kwargs: module_call({**fixed, **params}, args, kwargs)

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
        with torch.no_grad(), functional_evaluation():
            return self._batch_value(fn, self.params, batch).detach()

    def per_example_grads(
        self,
        fn: PerExampleFn,
        batch: Batch,
        *,
        add_weight_decay: bool = False,
        out: torch.Tensor | None = None,
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
            Add :math:`\\Lambda\\theta` to each row (:math:`\\Lambda` = :attr:`decay`, the
            training-gradient convention of :class:`~infl.objective.Objective`).
        out
            A ``[b, p]`` tensor of the model's dtype and device to write the gradients into
            (returned): the rows of a cache, so that a chunk's gradients are not first formed
            in fresh memory and then copied.
        """
        batch = self.prepare(batch)
        b = batch_size(batch)
        if out is not None and (
            out.shape != (b, self.num_params)
            or out.dtype != self.dtype
            or out.device != self.device
        ):
            raise InputError(
                f"out must be a [{b}, {self.num_params}] {self.dtype} tensor on {self.device}, "
                f"got {list(out.shape)} {out.dtype} on {out.device}"
            )
        flat = self._batched_layer_grads(fn, batch, b, out)
        if flat is None:
            flat = self._vmapped_grads(fn, batch)
            if out is not None:
                flat = out.copy_(flat)
        if add_weight_decay and self.has_decay:
            flat.add_(self.decay * self.flat_params)
        bad = first_nonfinite_row(flat)
        if bad is not None:
            raise NonFiniteError(
                f"the gradient of example {bad} of this chunk (of {b}) is not finite; check the "
                "inputs for NaN/inf and that the loss is finite at the trained parameters"
            )
        return flat

    def _vmapped_grads(self, fn: PerExampleFn, batch: Batch) -> torch.Tensor:
        """``[b, p]`` per-example gradients by ``vmap(grad)`` over single examples."""

        def single(params: dict[str, torch.Tensor], example: Batch) -> torch.Tensor:
            one = tree_map_tensors(lambda t: t.unsqueeze(0), example)
            return self._batch_value(fn, params, one).sum()

        with functional_evaluation():
            grads = vmap(grad(single), in_dims=(None, 0))(self.params, batch)
        return self.flatten(grads, batch_dims=1)

    def _batched_layer_grads(
        self, fn: PerExampleFn, batch: Batch, b: int, out: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """``[b, p]`` from one batched backward pass when every parameter is in an
        ``nn.Linear`` (:mod:`infl.linear_grads`) or in a convolution, linear or normalisation
        layer (:mod:`infl.layer_grads`), else ``None``.

        The first batch for each ``fn`` is checked: its first and last rows must agree, to
        :math:`\\sqrt{\\varepsilon}` (relative to the largest entry), with the plain autograd
        gradients of those examples alone (each a batch of one, which cannot mix examples:
        what ``vmap(grad)`` computes for them, at a quarter of its cost on small models). A
        model or ``fn`` that mixes the examples of a batch, one that depends on the parameters
        other than through the layers' outputs (a penalty on the weights), or any other
        mismatch keeps ``vmap`` for that ``fn``. The built-in loss of a plain ``nn.Sequential``
        of ``nn.Linear`` layers and activations needs no check
        (:func:`~infl.model_checks.rowwise_by_construction`).
        """
        if not self._batched_grads.applicable:
            return None
        try:
            verified = self._linear_verified.get(fn)
        except TypeError:  # an unhashable callable: no record of a check, so no shortcut
            return None
        if verified is False:
            return None
        factors = chain_factors(self, fn, batch)  # exact by construction: no check
        if factors is not None:
            self._linear_verified[fn] = True
            return self._linear_grads.gradients_of(factors, self.numels, out)
        with functional_evaluation():
            value = functools.partial(self._batch_value, fn, batch=batch)
            fast = self._batched_grads(value, self.params, b, out=out)
        if fast is None:
            self._linear_verified[fn] = False
            return None
        if verified is None:
            rows = [0] if b == 1 else [0, b - 1]
            return fast if shortcut_agrees(self, fn, batch, rows, fast[rows]) else None
        return fast

    def train_grads(self, batch: Batch, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Training gradients :math:`g_i = \\nabla\\ell(z_i) + \\Lambda\\theta`: ``[b, p]``
        (written into ``out`` when given, as :meth:`per_example_grads` does)."""
        return self.per_example_grads(
            self.objective.per_example_loss, batch, add_weight_decay=True, out=out
        )

    @property
    def has_linear_shortcut(self) -> bool:
        """Whether every trainable parameter is in a plain ``nn.Linear`` and the check of
        :meth:`per_example_grads` has not refused that shortcut for the loss: then
        :meth:`train_grad_moments` never forms ``[b, p]``, and :meth:`train_grad_products`
        does not for few vectors (:meth:`multiplies_directly`)."""
        loss = self.objective.per_example_loss
        return self._linear_grads.applicable and self._linear_verified.get(loss) is not False

    def multiplies_directly(self, k: int) -> bool:
        """Whether :meth:`train_grad_products` of ``k`` vectors skips the ``[b, p]`` gradients:
        :attr:`has_linear_shortcut`, and ``k`` small enough for that to pay
        (:meth:`LinearPerExampleGradients.products_pay
        <infl.linear_grads.LinearPerExampleGradients.products_pay>`)."""
        return self.has_linear_shortcut and self._linear_grads.products_pay(k, self.num_params)

    def train_grad_products(
        self, batch: Batch, vectors: torch.Tensor, *, factors: Factors | None = None
    ) -> torch.Tensor:
        """:math:`V g_i` for the training gradients of a batch: ``vectors @ train_grads(batch).T``
        (``[k, b]``, in ``vectors.dtype``; ``vectors`` is ``[k, p]``).

        Without forming the ``[b, p]`` gradients when :meth:`multiplies_directly` and the
        loss's shortcut is checked (:func:`infl.gradient_products.train_grad_products`; from
        the batch's ``factors`` when given).
        """
        self._check_vectors(vectors, "train-gradient product")
        return gradient_products.train_grad_products(self, self.prepare(batch), vectors, factors)

    def train_grad_moments(
        self, batch: Batch, *, factors: Factors | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sum of a batch's training gradients ``[p]`` and of their squared norms ``[1]``,
        in float64: what :meth:`check_stationarity` needs from each chunk.

        Without forming the ``[b, p]`` gradients when :attr:`has_linear_shortcut` and the
        loss's shortcut is checked (:func:`infl.gradient_products.train_grad_moments`).
        """
        return gradient_products.train_grad_moments(self, self.prepare(batch), factors)

    def iter_train_grads(
        self, data: IndexedData, chunk_size: int
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, g[start:start+b])`` over the training data in chunks.

        Each chunk's targets are checked first (:meth:`check_targets`), so a bad label
        anywhere in the data is named by its index before any gradient is taken.
        """
        for start, batch in data.chunks(chunk_size):
            self.check_targets(batch, offset=start, what=data.name)
            yield start, self.train_grads(batch)

    def objective_grad(self, data: IndexedData, chunk_size: int) -> torch.Tensor:
        """:math:`\\nabla J(\\theta)` over the whole data set: ``[p]``."""
        loss = self.objective.per_example_loss
        total = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)

        def summed(params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
            return self._batch_value(loss, params, batch).sum()

        with functional_evaluation():
            for _, batch in data.chunks(chunk_size):
                total += self.flatten(grad(summed)(self.params, self.prepare(batch)))
        return total / len(data) + self.decay * self.flat_params

    def hvp(
        self,
        data: IndexedData | Batch,
        vectors: torch.Tensor,
        chunk_size: int,
        graphs: GradientGraphs | None = None,
        mean_over: float | None = None,
    ) -> torch.Tensor:
        """Hessian-vector products :math:`H V^T` with :math:`H = \\nabla^2 J`: ``[k, p]``.

        :math:`H` is the Hessian of the *mean* loss plus :math:`\\Lambda` (the weight decay,
        :attr:`decay`), summed over chunks of the data. Per chunk, in the mode of
        :attr:`second_order`:

        * reverse-over-reverse (default): one forward pass and one backward pass recording its
          graph give :math:`g(\\theta) = \\nabla\\sum_{i} \\ell(z_i)` on the flat parameter
          vector; then :math:`H v = \\nabla_\\theta (g^T v)`, one backward pass of that graph
          per vector (one batched pass, ``is_grads_batched``, for ``k > 4`` vectors of a model
          with ``p < 1000``: faster where per-pass overhead dominates). Under ``"auto"``, a
          plain ``nn.Sequential`` MLP with a built-in loss runs the same products by hand
          instead, with no graph (:func:`infl.chain_hvp.chain_hvp`).
          Cost: about one forward and two backward passes plus ``k`` double-backward passes;
          memory: the chunk's backward graph, plus ``k`` times its gradient-sized buffers.
        * forward-over-reverse: ``jvp`` of ``grad`` (``torch.func``), ``vmap``-ed over the
          ``k`` vectors, built once per wrapper. Cost: about two forward and two backward
          passes batched over ``k``; memory grows with ``chunk_size * k`` activations.

        Parameters
        ----------
        data
            The examples defining :math:`H` (an :class:`IndexedData`, or a single batch).
        vectors
            ``[k, p]``.
        chunk_size
            Examples per chunk: peak memory grows with ``chunk_size`` (and with ``k``).
        graphs
            Reverse-over-reverse only: keep each chunk's gradient graph here and reuse it in
            later calls with the same ``data`` and ``chunk_size`` (:class:`GradientGraphs`;
            what a fixed operator passes). ``None``: build every graph afresh.
        mean_over
            Divide the summed per-example terms by this instead of the number of examples in
            ``data`` (a block of a partition of ``N`` examples into ``B`` blocks divides by
            ``N / B``, so that the blocks' mean is the full-data operator).
        """
        self._check_vectors(vectors, "HVP")
        if graphs is not None:
            graphs.calls += 1
        position = [0]

        def one_chunk(batch: Batch, into: torch.Tensor | None = None) -> torch.Tensor:
            if self.second_order == "reverse-over-reverse":
                chunk = position[0]
                position[0] += 1
                chained = chain_hvp(self, batch, vectors, graphs, chunk, into=into)
                if chained is not None:  # an MLP chain under "auto": by hand
                    return chained
                return hvp_double_backward(self, batch, vectors, graphs, chunk)
            return hvp_forward_over_reverse(self)(vectors, self.flat_params, batch)

        whole = functools.partial(whole_data_products, self, vectors, graphs)
        return curvature_products(
            self, data, vectors, chunk_size, one_chunk, "a Hessian-vector product", mean_over, whole
        )

    def _loss_sum(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        """:math:`\\sum_i \\ell(z_i)` over ``batch`` at the flat parameters ``theta`` ``[p]``."""
        loss = self.objective.per_example_loss
        return self._batch_value(loss, self.unflatten(theta), batch).sum()

    def ggn_vp(
        self,
        data: IndexedData | Batch,
        vectors: torch.Tensor,
        chunk_size: int,
        mean_over: float | None = None,
        graphs: GradientGraphs | None = None,
    ) -> torch.Tensor:
        """Generalised Gauss-Newton products :math:`G V^T`: ``[k, p]``.

        :math:`G = \\frac1n\\sum_i J_i^T H_{out,i} J_i + \\Lambda`, where
        :math:`J_i = \\partial f(x_i;\\theta)/\\partial\\theta` is the Jacobian of the model's
        output for example ``i`` and :math:`H_{out,i} = \\partial^2\\ell/\\partial f^2` the
        output-space Hessian of its loss. Per chunk: one forward pass, then for each vector
        ``jvp`` through the model (:math:`J v`), the output Hessian, and ``vjp`` back
        (:math:`J^T \\cdot`), ``vmap``-ed over the ``k`` vectors; :math:`J` is never formed.
        With ``second_order="reverse-over-reverse"`` :math:`J v` is the ``vjp`` of the linear
        map :math:`u \\mapsto J^T u` instead of a ``jvp``; under ``"auto"`` the ``jvp`` is
        used (measured faster: it needs first derivatives only) until the model meets an
        operation without a forward-mode derivative, then the ``vjp`` (once, with a warning).
        Under ``"auto"`` a plain ``nn.Sequential`` MLP runs the products by hand instead
        (:func:`infl.chain_hvp.chain_hvp`), its primal passes kept in ``graphs`` if given.
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
        mean_over
            Divide the summed per-example terms by this instead of the number of examples
            (as in :meth:`hvp`).

        Raises
        ------
        InputError
            If the objective's loss has no output-space Hessian (see
            :func:`~infl.objective.output_hessian_loss`).
        """
        self._check_vectors(vectors, "GGN-vector product")
        output_hessian_loss(self.objective.per_example_loss)  # refuses early, naming the fix
        if graphs is not None:
            graphs.calls += 1
        position = [0]

        def one_chunk(batch: Batch, into: torch.Tensor | None = None) -> torch.Tensor:
            position[0] += 1
            chunk = position[0] - 1
            chained = chain_hvp(self, batch, vectors, graphs, chunk, gauss_newton=True, into=into)
            if chained is not None:
                return chained
            if self.requested_second_order == "reverse-over-reverse" or self._ggn_transpose:
                return self._ggn_chunk(batch, vectors, forward_mode=False)
            try:
                return self._ggn_chunk(batch, vectors, forward_mode=True)
            except (NotImplementedError, RuntimeError) as err:
                if self.requested_second_order != "auto" or not _missing_forward_ad(err):
                    raise
                op = _operation_named(err)
            self._ggn_transpose = True
            warnings.warn(
                f"the model uses {op}, which has no forward-mode derivative "
                "in PyTorch, so infl computes Jacobian-vector products of the Gauss-Newton "
                "matrix as the vjp of u -> J^T u from now on (the same products).",
                InflWarning,
                stacklevel=5,
            )
            return self._ggn_chunk(batch, vectors, forward_mode=False)

        whole = functools.partial(whole_data_products, self, vectors, graphs, gauss_newton=True)
        what = "a Gauss-Newton-vector product"
        return curvature_products(
            self, data, vectors, chunk_size, one_chunk, what, mean_over, whole
        )

    def ggn_matrix(
        self, data: IndexedData | Batch, chunk_size: int, index: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The dense Gauss-Newton matrix :math:`G` ``[p, p]`` from per-example output Jacobians.

        :math:`G = \\frac1n \\sum_i J_i^T H_{out,i} J_i + \\Lambda`, symmetrised, with
        :math:`J_i` ``[K, p]`` by ``vmap(jacrev)`` (``K`` backward passes per example instead of
        ``p`` products; memory ``chunk_size * K * p``). Returns ``None`` (assemble from
        products instead) when the model's output is not one tensor or has more than 256
        numbers per example. ``index``: only the block of those flat parameter indices
        (``[q, q]``). See :func:`infl.second_order.dense_ggn`.
        """
        return dense_ggn(self, data, chunk_size, index)

    def _ggn_chunk(
        self, batch: Batch, vectors: torch.Tensor, *, forward_mode: bool
    ) -> torch.Tensor:
        """Summed (not averaged) GGN products of one chunk; ``J v`` by ``jvp`` or by ``vjp``."""
        return ggn_chunk(self, batch, vectors, forward_mode=forward_mode)

    # ---------------------------------------------------------------- checks
    def check_data(self, data: IndexedData, *, measure_activations: bool = True) -> None:
        """Evaluate the first few examples of ``data`` once, turning PyTorch's errors into ours.

        Runs the model on the first :data:`CHECK_EXAMPLES` examples (twice, no gradient; once
        for a plain ``nn.Sequential`` of ``nn.Linear`` layers and element-wise activations)
        where the data first meets the model, so that a mismatch is reported at construction,
        naming the example and the fix, rather than deep inside a vmapped gradient:

        * the forward pass fails: integer inputs to a floating-point model, a feature width
          that is not the first layer's ``in_features``, or any other error (wrapped with
          the data's shape and dtype);
        * targets the built-in loss cannot use (see
          :meth:`~infl.objective.SupervisedLoss.check_targets`): ``[b, 1]`` class indices,
          labels outside ``0..C-1``, ``ignore_index`` labels, float class indices;
        * the two evaluations differ: the forward pass is random (functional dropout).

        With ``measure_activations`` it also sets :attr:`activation_bytes` (``chunk_size="auto"``).

        Raises
        ------
        InputError
            For a data/model mismatch.
        ModelStateError
            For a random forward pass.
        """
        shape, self.activation_bytes = check_first_examples(self, data, measure_activations)
        if shape is not None:
            self._output_shape = shape

    def check_targets(self, batch: Batch, *, offset: int = 0, what: str = "data") -> None:
        """Check a batch's targets for a built-in loss (no-op before :meth:`check_data`).

        Cheap (comparisons on the targets, no forward pass); ``offset`` is the index of the
        batch's first example in the data, so that errors name the example's own index.
        """
        loss = self.objective.per_example_loss
        if not isinstance(loss, SupervisedLoss) or self._output_shape is None:
            return
        _, targets = loss.split(batch)
        loss.check_targets(targets, self._output_shape, offset=offset, what=what)

    def check_stationarity(
        self,
        train_grads: Iterable[tuple[int, torch.Tensor]],
        num_train: int,
        *,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Stationarity:
        """How far :math:`\\theta` is from a minimum of :math:`J`, from one pass of gradients.

        With the training gradients :math:`g_i = \\nabla\\ell(z_i) + \\Lambda\\theta`
        (``train_grads`` yields ``(start, g[start:start+b])`` chunks, e.g. the ones the
        calculator caches), :math:`\\nabla J = \\frac1n\\sum_i g_i` and the gradient scale
        :math:`s = (\\frac1n\\sum_i\\|g_i\\|^2)^{1/2}`. Cost: :math:`O(np)` on top of the
        gradients, :math:`O(p)` memory. The result warns nothing; see
        :meth:`Stationarity.warn_if_not_minimum`. Under ``torch.distributed``, ``train_grads``
        are this rank's shard, ``num_train`` all ranks' total and ``all_reduce`` sums over the
        ranks (:meth:`infl.distributed.ProcessGroup.all_reduce_sum`).
        """
        return self.stationarity_from_moments(
            gradient_moments(train_grads), num_train, all_reduce=all_reduce
        )

    def stationarity_from_moments(
        self,
        moments: Iterable[tuple[torch.Tensor, torch.Tensor]],
        num_train: int,
        *,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Stationarity:
        """:meth:`check_stationarity` from each chunk's gradient sum and sum of squared norms
        (:meth:`train_grad_moments`), so that no chunk's ``[b, p]`` gradients need forming."""
        return measure_stationarity(
            moments,
            num_train,
            names=self.names,
            numels=self.numels,
            theta=self.flat_params,
            decay=self.decay,
            objective=self.objective,
            all_reduce=all_reduce,
        )

    def _check_vectors(self, vectors: torch.Tensor, what: str) -> None:
        if vectors.dim() != 2 or vectors.shape[1] != self.num_params:
            raise InputError(
                f"{what} right-hand sides must have shape [k, p={self.num_params}], "
                f"got {tuple(vectors.shape)}"
            )
