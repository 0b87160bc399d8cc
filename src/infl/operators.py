"""Symmetric linear operators on the parameter space: the Hessian and its damped forms.

Every operator acts on row-stacked vectors: :meth:`LinearOperator.matmat` maps ``[k, p]`` to
``[k, p]`` (row ``j`` of the output is :math:`A v_j`). Dense and matrix-free operators share this
interface, so a solver never knows which it has. Damping is operator algebra:
``operator.damped(lam)`` is :math:`A + \\lambda I` and means the same thing to every solver.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from infl.data import Batch, IndexedData
from infl.errors import InputError
from infl.model import ModelWrapper


class LinearOperator(ABC):
    """A symmetric ``p x p`` linear operator.

    Attributes
    ----------
    num_matvecs : int
        How many operator-vector products have been taken (a ``[k, p]`` matmat counts ``k``);
        benchmarks and diagnostics read it.
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.size = size
        self.dtype = dtype
        self.device = device
        self.num_matvecs = 0

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
        return self._matmat(vectors.to(device=self.device, dtype=self.dtype))

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """:math:`A v` for one vector ``[p]``."""
        return self.matmat(vector.reshape(1, -1)).reshape(-1)

    def to_dense(self, block_size: int = 256) -> torch.Tensor:
        """The ``[p, p]`` matrix, assembled from ``p`` matvecs in blocks of ``block_size``.

        Costs ``p`` operator applications and ``p^2`` numbers of memory: use it for small ``p``.
        The result is symmetrised (``(A + A^T)/2``) to remove round-off asymmetry.
        """
        cols = []
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        for start in range(0, self.size, block_size):
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
            "(HessianOperator); use batch_size=None for this operator"
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

    def to_dense(self, block_size: int = 256) -> torch.Tensor:
        return self.matrix


class DampedOperator(LinearOperator):
    """:math:`A + \\lambda I`."""

    def __init__(self, base: LinearOperator, damping: float) -> None:
        super().__init__(base.size, base.dtype, base.device)
        self.base = base
        self.damping = damping

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.base.matmat(vectors) + self.damping * vectors

    def to_dense(self, block_size: int = 256) -> torch.Tensor:
        dense = self.base.to_dense(block_size)
        return dense + self.damping * torch.eye(self.size, dtype=dense.dtype, device=dense.device)

    @property
    def supports_subsample(self) -> bool:
        return self.base.supports_subsample

    def subsample(self, batch_size: int, generator: torch.Generator) -> LinearOperator:
        """The damped minibatch operator: ``base.subsample(...) + damping * I``."""
        return self.base.subsample(batch_size, generator).damped(self.damping)


class HessianOperator(LinearOperator):
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
    Hessian-vector products per chunk.
    """

    def __init__(
        self, wrapper: ModelWrapper, data: IndexedData | Batch, chunk_size: int = 256
    ) -> None:
        super().__init__(wrapper.num_params, wrapper.dtype, wrapper.device)
        if chunk_size < 1:
            raise InputError(f"chunk_size must be a positive integer, got {chunk_size}")
        self.wrapper = wrapper
        self.data = data
        self.chunk_size = chunk_size

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.wrapper.hvp(self.data, vectors, self.chunk_size)

    @property
    def supports_subsample(self) -> bool:
        return isinstance(self.data, IndexedData)

    def subsample(self, batch_size: int, generator: torch.Generator) -> HessianOperator:
        """The Hessian of a random minibatch of ``batch_size`` training examples.

        Drawn without replacement using ``generator``; an unbiased estimate of :math:`H`.
        """
        if not isinstance(self.data, IndexedData):
            raise InputError("subsampling needs the training data as an IndexedData")
        n = len(self.data)
        size = min(batch_size, n)
        idx = torch.randperm(n, generator=generator)[:size].sort().values
        return HessianOperator(self.wrapper, self.data.select(idx), self.chunk_size)
