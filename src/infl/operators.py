"""Symmetric linear operators on the parameter space: the curvature and its damped forms.

The curvature is the Hessian (:class:`HessianOperator`) or the generalised Gauss-Newton matrix
(:class:`GaussNewtonOperator`), both streamed over the training data.

Every operator acts on row-stacked vectors: :meth:`LinearOperator.matmat` maps ``[k, p]`` to
``[k, p]`` (row ``j`` of the output is :math:`A v_j`). Dense and matrix-free operators share this
interface, so a solver never knows which it has. Damping is operator algebra:
``operator.damped(lam)`` is :math:`A + \\lambda I` and means the same thing to every solver.

A solver about to take many products announces them
(:meth:`LinearOperator.expect_products`); an operator over training data whose ``[p, p]``
matrix is cheaper to assemble than those products (small ``p``) assembles it once and answers
every later product from it (``dense="auto"``, :class:`TrainingDataOperator`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal, TypeVar

import torch

from infl.data import Batch, IndexedData, batch_size
from infl.errors import InputError
from infl.factor_cache import FIT_FACTOR_BYTES, FitFactors
from infl.model import ModelWrapper
from infl.objective import output_hessian_loss
from infl.progress import progress_iter
from infl.second_order import GRAPH_BUDGET_BYTES, GradientGraphs
from infl.sequential_hessian import sequential_hessian
from infl.structured_hessian import (
    STRUCTURED_MIN_PARAMS,
    DenseAssembly,
    assemble_hessian,
    parameter_groups,
)

_T = TypeVar("_T", bound="TrainingDataOperator")

DENSE_AUTO_MAX_BYTES = 1 << 28
"""``dense="auto"`` assembles an operator's ``[p, p]`` matrix only when it takes at most this many
bytes (256 MiB: ``p`` up to 5,792 in float64, 8,192 in float32)."""

CALL_COST_ENTRIES = 250_000
"""What one product call costs beyond its passes over the data, counted as the per-example
gradient entries (``n p``) a pass would touch in that time: about 0.35 ms of Python and
dispatch per call, which on the Iris MLP (``n p = 5,160``) is the time of 50 passes and on the
digits MLP (``n p = 1.2e8``) of none (:meth:`TrainingDataOperator.dense_pays`)."""


class LinearOperator(ABC):
    """A symmetric ``p x p`` linear operator.

    Attributes
    ----------
    num_matvecs : int
        How many operator-vector products have been taken (a ``[k, p]`` matmat counts ``k``),
        however they were computed; benchmarks and diagnostics read it.
    num_dense_matvecs : int
        How many of those were answered from the operator's assembled dense matrix
        (:meth:`expect_products`) rather than by its own route (a pass over the data for the
        curvature operators): ``num_matvecs - num_dense_matvecs`` products cost a data pass.
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.size = size
        self.dtype = dtype
        self.device = device
        self.num_matvecs = 0
        self.num_dense_matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        """``(p, p)``."""
        return (self.size, self.size)

    @abstractmethod
    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor: ...

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """:math:`A` applied to each row of ``vectors`` (``[k, p]`` → ``[k, p]``)."""
        if vectors.dim() != 2 or vectors.shape[1] != self.size:
            raise InputError(
                f"operator of size p={self.size} needs vectors of shape [k, {self.size}], "
                f"got {tuple(vectors.shape)}"
            )
        self.num_matvecs += vectors.shape[0]
        vectors = vectors.to(device=self.device, dtype=self.dtype)
        dense = self._answering_matrix()
        if dense is not None:
            self.num_dense_matvecs += vectors.shape[0]
            return vectors @ dense  # symmetric: (A v_j)^T = v_j^T A
        return self._matmat(vectors)

    def _answering_matrix(self) -> torch.Tensor | None:
        """The assembled ``[p, p]`` matrix that products are answered from, or ``None``."""
        return None

    @property
    def answers_dense(self) -> bool:
        """Whether products are answered from an assembled dense matrix (see
        :meth:`expect_products`)."""
        return self._answering_matrix() is not None

    def expect_products(self, count: int, calls: int | None = None) -> bool:
        """Announce that about ``count`` products (vectors) are coming, in ``calls`` calls of
        :meth:`matmat` (default: one vector per call); returns :attr:`answers_dense`.

        Solvers call it before an iteration whose products they can bound
        (``ConjugateGradient``: ``max_iter * k`` in ``max_iter`` calls; ``Arnoldi``:
        ``krylov_dim`` single products). An operator that can answer them more cheaply from its
        dense matrix assembles it now (:class:`TrainingDataOperator` with ``dense="auto"``,
        see :meth:`TrainingDataOperator.dense_pays`); the others ignore it. Either way the
        products are the same up to round-off.
        """
        return self.answers_dense

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """:math:`A v` for one vector ``[p]``."""
        return self.matmat(vector.reshape(1, -1)).reshape(-1)

    def to_dense(self, block_size: int = 256, *, progress: bool = False) -> torch.Tensor:
        """The ``[p, p]`` matrix, assembled from ``p`` matvecs in blocks of ``block_size``.

        Costs ``p`` operator applications and ``p^2`` numbers of memory: use it for small ``p``.
        The result is symmetrised (``(A + A^T)/2``) to remove round-off asymmetry. ``progress``
        shows a bar over the blocks.
        """
        cols = []
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        starts = range(0, self.size, block_size)
        for start in progress_iter(starts, desc="dense matrix", enabled=progress):
            cols.append(self.matmat(eye[start : start + block_size]))
        dense = torch.cat(cols, dim=0)
        return (dense + dense.T) / 2

    def damped(self, damping: float) -> LinearOperator:
        """:math:`A + \\lambda I` with :math:`\\lambda` = ``damping`` (returns ``self`` for 0)."""
        damping = float(damping)
        if damping == 0.0:
            return self
        return DampedOperator(self, damping)

    @property
    def supports_subsample(self) -> bool:
        """Whether :meth:`subsample` can draw minibatch versions of this operator."""
        return False

    def subsample(self, batch_size: int, generator: torch.Generator) -> LinearOperator:
        """The same operator on a random minibatch of ``batch_size`` training examples.

        An unbiased estimate of the operator, drawn without replacement from ``generator``;
        stochastic solvers (``LiSSA(batch_size=...)``) take one per step. Operators over
        training data implement it; the others refuse.
        """
        raise InputError(
            f"{type(self).__name__} cannot be subsampled: minibatch solvers such as "
            "LiSSA(batch_size=...) need a curvature operator over training data "
            "(HessianOperator or GaussNewtonOperator); use batch_size=None for this operator"
        )

    def subsample_many(
        self, batch_size: int, count: int, generator: torch.Generator
    ) -> list[LinearOperator]:
        """``count`` independent minibatch operators (what ``count`` calls of :meth:`subsample`
        give in distribution), drawn from ``generator``.

        Stochastic solvers call it once per block of steps instead of once per step. It calls
        :meth:`subsample` ``count`` times, so the draws are the same random stream as ``count``
        single calls: a minibatch solver's results do not depend on its block size, and
        results from before block drawing are reproduced. (One bulk ``torch.rand`` + ``topk``
        draw was measured too: it saved nothing, the draws being 0.3 % of a LiSSA run, and it
        changed every seeded result.)
        """
        return [self.subsample(batch_size, generator) for _ in range(count)]

    def partition(self, batch_size: int, generator: torch.Generator) -> Sequence[LinearOperator]:
        """This operator as the mean of operators on the blocks of a random partition of the
        training examples (see :meth:`TrainingDataOperator.partition`); ``LiSSA(sampling=
        "partition")`` cycles them. Operators over training data implement it; the others
        refuse.
        """
        raise InputError(
            f"{type(self).__name__} cannot be partitioned into minibatch blocks: "
            "LiSSA(sampling='partition') needs a curvature operator over training data "
            "(HessianOperator or GaussNewtonOperator); use sampling='independent'"
        )


