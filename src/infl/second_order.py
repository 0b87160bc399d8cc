"""How infl differentiates the model twice: Hessian- and Gauss-Newton-vector products.

The second-order machinery behind :class:`~infl.model.ModelWrapper` (whose methods delegate
here): the evaluation settings under which the model has forward-mode and second derivatives
(:func:`functional_evaluation`), the reverse-over-reverse (``torch.autograd`` double backward)
and forward-over-reverse (``jvp`` of ``grad``) Hessian-vector products of one chunk, the
Gauss-Newton products of one chunk (``J v`` by ``jvp`` or by the ``vjp`` of
:math:`u \\mapsto J^T u`), the dense Gauss-Newton matrix from per-example output Jacobians,
and the one-time switch between modes when PyTorch lacks a derivative
(:func:`second_order_call`). Products here are summed over a chunk, not averaged; the mean
and the weight decay are added by :class:`~infl.model.ModelWrapper`.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.func import grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from infl.data import Batch, IndexedData, batch_size, tree_map_tensors
from infl.errors import InflWarning, ModelStateError, NonFiniteError
from infl.finite import all_finite
from infl.linear_ggn import MAX_JACOBIAN_OUTPUTS, linear_ggn
from infl.losses import SupervisedLoss
from infl.objective import output_hessian_loss

if TYPE_CHECKING:
    from infl.model import ModelWrapper
    from infl.sequential_chain import ChainPrimal

__all__ = [
    "GRAPH_BUDGET_BYTES",
    "GradientGraphs",
    "SecondOrder",
    "curvature_products",
    "dense_ggn",
    "functional_evaluation",
    "ggn_chunk",
    "hvp_double_backward",
    "hvp_forward_over_reverse",
    "second_order_call",
]

_LOOP_MAX_VECTORS = 4
_LOOP_MIN_PARAMS = 1000
"""The double-backward HVP takes one backward pass per vector when ``k <= 4`` or
``p >= 1000`` (15-20% faster than one batched pass on the digits MLP and CNN, also for a
dense Hessian's blocks), and one batched pass (``is_grads_batched``) otherwise: on the Iris
MLP (p = 43) with 10 vectors it is 4x faster than the loop."""

SecondOrder = Literal["auto", "forward-over-reverse", "reverse-over-reverse"]
"""How :class:`ModelWrapper` differentiates twice (see :attr:`ModelWrapper.second_order`)."""


@contextlib.contextmanager
def functional_evaluation() -> Iterator[None]:
    """The settings every infl evaluation of the model runs under (restored on exit).

    * ``sdpa_kernel(SDPBackend.MATH)``: scaled dot-product attention is computed from
      matmuls and a softmax, which have forward-mode and second derivatives and batching
      rules; the fused flash/memory-efficient kernels have none of these.
    * ``torch.backends.mha.set_fastpath_enabled(False)``: ``nn.MultiheadAttention`` and
      ``nn.TransformerEncoderLayer`` never take their fused eval-mode "fast path"
      (``_native_multi_head_attention``, ``_transformer_encoder_layer_fwd``), which is chosen
      when no gradient is recorded (so under ``torch.no_grad`` and inside ``jvp``), has no
      forward-mode derivative, and returns zeros at padded positions where the
      differentiable path does not: values and gradients must come from one function.

    The fast-path switch is a process-wide PyTorch flag; it is set only for the duration of
    the ``with`` block.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _missing_forward_ad(err: BaseException) -> bool:
    """Whether ``err`` is PyTorch saying an operation has no forward-mode derivative."""
    text = str(err)
    return isinstance(err, (NotImplementedError, RuntimeError)) and (
        "forward AD" in text or "forward mode AD" in text
    )


def _missing_double_backward(err: BaseException) -> bool:
    """Whether ``err`` is PyTorch saying an operation cannot be differentiated twice."""
    text = str(err)
    return isinstance(err, (NotImplementedError, RuntimeError)) and (
        "once_differentiable" in text or ("derivative for" in text and "not implemented" in text)
    )


def _operation_named(err: BaseException) -> str:
    """The operation PyTorch names in a missing-derivative error (best effort)."""
    text = str(err)
    for marker in ("forward AD with ", "derivative for "):
        if marker in text:
            return text.split(marker, 1)[1].split(" ", 1)[0]
    if "once_differentiable" in text:
        return "a custom autograd.Function marked @once_differentiable"
    if "custom autograd.Function" in text:
        return "a custom autograd.Function without a jvp"
    return "an operation of the model"


def _second_derivative_error(err: BaseException, what: str) -> BaseException:
    """A missing second derivative as a ModelStateError; any other error unchanged."""
    text = str(err)
    if "derivative for" in text and "not implemented" in text:
        return ModelStateError(
            f"{what} needs the second derivative of {_operation_named(err)}, which PyTorch "
            "does not implement. Use a solver that needs only per-example gradients "
            "(infl.KFAC or infl.EKFAC), or replace that operation in the model."
        )
    return err


GRAPH_BUDGET_BYTES = 512 * 2**20
"""Most bytes of saved activations a :class:`GradientGraphs` keeps (per operator)."""


class GradientGraphs:
    """Each chunk's gradient graph, built once and kept for the repeated HVPs of one operator.

    A reverse-over-reverse HVP of a chunk is one forward pass and one backward pass that
    records its graph (giving :math:`g(\\theta)`), then one backward pass of that graph per
    vector. The first two do not depend on the vectors, so an operator whose data and
    parameters are fixed (a full-data :class:`~infl.operators.HessianOperator`, which CG,
    Arnoldi, Lanczos and full-batch LiSSA apply again and again) can keep the graphs and pay
    only the last pass per product: measured 1.5x per product on the digits CNN (2 vectors),
    1.2x on the 85k digits MLP (10 vectors), 2.6x on the Iris MLP
    (``benchmarks/bench_hvp_routes.py``). Graphs are kept from the operator's second product on
    (a minibatch operator, used once, keeps none), chunk by chunk while their saved tensors
    fit ``budget_bytes``; chunks past the budget are recomputed as before. The products are
    the same numbers either way. Where the products run by hand (:mod:`infl.chain_hvp`), each
    chunk's primal pass is kept in :attr:`primals` instead, by the same rule and budget, and
    already from the first product when a solver has announced more than one call
    (:attr:`announced`): the size of a primal pass is known before it is kept.
    """

    def __init__(self, budget_bytes: int = GRAPH_BUDGET_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.calls = 0
        self.announced = 0
        """Calls of the operator a solver announced (:meth:`~infl.operators.LinearOperator.
        expect_products`); 0 when none did."""
        self.full = False
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.primals: dict[int, ChainPrimal] = {}  # what infl.chain_hvp keeps instead
        self.buffers: dict[str, torch.Tensor] = {}  # infl.chain_hvp's tangents, reused
        # bytes of each chunk's saved tensors, counted (by Python saved-tensor hooks) on a graph
        # that is used once and dropped: a kept graph is built without hooks, so it holds no
        # Python callables (none to call per product, none to release at interpreter exit)
        self.chunk_bytes: dict[int, int] = {}

    @property
    def keeping(self) -> bool:
        """Whether graphs built now are kept (from the second product on, budget left)."""
        return self.calls >= 2 and not self.full

    @property
    def repeated(self) -> bool:
        """Whether products repeat: from the second call on, or from the first when two or more
        calls were :attr:`announced`."""
        return self.calls >= 2 or self.announced >= 2

    @property
    def keeping_sized(self) -> bool:
        """Whether state whose size is known before it is built (the hand-run chain's primal
        passes) is kept now: while :attr:`repeated` and the budget is not full. Measured on the
        digits MLP (block CG, three ten-vector products): keeping it, and the tangent buffers,
        from the first product spares the second product its primal pass and 14,380 page
        faults."""
        return self.repeated and not self.full

    def admit(self, nbytes: int, *, close: bool = True) -> bool:
        """Count ``nbytes`` more as kept and say so when they fit the budget; else say no, and
        with ``close`` mark the budget full (nothing more is kept)."""
        if self.used_bytes + nbytes <= self.budget_bytes:
            self.used_bytes += nbytes
            return True
        self.full = self.full or close
        return False


def _gradient_graph(
    wrapper: ModelWrapper, batch: Batch, count_bytes: bool
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """``(theta, g(theta) with its graph or None when H = 0, bytes of saved tensors)``."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    hooks = (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        if count_bytes
        else contextlib.nullcontext()
    )
    with torch.enable_grad(), hooks:
        theta = wrapper.flat_params.detach().requires_grad_(True)
        total = wrapper._loss_sum(theta, batch)
        if not total.requires_grad:  # the loss does not depend on the parameters
            return theta, None, saved[0]
        (gradient,) = torch.autograd.grad(total, theta, create_graph=True)
    if not gradient.requires_grad:  # the loss is linear in the parameters: H = 0
        return theta, None, saved[0]
    return theta, gradient, saved[0]


def hvp_double_backward(
    wrapper: ModelWrapper,
    batch: Batch,
    vectors: torch.Tensor,
    graphs: GradientGraphs | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """Summed (not averaged) HVPs of one chunk by ``torch.autograd`` double backward.

    With ``graphs``, the chunk's gradient graph (key ``chunk``) is taken from it when kept, and
    kept when built while :attr:`GradientGraphs.keeping`.
    """
    entry = graphs.kept.get(chunk) if graphs is not None else None
    if entry is not None:
        theta, gradient = entry
        keep = True
    else:
        counting = graphs is not None and not graphs.full and chunk not in graphs.chunk_bytes
        theta, gradient, nbytes = _gradient_graph(wrapper, batch, counting)
        keep = False
        if graphs is not None and counting:
            graphs.chunk_bytes[chunk] = nbytes
        elif graphs is not None and graphs.keeping and graphs.admit(graphs.chunk_bytes[chunk]):
            graphs.kept[chunk] = (theta, gradient)
            keep = True
    if gradient is None:
        return torch.zeros_like(vectors)
    k = vectors.shape[0]
    if k <= _LOOP_MAX_VECTORS or wrapper.num_params >= _LOOP_MIN_PARAMS:
        # one backward pass of the graph per vector: measured faster than the batched
        # pass everywhere but on tiny models with many vectors (benchmarks/bench_hvp.py)
        rows = [
            torch.autograd.grad(gradient, theta, v, retain_graph=keep or i < k - 1)[0]
            for i, v in enumerate(vectors)
        ]
        return torch.stack(rows)
    (products,) = torch.autograd.grad(
        gradient, theta, vectors, is_grads_batched=True, retain_graph=keep
    )
    return products


def hvp_forward_over_reverse(
    wrapper: ModelWrapper,
) -> Callable[[torch.Tensor, torch.Tensor, Batch], torch.Tensor]:
    """``(vectors [k, p], theta [p], batch) -> [k, p]`` summed HVPs, built once per wrapper."""
    if wrapper._for_hvp is None:
        gradient = grad(wrapper._loss_sum)

        def product(v: torch.Tensor, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
            return jvp(lambda t: gradient(t, batch), (theta,), (v,))[1]

        wrapper._for_hvp = vmap(product, in_dims=(0, None, None))
    return wrapper._for_hvp


def ggn_chunk(
    wrapper: ModelWrapper, batch: Batch, vectors: torch.Tensor, *, forward_mode: bool
) -> torch.Tensor:
    """Summed (not averaged) GGN products of one chunk; ``J v`` by ``jvp`` or by ``vjp``."""
    loss = output_hessian_loss(wrapper.objective.per_example_loss)
    inputs, targets = loss.split(batch)

    def forward(params: dict[str, torch.Tensor]) -> Any:
        return wrapper.functional_model(params)(inputs)

    primal = vjp(forward, wrapper.params)
    outputs, pullback = primal[0], primal[1]

    if forward_mode:

        def jacobian_product(v: torch.Tensor) -> torch.Tensor:
            return jvp(forward, (wrapper.params,), (wrapper.unflatten(v),))[1]

    else:
        # u -> J^T u is linear, so its vector-Jacobian product at any u is J v
        def transpose(u: torch.Tensor) -> dict[str, torch.Tensor]:
            return vjp(forward, wrapper.params)[1](u)[0]

        linear = vjp(transpose, torch.zeros_like(outputs))[1]

        def jacobian_product(v: torch.Tensor) -> torch.Tensor:
            return linear(wrapper.unflatten(v))[0]

    def gv(v: torch.Tensor) -> torch.Tensor:
        jv = jacobian_product(v)
        (jt,) = pullback(loss.output_hessian_product(outputs, targets, jv))
        return wrapper.flatten(jt)

    return vmap(gv)(vectors)


def dense_ggn(
    wrapper: ModelWrapper,
    data: IndexedData | Batch,
    chunk_size: int,
    index: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The dense Gauss-Newton matrix :math:`G` ``[p, p]`` from per-example output Jacobians.

    .. math::

        G = \\frac1n \\sum_i J_i^T H_{out,i} J_i + \\Lambda
          = \\frac1n\\,\\mathbf{J}^T (\\mathbf{H}_{out}\\mathbf{J}) + \\Lambda,

    with :math:`J_i` ``[K, p]`` the Jacobian of example ``i``'s ``K`` outputs
    (``vmap(jacrev)``: ``K`` backward passes per example) and :math:`H_{out,i}` ``[K, K]``
    its loss's output Hessian (``K`` output-Hessian products); per chunk one matrix product
    of ``[p, bK]`` by ``[bK, p]``. It equals :math:`p` Gauss-Newton-vector products of
    the identity to round-off at a cost of ``K`` instead of ``p`` backward passes per
    example, and memory ``chunk_size * K * p``. The result is symmetrised.

    Returns ``None`` (assemble from products instead) when the model's output is not one
    tensor or has more than 256 numbers per example. With ``index`` (``[q]`` flat parameter
    indices) only the block :math:`G_{\text{index},\text{index}}` ``[q, q]`` is formed: the
    matrix product shrinks by :math:`(q/p)^2`.
    """
    loss = output_hessian_loss(wrapper.objective.per_example_loss)
    kronecker = _linear_dense_ggn(wrapper, data, chunk_size, index, loss)
    if kronecker is not None:
        return kronecker
    chunks = data.chunks(chunk_size) if isinstance(data, IndexedData) else [(0, data)]
    p = wrapper.num_params if index is None else int(index.numel())
    total = torch.zeros(p, p, dtype=wrapper.dtype, device=wrapper.device)
    count = 0
    for _, raw in chunks:
        batch = wrapper.prepare(raw)
        inputs, targets = loss.split(batch)

        def single(params: dict[str, torch.Tensor], example: Any) -> torch.Tensor:
            one = tree_map_tensors(lambda t: t.unsqueeze(0), example)
            return wrapper.functional_model(params)(one).reshape(-1)

        with torch.no_grad(), functional_evaluation():
            outputs = wrapper.functional_model(wrapper.params)(inputs)
        if not isinstance(outputs, torch.Tensor) or outputs[0].numel() > MAX_JACOBIAN_OUTPUTS:
            return None
        b, k = outputs.shape[0], outputs[0].numel()
        with functional_evaluation():
            jac = wrapper.flatten(
                vmap(torch.func.jacrev(single), in_dims=(None, 0))(wrapper.params, inputs),
                batch_dims=2,
            )  # [b, K, p]
            if index is not None:
                jac = jac[:, :, index.to(jac.device)]
            basis = torch.eye(k, dtype=wrapper.dtype, device=wrapper.device)
            columns = [
                loss.output_hessian_product(
                    outputs, targets, basis[c].reshape(outputs.shape[1:]).expand_as(outputs)
                ).reshape(b, k)
                for c in range(k)
            ]
        h_out = torch.stack(columns, dim=-1)  # [b, K, K]: H_out e_c in column c
        weighted = torch.einsum("bkc,bcp->bkp", h_out, jac)
        total += jac.reshape(b * k, p).T @ weighted.reshape(b * k, p)
        count += b
    return _finish_ggn(wrapper, total / count, index)


def _finish_ggn(
    wrapper: ModelWrapper, mean: torch.Tensor, index: torch.Tensor | None
) -> torch.Tensor:
    """The mean over examples symmetrised, plus the weight decay; refused when not finite."""
    dense = (mean + mean.T) / 2
    if wrapper.has_decay:
        decay = wrapper.decay if index is None else wrapper.decay[index.to(wrapper.decay.device)]
        dense = dense + torch.diag(decay)
    if not torch.isfinite(dense).all():
        raise NonFiniteError(
            "the Gauss-Newton matrix is not finite; the loss or its curvature overflows "
            "at the trained parameters (check for exploding logits or NaN inputs)"
        )
    return dense


def _linear_dense_ggn(
    wrapper: ModelWrapper,
    data: IndexedData | Batch,
    chunk_size: int,
    index: torch.Tensor | None,
    loss: SupervisedLoss,
) -> torch.Tensor | None:
    """:func:`dense_ggn` from per-example Kronecker factors (:func:`infl.linear_ggn.linear_ggn`)
    for ``nn.Linear`` models, checked against one Gauss-Newton-vector product of a random
    vector (relative difference at most :math:`10^3\\varepsilon`); ``None`` when the model is
    not of that form or the check fails."""
    if not wrapper._linear_grads.applicable:
        return None
    full = torch.arange(wrapper.num_params) if index is None else index.cpu()
    chunks = data.chunks(chunk_size) if isinstance(data, IndexedData) else [(0, data)]
    with functional_evaluation():
        summed = linear_ggn(wrapper, (wrapper.prepare(raw) for _, raw in chunks), loss, full)
    if summed is None or summed[1] == 0:
        return None
    total, count = summed
    dense = _finish_ggn(wrapper, total / count, index)
    gen = torch.Generator().manual_seed(0)
    probe = torch.zeros(1, wrapper.num_params, dtype=wrapper.dtype)
    probe[0, full] = torch.randn(full.numel(), dtype=wrapper.dtype, generator=gen)
    probe = probe.to(wrapper.device)
    exact = wrapper.ggn_vp(data, probe, chunk_size)[0, full.to(wrapper.device)]
    got = dense @ probe[0, full.to(wrapper.device)]
    tolerance = 1e3 * torch.finfo(wrapper.dtype).eps
    error = torch.linalg.vector_norm(got - exact) / torch.linalg.vector_norm(exact).clamp_min(
        torch.finfo(wrapper.dtype).tiny
    )
    return dense if bool(error <= tolerance) else None


def second_order_call(
    wrapper: ModelWrapper, one_chunk: Callable[[Batch], torch.Tensor], batch: Batch, what: str
) -> torch.Tensor:
    """``one_chunk(batch)``; under ``"auto"``, switching mode once if a derivative is missing.

    Reverse-over-reverse needs every operation's second derivative (double backward),
    forward-over-reverse every operation's forward-mode derivative; a model that lacks
    the one needed by the current mode moves to the other mode (once, with a warning),
    unless the mode was fixed by the user.
    """
    try:
        with functional_evaluation():
            return one_chunk(batch)
    except (NotImplementedError, RuntimeError) as first:
        err: BaseException = first
        mode = wrapper.second_order
        forward_missing = mode == "forward-over-reverse" and _missing_forward_ad(err)
        double_missing = mode == "reverse-over-reverse" and _missing_double_backward(err)
        if not (forward_missing or double_missing):
            raise _second_derivative_error(err, what) from err
        op = _operation_named(err)
        other = "reverse-over-reverse" if forward_missing else "forward-over-reverse"
        needs = "forward-mode derivative" if forward_missing else "second derivative"
        if wrapper.requested_second_order != "auto":
            raise ModelStateError(
                f"{what} needs the {needs} of {op}, which PyTorch does not implement, "
                f"and second_order={mode!r} was asked for. Use second_order='auto' or "
                f"{other!r}."
            ) from err
        wrapper.second_order = other
        how = (
            "vjp of grad instead of jvp of grad: the same products, with the backward "
            "graph of the gradient kept in memory"
            if forward_missing
            else "jvp of grad instead of a double backward: the same products"
        )
        warnings.warn(
            f"the model uses {op}, which has no {needs} in PyTorch, so infl computes its "
            f"second-order products {other} from now on ({how}). "
            "ModelWrapper.second_order records the mode; pass "
            f"second_order={other!r} to start there.",
            InflWarning,
            stacklevel=4,
        )
    try:
        with functional_evaluation():
            return one_chunk(batch)
    except (NotImplementedError, RuntimeError) as retry_err:
        if _missing_forward_ad(retry_err) or _missing_double_backward(retry_err):
            # neither mode can differentiate the model twice: name the first failure
            raise _second_derivative_error(err, what) from retry_err
        raise _second_derivative_error(retry_err, what) from retry_err


def curvature_products(
    wrapper: ModelWrapper,
    data: IndexedData | Batch,
    vectors: torch.Tensor,
    chunk_size: int,
    one_chunk: Callable[..., torch.Tensor],
    what: str,
    mean_over: float | None = None,
    whole: Callable[[IndexedData], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """What :meth:`~infl.model.ModelWrapper.hvp` and :meth:`~infl.model.ModelWrapper.ggn_vp`
    return: the mean over the examples of ``one_chunk``'s summed products (the sum divided
    by ``mean_over`` when given), plus ``wrapper``'s weight decay. ``one_chunk(batch,
    into=out)`` returns the chunk's products, or ``out`` itself when it added them there in
    place; ``whole(data)`` the sum over all of them at once, when it can."""
    if isinstance(data, IndexedData):
        summed = whole(data) if whole is not None else None
        out = torch.zeros_like(vectors) if summed is None else summed
        for _, batch in data.chunks(chunk_size) if summed is None else ():
            adding = functools.partial(one_chunk, into=out)
            part = second_order_call(wrapper, adding, wrapper.prepare(batch), what)
            if part is not out:
                out += part
        n = len(data)
    else:
        batch = wrapper.prepare(data)
        n = batch_size(batch)
        # autograd may hand back a tensor it does not own (the vectors themselves when the
        # Hessian is the identity): the sum below is made in a copy
        out = second_order_call(wrapper, one_chunk, batch, what).clone()
    out.div_(n if mean_over is None else mean_over)  # in place: fewer fresh [k, p] tensors
    if wrapper.has_decay:
        out.addcmul_(wrapper.decay, vectors)
    if not all_finite(out):
        raise NonFiniteError(
            f"{what} is not finite; the loss or its curvature overflows "
            "at the trained parameters (check for exploding logits or NaN inputs)"
        )
    return out
