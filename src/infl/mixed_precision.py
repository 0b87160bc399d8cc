"""Curvature products in a lower precision than the model's: float32 products, float64 answers.

A float64 model's Hessian-vector products cost several times less in float32 on a CPU (the
convolution kernels have no fast float64 path; dense products move half the bytes).
:class:`MixedPrecisionOperator` computes the products of a curvature operator in
``product_dtype`` (float32) on a *twin* of the model, the model and data cast once, and
returns them in the caller's dtype. It keeps its full-precision operator
(:attr:`MixedPrecisionOperator.full_precision`) for the products that must be exact:

* :class:`~infl.ConjugateGradient` refines (:func:`full_precision_operator` finds the
  full-precision twin of the operator it solves with): inner CG iterations on the float32
  products, each outer step corrected by the float64 residual :math:`r = b - Ax`, until the
  float64 residual meets ``rtol``/``atol`` (the guarantee of plain float64 CG);
* :meth:`~MixedPrecisionOperator.to_dense` is the full-precision matrix (the exact solver and
  the dense spectrum stay float64);
* LiSSA, Arnoldi, Lanczos and ``damping="auto"`` use the float32 products as they are: their
  approximation error is orders of magnitude above float32 round-off.

``InfluenceCalculator(..., curvature_dtype=torch.float32)`` builds it
(:func:`mixed_precision_operator`); see ``docs/mixed_precision.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

from infl.data import Batch, IndexedData, tensor_leaves, tree_map_tensors
from infl.errors import InputError, ModelStateError
from infl.model import ModelWrapper
from infl.operators import DampedOperator, LinearOperator, TrainingDataOperator

__all__ = [
    "MixedPrecisionOperator",
    "check_curvature_dtype",
    "full_precision_operator",
    "mixed_precision_operator",
    "product_dtype",
]

_PRECISION = {torch.float16: 0, torch.bfloat16: 0, torch.float32: 1, torch.float64: 2}


def check_curvature_dtype(dtype: Any, model_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype of curvature products for a model of ``model_dtype``, or ``None`` (the model's).

    ``None`` and the model's own dtype mean products in the model's dtype (no twin is built).

    Raises
    ------
    InputError
        ``dtype`` is not a ``torch.dtype``, not a real floating dtype, of lower precision than
        float32 (float16/bfloat16: not supported, untested), or of higher precision than the
        model's (products more precise than the model itself).
    """
    if dtype is None or dtype == model_dtype:
        return None
    if not isinstance(dtype, torch.dtype):
        raise InputError(
            f"curvature_dtype must be a torch.dtype such as torch.float32 (or None for the "
            f"model's dtype), got {type(dtype).__name__} {dtype!r}"
        )
    if dtype not in _PRECISION:
        raise InputError(
            f"curvature_dtype must be a real floating dtype (torch.float32), got {dtype}"
        )
    if _PRECISION[dtype] < _PRECISION[torch.float32]:
        raise InputError(
            f"curvature_dtype={dtype} is not supported: its round-off (eps "
            f"{torch.finfo(dtype).eps:.1g}) times the condition number of H + damping*I "
            "usually exceeds 1, so the refinement of CG would not converge. Use "
            "curvature_dtype=torch.float32, or None for the model's dtype."
        )
    if _PRECISION.get(model_dtype, 2) <= _PRECISION[dtype]:
        raise InputError(
            f"curvature_dtype={dtype} is more precise than the model ({model_dtype}): the "
            "products would be taken on a model cast up, which gains nothing. Use "
            "curvature_dtype=None (products in the model's dtype)."
        )
    return dtype