class DenseOperator(LinearOperator):
    """A dense symmetric matrix as an operator (tests, small models, planted spectra)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise InputError(f"a dense operator needs a square matrix, got {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors @ self.matrix.T

    def to_dense(self, block_size: int = 256, *, progress: bool = False) -> torch.Tensor:
        return self.matrix


class DampedOperator(LinearOperator):
    """:math:`A + \\lambda I`."""

    def __init__(self, base: LinearOperator, damping: float) -> None:
        super().__init__(base.size, base.dtype, base.device)
        self.base = base
        self.damping = damping

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        before = self.base.num_dense_matvecs
        out = torch.add(self.base.matmat(vectors), vectors, alpha=self.damping)  # one [k, p]
        self.num_dense_matvecs += self.base.num_dense_matvecs - before
        return out

    @property
    def answers_dense(self) -> bool:
        return self.base.answers_dense

    def expect_products(self, count: int, calls: int | None = None) -> bool:
        """Forwarded to the undamped operator (whose dense matrix then serves both)."""
        return self.base.expect_products(count, calls)

    def to_dense(self, block_size: int = 256, *, progress: bool = False) -> torch.Tensor:
        dense = self.base.to_dense(block_size, progress=progress)
        return dense + self.damping * torch.eye(self.size, dtype=dense.dtype, device=dense.device)

    @property
    def supports_subsample(self) -> bool:
        return self.base.supports_subsample

    def subsample(self, batch_size: int, generator: torch.Generator) -> LinearOperator:
        """The damped minibatch operator: ``base.subsample(...) + damping * I``."""
        return self.base.subsample(batch_size, generator).damped(self.damping)

    def subsample_many(
        self, batch_size: int, count: int, generator: torch.Generator
    ) -> list[LinearOperator]:
        """The damped minibatch operators: ``base.subsample_many(...)``, each ``+ damping * I``."""
        subs = self.base.subsample_many(batch_size, count, generator)
        return [sub.damped(self.damping) for sub in subs]

    def partition(self, batch_size: int, generator: torch.Generator) -> list[LinearOperator]:
        """The damped blocks: ``base.partition(...)``, each ``+ damping * I`` (their mean is
        this operator)."""
        return [block.damped(self.damping) for block in self.base.partition(batch_size, generator)]


class MeanOperator(LinearOperator):
    """:math:`\\frac1B \\sum_j A_j`, the mean of ``B`` operators of one size: each product is
    one product of every part. The blocks of :meth:`TrainingDataOperator.partition` average to
    the full-data operator exactly, so their mean answers its products from the state each
    block keeps (its primal pass or gradient graph) instead of a new pass over all the data.
    """

    def __init__(self, parts: Sequence[LinearOperator]) -> None:
        if not parts:
            raise InputError("a mean of operators needs at least one operator")
        first = parts[0]
        if any(part.size != first.size for part in parts):
            raise InputError(
                f"a mean of operators needs one size, got {sorted({q.size for q in parts})}"
            )
        super().__init__(first.size, first.dtype, first.device)
        self.parts = list(parts)

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        total = self.parts[0].matmat(vectors)
        for part in self.parts[1:]:
            total = total + part.matmat(vectors)
        return total / len(self.parts)


class TrainingDataOperator(LinearOperator):
    """A curvature operator streamed over training data: the mean of per-example terms.

    The shared base of :class:`HessianOperator` and :class:`GaussNewtonOperator`: it holds the
    model's functional view, the data and the chunk size, and draws minibatch versions of
    itself (:meth:`subsample`). Subclasses give the per-chunk product in :meth:`_matmat`.

    Parameters
    ----------
    wrapper
        The model's functional view (parameters, objective).
    data
        The training data (all of it: the operator is the full-data mean), or one batch.
    chunk_size
        Examples per chunk; memory grows with ``chunk_size * k`` for ``k`` vectors.
    dense
        Whether products may be answered from the assembled ``[p, p]`` matrix. ``"auto"``
        (default): once the matrix exists (:meth:`to_dense`, e.g. for ``ExactHessian``), every
        later product is ``V A`` (:math:`O(kp^2)`, no data pass), and a solver announcing
        products (:meth:`expect_products`) has it assembled first (``p`` products once, in
        batched blocks) when that costs fewer passes over the data than the products
        announced and it fits :data:`DENSE_AUTO_MAX_BYTES` (:meth:`dense_pays`). ``True``: the
        same, assembling at any announcement whatever ``p``. ``False``: products always take a
        pass over the data (:meth:`to_dense` still works). The results agree to round-off;
        :attr:`~LinearOperator.num_dense_matvecs` counts the products answered densely.
    """

    def __init__(
        self,
        wrapper: ModelWrapper,
        data: IndexedData | Batch,
        chunk_size: int = 256,
        *,
        dense: bool | Literal["auto"] = "auto",
    ) -> None:
        super().__init__(wrapper.num_params, wrapper.dtype, wrapper.device)
        if chunk_size < 1:
            raise InputError(f"chunk_size must be a positive integer, got {chunk_size}")
        if dense not in (True, False, "auto"):
            raise InputError(f"dense must be True, False or 'auto', got {dense!r}")
        self.wrapper = wrapper
        self.data = data
        self.chunk_size = chunk_size
        self.dense: bool | Literal["auto"] = dense
        self._dense: torch.Tensor | None = None
        self.mean_over: float | None = None
        """The divisor of the summed per-example terms (``None``: the number of examples)."""
        self.graph_budget: int | None = None
        """Bytes of gradient graphs kept for repeated products on a batch (``None``: only an
        operator on an :class:`IndexedData` keeps them, up to the default budget)."""

    _graphs: GradientGraphs | None = None

    def _kept_graphs(self) -> GradientGraphs | None:
        """Where repeated products keep their per-chunk state (gradient graphs, or the hand-run
        chain's primal passes): an operator on an :class:`IndexedData` or given a
        :attr:`graph_budget` has one; a minibatch operator, used once, none."""
        if self._graphs is None and self.graph_budget is not None:
            self._graphs = GradientGraphs(self.graph_budget)
        elif self._graphs is None and isinstance(self.data, IndexedData):
            self._graphs = GradientGraphs()
        return self._graphs

    def to_dense(self, block_size: int = 256, *, progress: bool = False) -> torch.Tensor:
        """The ``[p, p]`` matrix (:meth:`LinearOperator.to_dense`), assembled once and kept.

        The operator is fixed (the wrapper's parameters are a copy, the data given), so the
        matrix is computed on the first call (``p`` products) and returned from then on (no
        product): the exact solver, the dense spectrum
        (:func:`~infl.diagnostics.hessian_spectrum`), damped views of this operator and later
        fits (another damping or ``pseudo_inverse``) share one assembly, and (unless
        ``dense=False``) every later product is answered from it. The tensor returned is the
        kept one: do not modify it in place. It holds ``p^2`` numbers for the life of the
        operator.
        """
        if self._dense is None:
            self._dense = super().to_dense(block_size, progress=progress)
        return self._dense

    def _answering_matrix(self) -> torch.Tensor | None:
        return None if self.dense is False else self._dense

    def dense_pays(self, count: int, calls: int | None = None, block_size: int = 256) -> bool:
        """Whether ``dense="auto"`` assembles the matrix for ``count`` announced products in
        ``calls`` calls (default ``count``).

        The cost model counts passes of one gradient over the data: a call of ``k`` vectors
        costs about :math:`3 + c + 2k`, a forward and a backward pass that records the
        gradient's graph, then one backward pass of that graph per vector, plus the call's own
        overhead :math:`c` = :data:`CALL_COST_ENTRIES` / :math:`(n p)` in passes (``n``
        examples), which only small models notice. ``count`` products in ``calls`` calls then
        cost :math:`(3 + c)\\,\\text{calls} + 2\\,\\text{count}` and the assembly (``p``
        vectors in blocks of ``block_size``) :math:`(3 + c)\\lceil p/\\text{block}\\rceil + 2p`.
        It pays when it costs less and :math:`p^2` numbers fit :data:`DENSE_AUTO_MAX_BYTES`.
        On Iris (``p = 43``, ``n = 120``, :math:`c \\approx 48`) three calls of two vectors
        already pay for it (measured: 0.5 ms a call, 0.8 ms the assembly).
        """
        calls = count if calls is None else calls
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        if self.size * self.size * itemsize > DENSE_AUTO_MAX_BYTES:
            return False
        examples = len(self.data) if isinstance(self.data, IndexedData) else batch_size(self.data)
        per_call = 3 + CALL_COST_ENTRIES / max(1, examples * self.size)
        assembly = per_call * -(-self.size // block_size) + 2 * self.size
        return assembly < per_call * calls + 2 * count

    def expect_products(self, count: int, calls: int | None = None) -> bool:
        """Assemble the matrix now if ``dense`` asks for it (see the class); returns whether
        products are answered from it. The kept per-chunk state learns how many calls are
        coming (:attr:`GradientGraphs.announced <infl.second_order.GradientGraphs.announced>`)."""
        graphs = self._kept_graphs()
        if graphs is not None:
            graphs.announced = max(graphs.announced, count if calls is None else calls)
        if self.dense is False:
            return False
        if self._dense is None and (self.dense is True or self.dense_pays(count, calls)):
            self.to_dense()
        return self._dense is not None

    @property
    def supports_subsample(self) -> bool:
        return isinstance(self.data, IndexedData)

    def subsample(self: _T, batch_size: int, generator: torch.Generator) -> _T:
        """The same operator on a random minibatch of ``batch_size`` training examples.

        Drawn without replacement using ``generator``; an unbiased estimate of the full-data
        operator (weight decay included once, as in the full operator).
        """
        if not isinstance(self.data, IndexedData):
            raise InputError(
                f"subsampling {type(self).__name__} needs the training data as an IndexedData, "
                "not a single batch; build the operator on IndexedData(train_data)"
            )
        n = len(self.data)
        size = min(batch_size, n)
        idx = torch.randperm(n, generator=generator)[:size].sort().values
        return self.on_examples(idx, dense=self.dense)

    def partition(self: _T, batch_size: int, generator: torch.Generator) -> list[_T]:
        """This operator as the mean of :math:`B = \\lceil n / b \\rceil` operators on disjoint
        blocks of the training examples (``b`` = ``batch_size``).

        The ``n`` examples are permuted with ``generator`` and cut into ``B`` blocks of
        :math:`\\lfloor n/B \\rfloor` or :math:`\\lceil n/B \\rceil` (at most ``b``) examples.
        Block :math:`j` sums its examples' terms and divides by :math:`n/B` (not by its own
        size), plus the weight decay, so that

        .. math:: \\frac1B \\sum_{j=1}^B A_j = A

        exactly, whether or not ``B`` divides ``n``: a recursion that visits every block once
        per epoch averages to the full-data operator. Each block is a fixed operator, so a
        Hessian block keeps its gradient graph from its second product on
        (:class:`~infl.second_order.GradientGraphs`, a budget of
        :data:`~infl.second_order.GRAPH_BUDGET_BYTES` / ``B`` each: all blocks together keep
        at most that much) and its later products are one double-backward pass each.
        Blocks answer products only (``dense=False``).
        """
        if not isinstance(self.data, IndexedData):
            raise InputError(
                f"partitioning {type(self).__name__} needs the training data as an "
                "IndexedData, not a single batch; build the operator on IndexedData(train_data)"
            )
        n = len(self.data)
        count = -(-n // min(batch_size, n))
        order = torch.randperm(n, generator=generator)
        return [
            self.on_examples(
                block.sort().values,
                dense=False,
                mean_over=n / count,
                graph_budget=GRAPH_BUDGET_BYTES // count,
            )
            for block in order.tensor_split(count)
        ]

    def on_examples(
        self: _T,
        indices: torch.Tensor,
        *,
        dense: bool | Literal["auto"],
        mean_over: float | None = None,
        graph_budget: int | None = None,
    ) -> _T:
        """The same operator on the training examples ``indices`` (one batch).

        ``mean_over`` replaces the number of examples as the divisor of their summed terms
        (a block of :meth:`partition`); ``graph_budget``: bytes of gradient graphs a Hessian
        operator on them may keep for its repeated products (``None``: none, the operator is
        used once).
        """
        if not isinstance(self.data, IndexedData):
            raise InputError(
                f"{type(self).__name__} on a subset of examples needs the training data as an "
                "IndexedData, not a single batch"
            )
        out = type(self)(self.wrapper, self.data.select(indices), self.chunk_size, dense=dense)
        out.mean_over = mean_over
        out.graph_budget = graph_budget
        return out


class HessianOperator(TrainingDataOperator):
    """:math:`H = \\nabla^2 J(\\theta)`, matrix-free, streamed over the training data.

    :math:`H v = \\frac1n\\sum_i \\nabla^2\\ell(z_i) v + \\lambda_{wd} v`, computed with
    forward-over-reverse autodiff in chunks of ``chunk_size`` examples.

    Parameters
    ----------
    wrapper
        The model's functional view (parameters, objective).
    data
        The training data (all of it: :math:`H` is the full-data Hessian), or one batch.
    chunk_size
        Examples per chunk; memory grows with ``chunk_size * k`` for ``k`` vectors.

    Notes
    -----
    Cost: one ``matmat`` of ``k`` vectors is one pass over the data with ``k`` vmapped
    Hessian-vector products per chunk. From the second ``matmat`` on, the chunks' gradient
    graphs are kept (up to :data:`~infl.second_order.GRAPH_BUDGET_BYTES` of saved activations,
    :class:`~infl.second_order.GradientGraphs`), so later products skip the forward pass and
    the first backward pass: the same numbers, 1.2-2.6x cheaper per product. A plain
    ``nn.Sequential`` MLP (under ``second_order="auto"``) keeps its primal passes instead and
    runs each product as matrix products by hand (:mod:`infl.chain_hvp`).
    """

    _train_factors: FitFactors | None = None
    assembly: DenseAssembly | None = None
    """How :meth:`to_dense` built the matrix (``None`` before it did)."""

    def take_train_factors(self) -> FitFactors | None:
        """The training gradients' factors the closed-form assembly computed on its way
        (:func:`~infl.sequential_hessian.sequential_hessian`), handed over once; ``None``
        for every other assembly and after the first call."""
        factors, self._train_factors = self._train_factors, None
        return factors

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        graphs = self._kept_graphs()
        return self.wrapper.hvp(self.data, vectors, self.chunk_size, graphs, self.mean_over)

    def to_dense(self, block_size: int = 256, *, progress: bool = False) -> torch.Tensor:
        """The ``[p, p]`` Hessian, assembled once and kept (see
        :meth:`TrainingDataOperator.to_dense`).

        Below ``p = 1000``, a plain ``nn.Sequential`` of ``nn.Linear`` layers and element-wise
        activations with the objective's built-in loss and few smooth units gets it in closed
        form, with no product (:func:`infl.sequential_hessian.sequential_hessian`; 3x faster
        than the products on the Iris MLP), and keeps the training gradients' factors it
        computed on the way (:meth:`take_train_factors`). Otherwise, from ``p >= 1000``
        parameters in several modules it is assembled as the Gauss-Newton matrix plus the HVP
        columns of the layers that the residual term couples, checked against a random HVP
        (:func:`infl.structured_hessian.assemble_hessian`; on the digits CNN 774 products
        instead of 2,514); otherwise, or when that check fails, from ``p`` products. Equal to
        round-off every way; :attr:`assembly` says which was used.
        """
        if self._dense is None and self.mean_over is not None:  # a block: by its own products
            self._dense = LinearOperator.to_dense(self, block_size, progress=progress)
        if self._dense is None and self.size < STRUCTURED_MIN_PARAMS:
            closed = sequential_hessian(
                self.wrapper, self.data, self.chunk_size, keep_bytes=FIT_FACTOR_BYTES
            )
            if closed is not None:
                self._dense, self._train_factors = closed
                groups = parameter_groups(self.wrapper.names, self.wrapper.numels)
                sizes = tuple((owner, int(idx.numel())) for owner, idx in groups)
                self.assembly = DenseAssembly(method="closed-form", products=0, groups=sizes)
        if self._dense is None:
            self._dense, self.assembly = assemble_hessian(self, block_size, progress=progress)
        return self._dense


class GaussNewtonOperator(TrainingDataOperator):
    """The generalised Gauss-Newton matrix :math:`G`, matrix-free, streamed over the data.

    .. math::

        G = \\frac1n\\sum_i J_i^T H_{out,i} J_i + \\lambda_{wd} I,

    with :math:`J_i = \\partial f(x_i;\\theta)/\\partial\\theta` the Jacobian of the model's
    output for example ``i`` and :math:`H_{out,i} = \\partial^2\\ell/\\partial f^2` the Hessian
    of its loss in the outputs (for cross-entropy :math:`\\mathrm{diag}(p) - pp^T`). It drops
    the term of :math:`H` that carries the model's own second derivatives, so it is positive
    semi-definite whenever the loss is convex in the outputs (every built-in loss), even where
    :math:`H` is indefinite; for a model linear in :math:`\\theta` the two are equal.

    Parameters
    ----------
    wrapper
        The model's functional view; its objective's loss must have an output-space Hessian
        (a built-in loss, or :func:`~infl.objective.supervised_loss` with ``output_hessian``).
    data
        The training data (all of it: :math:`G` is the full-data mean), or one batch of
        ``(inputs, targets)``.
    chunk_size
        Examples per chunk; memory grows with ``chunk_size * k`` for ``k`` vectors.

    Raises
    ------
    InputError
        If the loss has no output-space Hessian (the message names the fixes).

    Notes
    -----
    Cost: one ``matmat`` of ``k`` vectors is one pass over the data: per chunk one forward
    pass and, vmapped over the ``k`` vectors, one ``jvp`` (:math:`J v`) and one ``vjp``
    (:math:`J^T u`) through the model; :math:`J` is never formed. A plain ``nn.Sequential``
    MLP (under ``second_order="auto"``) runs the products by hand instead
    (:mod:`infl.chain_hvp`), keeping each chunk's primal pass like :class:`HessianOperator`.
    """

    def __init__(
        self,
        wrapper: ModelWrapper,
        data: IndexedData | Batch,
        chunk_size: int = 256,
        *,
        dense: bool | Literal["auto"] = "auto",
    ) -> None:
        output_hessian_loss(wrapper.objective.per_example_loss)  # refuses early, naming the fix
        super().__init__(wrapper, data, chunk_size, dense=dense)

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        graphs = self._kept_graphs()  # used by the hand-run chain only
        return self.wrapper.ggn_vp(self.data, vectors, self.chunk_size, self.mean_over, graphs)

    def to_dense(self, block_size: int = 256, *, progress: bool = False) -> torch.Tensor:
        """The ``[p, p]`` matrix :math:`G`, from per-example output Jacobians, kept.

        :meth:`ModelWrapper.ggn_matrix <infl.model.ModelWrapper.ggn_matrix>`: ``K`` backward
        passes per example for ``K`` outputs and one matrix product per chunk, instead of
        ``p`` Gauss-Newton-vector products (equal to round-off); models whose output is not
        one tensor of at most 256 numbers per example are assembled from products
        (``block_size`` vectors at a time). Computed once per operator, like
        :meth:`TrainingDataOperator.to_dense`; no product is counted in :attr:`num_matvecs`.
        """
        if self._dense is None:
            dense = None
            if self.mean_over is None:  # a block's matrix comes from its own products
                dense = self.wrapper.ggn_matrix(self.data, self.chunk_size)
            if dense is None:
                dense = LinearOperator.to_dense(self, block_size, progress=progress)
            self._dense = dense
        return self._dense
