"""The training gradients of an ``nn.Linear`` model, kept in factored form between passes.

When every trainable parameter sits in a plain ``nn.Linear``, example ``i``'s training
gradient is, layer by layer, :math:`g_i a_i^T` for the weight and :math:`g_i` for the bias
(plus the weight-decay term :math:`\\Lambda\\theta`): ``a_i`` is the layer's input and ``g_i``
the gradient of the example's loss at the layer's output (:mod:`infl.linear_grads`). Kept for
every chunk, these :math:`\\sum_l (in_l + out_l)` numbers per example stand in for the ``[n, p]``
cache that such a model never fills (it multiplies its gradients without forming them): a
scoring pass then multiplies them by the inverse-HVPs with no forward or backward pass.

Whichever pass computes them first fills :class:`FactorCache`: the minimum check at
construction (:func:`infl.train_gradients.iter_train_moments`), a K-FAC / EK-FAC fit with the
empirical Fisher, whose factor pass differentiates the same losses
(:meth:`FittedSolver.take_train_factors <infl.solvers.base.FittedSolver.take_train_factors>`),
or the first scoring pass. All or nothing, within the calculator's ``cache_bytes``: the first
chunk's bytes times the number of chunks must fit, and so must the running total.
"""

from __future__ import annotations

from dataclasses import dataclass

from infl.data import Batch, IndexedData
from infl.linear_grads import Factors

__all__ = ["FIT_FACTOR_BYTES", "FactorCache", "FitFactors", "factors_nbytes"]

FIT_FACTOR_BYTES = 1 << 30
"""Bytes of training-gradient factors a fit keeps for the calculator to adopt (the calculator's
``cache_bytes`` then decides what it keeps)."""


def factors_nbytes(factors: Factors) -> int:
    """Bytes held by one chunk's factors (each tensor counted in full, even a view)."""
    return sum(t.numel() * t.element_size() for pair in factors.values() for t in pair)


class FactorCache:
    """Every chunk's :data:`~infl.linear_grads.Factors` by chunk start, kept by one pass.

    A pass offers each chunk's factors in order (:meth:`add`); they are kept only while the
    whole pass fits in the budget, and are read (:meth:`get`) only once a pass kept them all,
    in the same chunking. Cleared by :meth:`clear`.
    """

    def __init__(self) -> None:
        self.chunks: dict[int, Factors] = {}
        self.chunk_size = 0
        self.nbytes = 0
        self.complete = False

    def get(self, start: int, chunk_size: int) -> Factors | None:
        """The kept factors of the chunk at ``start``, or ``None``."""
        if not self.complete or chunk_size != self.chunk_size:
            return None
        return self.chunks.get(start)

    def add(
        self, start: int, factors: Factors, chunk_size: int, num_chunks: int, budget: int
    ) -> None:
        """Offer the factors of the chunk at ``start`` of a pass over ``num_chunks`` chunks of
        ``chunk_size``: kept while the first chunk's bytes times ``num_chunks``, and the
        running total, fit in ``budget``; a pass's first chunk (``start == 0``) starts over."""
        if self.complete:
            return
        if start == 0:
            self.clear()
            self.chunk_size = chunk_size
        elif not self.chunks or chunk_size != self.chunk_size:
            return  # a dropped pass, or another chunking
        elif start != len(self.chunks) * chunk_size:
            return  # chunks are kept in order only
        size = factors_nbytes(factors)
        if self.nbytes + size > budget or (start == 0 and size * num_chunks > budget):
            self.clear()
            return
        self.chunks[start] = factors
        self.nbytes += size
        self.complete = len(self.chunks) == num_chunks

    def clear(self) -> None:
        self.chunks, self.chunk_size, self.nbytes, self.complete = {}, 0, 0, False


@dataclass
class FitFactors:
    """The factors a solver's fit computed over its training data, for the calculator's
    :class:`FactorCache` (adopted when they are of the calculator's data, model and
    chunking): ``chunks`` by start in chunks of ``chunk_size``, and each chunk's prepared
    ``batches`` (for the target check the calculator makes on every chunk it reads)."""

    chunk_size: int
    data: IndexedData
    wrapper: object
    chunks: dict[int, Factors]
    batches: dict[int, Batch]