class MixedPrecisionOperator(LinearOperator):
    """A curvature operator whose products are taken in ``product_dtype`` (float32).

    ``matmat`` casts the vectors down to ``product_dtype``, applies :attr:`low_precision` (the
    same operator on a model and data cast to ``product_dtype``) and casts the products back to
    :attr:`dtype`, the full-precision operator's dtype, so a solver sees an operator of the
    model's dtype whose products carry float32 round-off (``1e-6`` to ``3e-6`` of
    :math:`\\|Av\\|` on the digits CNN of ``benchmarks/bench_mixed_precision.py``).

    Parameters
    ----------
    full
        The full-precision operator (the model's dtype), or a callable that builds it on first
        use (minibatch operators build theirs only if asked).
    low
        The same operator in ``product_dtype``.
    size, dtype, device
        Those of the full-precision operator (needed when ``full`` is a callable).

    Attributes
    ----------
    low_precision : LinearOperator
        The operator in ``product_dtype``.
    product_dtype : torch.dtype
        The dtype of the products.
    num_matvecs : int
        Products taken in ``product_dtype`` through this operator (the full-precision
        operator counts its own in ``full_precision.num_matvecs``).
    wrapper, data, chunk_size
        Those of the full-precision operator when it has them (K-FAC/EK-FAC read them and
        build their factors in the model's dtype; LiSSA reads ``n``).

    Notes
    -----
    Cost per product: that of the operator in ``product_dtype`` plus two casts of ``[k, p]``.
    Memory: a copy of the model's parameters and buffers in ``product_dtype``, and of the
    training data when it is held as tensors (cast once at construction).
    """

    def __init__(
        self,
        full: LinearOperator | Callable[[], LinearOperator],
        low: LinearOperator,
        *,
        size: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        if isinstance(full, LinearOperator):
            size, dtype, device = full.size, full.dtype, full.device
        if size is None or dtype is None or device is None:
            raise InputError("a lazily built full-precision operator needs size, dtype, device")
        super().__init__(size, dtype, device)
        self._full: LinearOperator | None = full if isinstance(full, LinearOperator) else None
        self._make_full = None if isinstance(full, LinearOperator) else full
        self.low_precision = low
        self.product_dtype: torch.dtype = low.dtype
        like = self._full
        if like is not None:
            for name in ("wrapper", "data", "chunk_size"):
                if hasattr(like, name):
                    setattr(self, name, getattr(like, name))

    @property
    def full_precision(self) -> LinearOperator:
        """The operator in the model's dtype (built on first use for a minibatch operator)."""
        if self._full is None:
            assert self._make_full is not None
            self._full = self._make_full()
        return self._full

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        low = self.low_precision.matmat(vectors.to(self.product_dtype))
        return low.to(self.dtype)

    def _answering_matrix(self) -> torch.Tensor | None:
        """The full-precision operator's assembled matrix, once it answers products (small
        ``p``, ``dense="auto"``): then products are exact and cheaper than in float32."""
        full = self._full
        return None if full is None or not full.answers_dense else full.to_dense()

    def expect_products(self, count: int, calls: int | None = None) -> bool:
        """Forwarded to the full-precision operator: for a small ``p`` it assembles its
        float64 matrix (:meth:`~infl.operators.TrainingDataOperator.dense_pays`), which then
        answers every product here too (no float32 product, no refinement)."""
        full = self._full
        return False if full is None else full.expect_products(count, calls)

    def to_dense(self, block_size: int = 256, *, progress: bool = False) -> torch.Tensor:
        """The full-precision ``[p, p]`` matrix (:meth:`LinearOperator.to_dense` of
        :attr:`full_precision`, kept there): dense solvers stay in the model's dtype."""
        return self.full_precision.to_dense(block_size, progress=progress)

    @property
    def supports_subsample(self) -> bool:
        full = self._full
        return isinstance(full, TrainingDataOperator) and full.supports_subsample

    def subsample(self, batch_size: int, generator: torch.Generator) -> LinearOperator:
        """The operator on a minibatch: the examples the full-precision operator's own
        ``subsample`` draws from ``generator``, its products in ``product_dtype``."""
        return self._minibatches(lambda op: [op.subsample(batch_size, generator)])[0]

    def subsample_many(
        self, batch_size: int, count: int, generator: torch.Generator
    ) -> list[LinearOperator]:
        """``count`` minibatch operators: the full-precision operator's draws (the same random
        stream as its ``subsample_many``), each with products in ``product_dtype``."""
        return self._minibatches(lambda op: op.subsample_many(batch_size, count, generator))

    def partition(self, batch_size: int, generator: torch.Generator) -> list[LinearOperator]:
        """The blocks of the full-precision operator's own ``partition`` (the same examples
        and weights, drawn from ``generator``), each with products in ``product_dtype``; the
        float32 blocks keep their gradient graphs as the full-precision ones would."""
        return self._minibatches(lambda op: op.partition(batch_size, generator))

    def _minibatches(
        self, draw: Callable[[LinearOperator], Sequence[LinearOperator]]
    ) -> list[LinearOperator]:
        full, low = self._full, self.low_precision
        if not (
            isinstance(full, TrainingDataOperator)
            and isinstance(low, TrainingDataOperator)
            and isinstance(full.data, IndexedData)
            and isinstance(low.data, IndexedData)
        ):
            raise InputError(
                "minibatches need the training data as an IndexedData (not a single batch) "
                "behind a HessianOperator or GaussNewtonOperator; use LiSSA(batch_size=None)"
            )
        # the full-precision operator's class draws the indices (whatever its rule), on
        # stand-in data whose select() returns the indices: one draw serves both precisions
        proxy = type(full)(full.wrapper, _Indices(len(full.data)), 1)
        out: list[LinearOperator] = []
        for sub in draw(proxy):
            assert isinstance(sub, TrainingDataOperator)
            idx = torch.as_tensor(sub.data)
            twin = low.on_examples(
                idx, dense=False, mean_over=sub.mean_over, graph_budget=sub.graph_budget
            )
            out.append(
                MixedPrecisionOperator(
                    _minibatch_builder(full, idx, sub.mean_over),
                    twin,
                    size=self.size,
                    dtype=self.dtype,
                    device=self.device,
                )
            )
        return out


def _minibatch_builder(
    full: TrainingDataOperator, idx: torch.Tensor, mean_over: float | None
) -> Callable[[], LinearOperator]:
    def build() -> LinearOperator:
        return full.on_examples(idx, dense=full.dense, mean_over=mean_over)

    return build


class _Indices(IndexedData):
    """``n`` stand-in examples whose :meth:`select` returns the indices themselves."""

    def __init__(self, n: int) -> None:  # no data behind it: IndexedData.__init__ is skipped
        self.name = "training data"
        self._n = n

    def select(self, indices: Sequence[int] | torch.Tensor) -> Batch:
        return torch.as_tensor(indices, dtype=torch.long).reshape(-1)


def full_precision_operator(operator: LinearOperator) -> LinearOperator | None:
    """The full-precision twin of ``operator`` when its products are in a lower precision.

    :attr:`MixedPrecisionOperator.full_precision` for a :class:`MixedPrecisionOperator`, that
    twin damped by the same :math:`\\lambda` for a damped one; ``None`` for any other operator
    (its products are already those of its dtype). Solvers that refine (CG) call it.
    """
    if isinstance(operator, MixedPrecisionOperator):
        return operator.full_precision
    if isinstance(operator, DampedOperator):
        inner = full_precision_operator(operator.base)
        return None if inner is None else inner.damped(operator.damping)
    return None


def product_dtype(operator: LinearOperator) -> torch.dtype:
    """The dtype ``operator``'s products are computed in (its own dtype unless it is a damped
    or plain :class:`MixedPrecisionOperator`)."""
    while isinstance(operator, DampedOperator):
        operator = operator.base
    if isinstance(operator, MixedPrecisionOperator):
        return operator.product_dtype
    return operator.dtype


def mixed_precision_operator(
    operator: TrainingDataOperator, product_dtype: torch.dtype
) -> MixedPrecisionOperator:
    """``operator`` with its products in ``product_dtype``: a twin on the model and data cast.

    The twin's model is a deep copy of ``operator.wrapper.model`` holding the wrapper's
    parameters, cast with ``.to(product_dtype)`` (parameters and floating buffers); its
    :class:`~infl.ModelWrapper` has the same objective and ``second_order``. Training data held
    as tensors is cast once (floating tensors; on their own device); a ``Dataset`` or a stream
    is cast chunk by chunk, as the model's own wrapper does.

    Raises
    ------
    InputError
        ``operator`` is not a curvature operator over training data, or the model cannot be
        copied or evaluated in ``product_dtype`` (it holds tensors of its own dtype that are
        neither parameters nor buffers).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from infl import HessianOperator, IndexedData, ModelWrapper, Objective
    >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
    >>> w = ModelWrapper(nn.Linear(3, 2).double(), Objective("cross_entropy"))
    >>> op = mixed_precision_operator(HessianOperator(w, IndexedData((X, y))), torch.float32)
    >>> v = torch.randn(1, 8, dtype=torch.float64)
    >>> op.matmat(v).dtype, op.low_precision.dtype
    (torch.float64, torch.float32)
    >>> bool(((op.matmat(v) - op.full_precision.matmat(v)).norm() < 1e-5 * v.norm()))
    True
    """
    if not isinstance(operator, TrainingDataOperator):
        raise InputError(
            f"products in another precision need a curvature operator over training data "
            f"(HessianOperator or GaussNewtonOperator), got {type(operator).__name__}"
        )
    wrapper = operator.wrapper
    twin = ModelWrapper(
        _cast_model(wrapper, product_dtype),
        wrapper.objective,
        second_order=wrapper.requested_second_order,
    )
    data = operator.data
    low_data = _cast_data(data, product_dtype) if isinstance(data, IndexedData) else data
    _check_twin(twin, low_data, product_dtype)
    low = type(operator)(twin, low_data, operator.chunk_size, dense=False)
    return MixedPrecisionOperator(operator, low)


def _cast_model(wrapper: ModelWrapper, dtype: torch.dtype) -> torch.nn.Module:
    try:
        model = copy.deepcopy(wrapper.model)
    except Exception as err:  # any failure of deepcopy is reported the same way
        raise InputError(
            f"curvature_dtype={dtype} needs a copy of the model in {dtype}, and copy.deepcopy "
            f"of the model failed ({type(err).__name__}: {err}). Use curvature_dtype=None."
        ) from err
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in wrapper.params.items():  # the parameters infl holds, exactly
            named[name].copy_(value)
    return model.to(dtype)


def _cast_data(data: IndexedData, dtype: torch.dtype) -> IndexedData:
    """Tensor data cast once to ``dtype`` (floating leaves only); other data as it is."""
    tensors = getattr(data, "_tensors", None)
    if type(data) is not IndexedData or tensors is None:
        return data  # a Dataset or stream: the twin's wrapper casts each chunk

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    return IndexedData(tree_map_tensors(cast, tensors), name=data.name)


def _check_twin(twin: ModelWrapper, data: Any, dtype: torch.dtype) -> None:
    """Evaluate the twin's loss on two examples, turning a dtype mismatch into an InputError."""
    batch = data.select(range(min(2, len(data)))) if isinstance(data, IndexedData) else data
    try:
        values = twin.values(twin.objective.per_example_loss, batch)
    except (RuntimeError, TypeError) as err:
        raise InputError(
            f"the model could not be evaluated in {dtype} for curvature_dtype={dtype} "
            f"({type(err).__name__}: {err}). It probably holds tensors of its own dtype that "
            "are neither parameters nor buffers (model.to() does not cast them); register them "
            "as buffers, or use curvature_dtype=None."
        ) from err
    leaves = tensor_leaves(values)
    if any(t.is_floating_point() and t.dtype != dtype for t in leaves):
        raise ModelStateError(
            f"the loss of the {dtype} copy of the model is not {dtype}: the model or the loss "
            "casts to another dtype internally; use curvature_dtype=None."
        )
