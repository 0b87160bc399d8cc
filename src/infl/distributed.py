"""infl under ``torch.distributed``: training-data shards, all-reduced curvature, gathered scores.

Launched with ``torchrun --nproc_per_node=N`` (``gloo`` on CPU, ``nccl`` on GPU), every rank
builds the same :class:`~infl.InfluenceCalculator` on the same model and the *whole* training
set; the calculator then works on rank ``r``'s contiguous shard only:

* **Shards.** :func:`shard_bounds`: rank ``r`` of ``N`` holds examples ``start_r .. stop_r - 1``
  (sizes differ by at most one, the first ``n mod N`` ranks take one more), so a global index
  is ``start_r`` + the local index. :class:`ShardedData` is that shard as an
  :class:`~infl.data.IndexedData` (no copy: it reads the parent data at an offset).
* **Curvature.** :class:`AllReducedOperator` wraps the shard's operator :math:`H_r` (the mean
  over its :math:`n_r` examples plus :math:`\\lambda_{wd} I`) and all-reduces
  :math:`\\sum_r \\frac{n_r}{n} H_r v = \\frac1n\\sum_i \\nabla^2\\ell_i v + \\lambda_{wd} v`:
  the weights sum to 1, so weight decay is counted once. Every solver that only calls
  ``matmat`` (exact, CG, LiSSA, Arnoldi/Lanczos, PCG, ``damping="auto"``) is distributed by
  that alone; K-FAC/EK-FAC average their factors the same way (:func:`average_over_shards`).
* **Scores.** Each rank scores its shard's columns and :meth:`ProcessGroup.gather_columns`
  assembles ``[m, n]`` in global order on every rank.
* **Lockstep.** Every operator product is a collective, so all ranks must take the same
  products in the same order: they hold the same test data and solve the same right-hand
  sides (solvers' random start vectors come from fixed seeds, so fits agree too), and
  :meth:`ProcessGroup.check_same` compares a fingerprint of the model, objective, solver and
  data across ranks at construction, raising :class:`DistributedMismatchError` on every rank
  instead of letting one hang.

Without an initialised process group (or with ``distributed=False``) :func:`process_group`
gives a group of one, whose collectives are the identity: one process runs the same code.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from infl.data import Batch, IndexedData, tensor_leaves
from infl.errors import InflError, InputError
from infl.operators import LinearOperator, TrainingDataOperator

if TYPE_CHECKING:
    from infl.solvers.kronecker import Partition

__all__ = [
    "AllReducedOperator",
    "DistributedMismatchError",
    "ProcessGroup",
    "Shard",
    "ShardedData",
    "average_over_shards",
    "is_distributed",
    "launched_rank",
    "process_group",
    "shard_bounds",
    "shard_seed",
]


class DistributedMismatchError(InflError, RuntimeError):
    """Ranks of one ``torch.distributed`` job hold different models, data or settings."""


@dataclass(frozen=True)
class Shard:
    """Rank ``rank``'s contiguous share ``start .. stop - 1`` of ``total`` training examples."""

    rank: int
    world_size: int
    start: int
    stop: int
    total: int

    @property
    def size(self) -> int:
        """:math:`n_r`, the number of examples in this shard."""
        return self.stop - self.start

    @property
    def weight(self) -> float:
        """:math:`n_r / n`, this shard's share of the mean over all examples."""
        return self.size / self.total


def shard_bounds(total: int, rank: int, world_size: int) -> Shard:
    """Rank ``rank``'s contiguous shard of ``total`` examples split over ``world_size`` ranks.

    Sizes differ by at most one; the first ``total mod world_size`` ranks take one more.

    Raises
    ------
    InputError
        Fewer examples than ranks (a rank would have none), or a rank outside
        ``0 .. world_size - 1``.

    Examples
    --------
    >>> [(s.start, s.stop) for s in (shard_bounds(10, r, 3) for r in range(3))]
    [(0, 4), (4, 7), (7, 10)]
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"rank must be in 0..{world_size - 1}, got {rank}")
    if total < world_size:
        raise InputError(
            f"{total} training examples cannot be sharded over {world_size} ranks (each rank "
            "needs at least one); launch fewer processes"
        )
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return Shard(rank, world_size, start, stop, total)


def launched_rank() -> tuple[int, int]:
    """``(rank, world size)`` that a launcher such as ``torchrun`` gave this process (its
    ``RANK`` and ``WORLD_SIZE`` environment variables), ``(0, 1)`` when not launched so."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ProcessGroup:
    """The ranks a calculator shares its work with (one rank without ``torch.distributed``).

    Parameters
    ----------
    group
        A ``torch.distributed`` process group (``None``: the default group).
    enabled
        ``False`` gives a group of one rank whose collectives are the identity.
    """

    def __init__(self, group: Any = None, *, enabled: bool = True) -> None:
        self.enabled = enabled and is_distributed()
        self.group = group
        self.rank = dist.get_rank(group) if self.enabled else 0
        self.world_size = dist.get_world_size(group) if self.enabled else 1

    def __repr__(self) -> str:
        return f"ProcessGroup(rank={self.rank}, world_size={self.world_size})"

    def shard(self, total: int) -> Shard:
        """This rank's :class:`Shard` of ``total`` examples."""
        return shard_bounds(total, self.rank, self.world_size)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """:math:`\\sum_r` ``tensor`` over the ranks (a new tensor; the input is untouched)."""
        if self.world_size == 1:
            return tensor
        out = tensor.clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def gather_rows(self, local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Every rank's ``local`` rows (rank ``r`` holds ``sizes[r]`` of them), concatenated in
        rank order: ``[sum(sizes), ...]`` on every rank."""
        if self.world_size == 1:
            return local
        if local.shape[0] != sizes[self.rank]:
            raise InflError(
                f"rank {self.rank} has {local.shape[0]} rows to gather where {sizes[self.rank]} "
                "were expected; this is a bug in infl, please report it"
            )
        widest = max(sizes)
        padded = local.new_zeros((widest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    def gather_shard_rows(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """Rows of this rank's shard (``[n_r, ...]``) assembled to ``[n, ...]`` in global order."""
        sizes = [shard_bounds(total, r, self.world_size).size for r in range(self.world_size)]
        return self.gather_rows(local, sizes)

    def gather_columns(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """Scores of this rank's shard (``[m, n_r]``) assembled to ``[m, n]`` in global order."""
        if self.world_size == 1:
            return local
        return self.gather_shard_rows(local.T.contiguous(), total).T.contiguous()

    def lockstep_chunks(self, shard: Shard, chunk_size: int) -> Iterator[tuple[int, int]]:
        """Local ``(start, stop)`` ranges of ``chunk_size`` over this rank's shard, padded with
        empty ranges to the largest shard's number of chunks, so that every rank takes the
        same number of steps (a collective per step then pairs up across ranks)."""
        largest = math.ceil(shard.total / shard.world_size)
        for start in range(0, largest, chunk_size):
            yield min(start, shard.size), min(start + chunk_size, shard.size)

    def lockstep_sizes(self, shard: Shard, start: int, chunk_size: int) -> list[int]:
        """Rows every rank holds at the lockstep chunk that starts at local ``start``."""
        sizes = []
        for r in range(self.world_size):
            size = shard_bounds(shard.total, r, self.world_size).size
            sizes.append(max(0, min(start + chunk_size, size) - start))
        return sizes

    def check_same(self, facts: dict[str, str]) -> None:
        """Refuse ranks whose ``facts`` (what must agree: model, data size, solver, ...) differ.

        Raises
        ------
        DistributedMismatchError
            On every rank (so none is left waiting in a collective), naming each fact that
            differs and its value on each rank.
        """
        if self.world_size == 1:
            return
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, facts, group=self.group)
        differ = [key for key in facts if any(other.get(key) != facts[key] for other in everyone)]
        differ += [key for other in everyone for key in other if key not in facts]
        if differ:
            lines = [
                f"  {key}: "
                + "; ".join(f"rank {r}: {other.get(key)}" for r, other in enumerate(everyone))
                for key in dict.fromkeys(differ)
            ]
            raise DistributedMismatchError(
                "the ranks of this torch.distributed job do not hold the same calculator:\n"
                + "\n".join(lines)
                + "\nEvery rank must pass the same model (same trained weights), objective, "
                "solver and the whole training set (infl shards it by rank); load them from "
                "the same files on every rank"
            )


def process_group(distributed: bool | None = None, group: Any = None) -> ProcessGroup:
    """The :class:`ProcessGroup` a calculator uses for ``distributed=``.

    ``None`` (default): ``torch.distributed``'s group when it is initialised with more than one
    rank, else a group of one. ``True``: the same, but refuse when ``torch.distributed`` is not
    initialised. ``False``: a group of one (every rank computes everything on its own).
    """
    if distributed is True and not is_distributed():
        raise InputError(
            "distributed=True needs torch.distributed initialised with more than one rank: "
            "launch with torchrun --nproc_per_node=N and call "
            "torch.distributed.init_process_group('gloo') (or 'nccl' on GPUs) first"
        )
    if distributed is not None and not isinstance(distributed, bool):
        raise InputError(f"distributed must be True, False or None, got {distributed!r}")
    return ProcessGroup(group, enabled=distributed is not False)


class ShardedData(IndexedData):
    """The examples ``shard.start .. shard.stop - 1`` of ``parent``, indexed from 0 (a view).

    Only the random-access forms (tensors, map-style datasets, non-shuffling loaders) can be
    sharded; a stream (``IterableDataset``) is refused.
    """

    def __init__(self, parent: IndexedData, shard: Shard) -> None:
        if getattr(parent, "streamed", False):
            raise InputError(
                f"{parent.name} is an IterableDataset, which infl cannot shard by rank: pass a "
                "map-style Dataset (or tensors) under torch.distributed, or run one process"
            )
        if shard.total != len(parent):
            raise InputError(
                f"a shard of {shard.total} examples does not fit {parent.name} of {len(parent)}"
            )
        super().__init__(parent, parent.name)
        self.parent = parent
        self.shard = shard
        self._n = shard.size

    def select(self, indices: Sequence[int] | torch.Tensor) -> Batch:
        """The shard's examples at local ``indices`` (``0 .. n_r - 1``)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self._n):
            bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
            raise InputError(
                f"{self.name}: local index {bad} is out of range for this rank's shard of "
                f"{self._n} examples"
            )
        return self.parent.select(idx + self.shard.start)

    def chunks(self, chunk_size: int, *, skip: int = 0) -> Iterator[tuple[int, Batch]]:
        """``(local start, batch)`` over consecutive chunks of the shard (see
        :meth:`IndexedData.chunks`)."""
        if chunk_size < 1:
            raise InputError(f"chunk_size must be a positive integer, got {chunk_size}")
        for start in range(skip * chunk_size, self._n, chunk_size):
            stop = min(start + chunk_size, self._n)
            yield start, self.select(torch.arange(start, stop))


class AllReducedOperator(LinearOperator):
    """The curvature over all ranks' shards: :math:`\\sum_r \\frac{n_r}{n} H_r`, all-reduced.

    .. math::

        H v = \\sum_r \\frac{n_r}{n}\\Big(\\frac1{n_r}\\sum_{i\\in r}\\nabla^2\\ell_i v
        + \\lambda_{wd} v\\Big) = \\frac1n\\sum_i \\nabla^2\\ell_i v + \\lambda_{wd} v,

    since :math:`\\sum_r n_r/n = 1` (weight decay counted once). Each ``matmat`` is a
    collective: every rank must call it with the same vectors.

    Parameters
    ----------
    local
        This rank's operator over its shard (a :class:`~infl.operators.HessianOperator` or
        :class:`~infl.operators.GaussNewtonOperator`), or ``None`` for a rank that holds no
        examples of a minibatch (it adds zeros).
    weight
        :math:`n_r / n` (``0`` with ``local=None``).
    group
        The ranks to all-reduce over.
    shard_data
        This rank's :class:`ShardedData` (for :meth:`subsample`).

    Attributes
    ----------
    wrapper, data, chunk_size
        Those of ``local`` (``data`` is the shard): K-FAC/EK-FAC read them to build factors.

    Notes
    -----
    Cost per ``matmat`` of ``k`` vectors: one pass over the shard (:math:`n_r` examples) and one
    all-reduce of ``k p`` numbers.
    """

    def __init__(
        self,
        local: TrainingDataOperator | None,
        weight: float,
        group: ProcessGroup,
        shard_data: ShardedData,
        template: TrainingDataOperator | None = None,
    ) -> None:
        like = local if local is not None else template
        if like is None:
            raise InputError("an AllReducedOperator needs a local operator or a template")
        super().__init__(like.size, like.dtype, like.device)
        self.local = local
        self.weight = float(weight)
        self.group = group
        self.shard_data = shard_data
        self.template = like
        self.wrapper = like.wrapper
        self.data = shard_data if local is None else local.data
        self.chunk_size = like.chunk_size

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        if self.local is None:
            part = torch.zeros_like(vectors)
        else:
            part = self.local.matmat(vectors) * self.weight
        return self.group.all_reduce_sum(part)

    def mean_over_shards(self, tensor: torch.Tensor) -> torch.Tensor:
        """:math:`\\sum_r \\frac{n_r}{n} t_r` for a per-shard mean :math:`t_r` (all-reduced)."""
        return self.group.all_reduce_sum(tensor * self.weight)

    @property
    def supports_subsample(self) -> bool:
        return True

    def subsample(self, batch_size: int, generator: torch.Generator) -> AllReducedOperator:
        """The operator on a random minibatch of ``batch_size`` of all ``n`` examples.

        Every rank draws the same global indices from ``generator`` — the draw one process
        makes, replayed by the shard's own operator class on all ``n`` indices — and keeps
        those in its shard, weighted by its share of the minibatch; the all-reduced product is
        then the minibatch mean plus :math:`\\lambda_{wd} I`: the operator one process uses.
        """
        (sub,) = self._draws(lambda proxy: [proxy.subsample(batch_size, generator)])
        return self._on_indices(torch.as_tensor(sub.data))

    def subsample_many(
        self, batch_size: int, count: int, generator: torch.Generator
    ) -> list[LinearOperator]:
        """``count`` minibatch operators, drawn as one process draws them (see
        :meth:`subsample`)."""

        def draw(proxy: TrainingDataOperator) -> list[Any]:
            many = getattr(proxy, "subsample_many", None)
            if many is None:
                return [proxy.subsample(batch_size, generator) for _ in range(count)]
            return list(many(batch_size, count, generator))

        return [self._on_indices(torch.as_tensor(sub.data)) for sub in self._draws(draw)]

    def partition(self, batch_size: int, generator: torch.Generator) -> list[LinearOperator]:
        """The blocks one process draws (:meth:`TrainingDataOperator.partition` over all ``n``
        examples, replayed as :meth:`subsample` does), each split between the ranks.

        A rank holding the share :math:`w_r` of block :math:`j` divides its summed terms by
        :math:`w_r\\,n/B` and is weighted by :math:`w_r`, so the all-reduced product is
        :math:`\\frac{B}{n}\\sum_{i \\in j}\\nabla^2\\ell_i v + \\lambda_{wd} v`: the block of one
        process. Each rank's part keeps its gradient graph as a block does.
        """
        blocks = self._draws(lambda proxy: proxy.partition(batch_size, generator))
        return [
            self._on_indices(torch.as_tensor(b.data), b.mean_over, b.graph_budget) for b in blocks
        ]

    def _draws(self, draw: Any) -> list[TrainingDataOperator]:
        """The operators that ``draw(operator over all n examples)`` gives; their ``data`` is
        the global index set each selects."""
        template = self.template
        proxy = type(template)(template.wrapper, _IndexRecorder(self.shard_data.shard.total), 1)
        return list(draw(proxy))

    def _on_indices(
        self, idx: torch.Tensor, mean_over: float | None = None, graph_budget: int | None = None
    ) -> AllReducedOperator:
        """This rank's part of the operator on the global examples ``idx`` (of one partition
        block when ``mean_over`` is given: see :meth:`partition`)."""
        shard = self.shard_data.shard
        mine = idx[(idx >= shard.start) & (idx < shard.stop)] - shard.start
        template = self.template
        if mine.numel() == 0:
            return AllReducedOperator(None, 0.0, self.group, self.shard_data, template)
        share = mine.numel() / idx.numel()
        local = template.on_examples(  # the template's data is this rank's shard
            mine,
            dense="auto" if mean_over is None else False,
            mean_over=None if mean_over is None else share * mean_over,
            graph_budget=graph_budget,
        )
        return AllReducedOperator(local, share, self.group, self.shard_data, template)


class _IndexRecorder(IndexedData):
    """``n`` stand-in examples whose :meth:`select` returns the indices themselves.

    An operator built on it draws minibatches exactly as over real data, and each minibatch
    operator's ``data`` is then the index set drawn: :class:`AllReducedOperator` replays one
    process's draws with it, whatever the drawing rule of the operator class.
    """

    def __init__(self, n: int) -> None:  # no data behind it: IndexedData.__init__ is skipped
        self.name = "training data"
        self._n = n

    def select(self, indices: Sequence[int] | torch.Tensor) -> Batch:
        return torch.as_tensor(indices, dtype=torch.long).reshape(-1)


def shard_operator(
    operator: TrainingDataOperator, group: ProcessGroup, shard_data: IndexedData
) -> LinearOperator:
    """``operator`` (over ``shard_data``, a :class:`ShardedData`) all-reduced over ``group``;
    ``operator`` itself for a group of one."""
    if group.world_size == 1:
        return operator
    if not isinstance(shard_data, ShardedData):
        raise InputError("an operator is all-reduced over ranks only on a ShardedData")
    return AllReducedOperator(operator, shard_data.shard.weight, group, shard_data)


def average_over_shards(
    operator: LinearOperator, tensors: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Per-shard means (K-FAC factors, EK-FAC eigenvalues, Fisher diagonals) averaged over the
    ranks, :math:`\\sum_r \\frac{n_r}{n} t_r`, when ``operator`` is an
    :class:`AllReducedOperator`; unchanged otherwise. One all-reduce for all of them."""
    if not isinstance(operator, AllReducedOperator) or not tensors:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    flat = operator.mean_over_shards(flat)
    out, pos = [], 0
    for t in tensors:
        out.append(flat[pos : pos + t.numel()].reshape(t.shape))
        pos += t.numel()
    return out


def average_partition(operator: LinearOperator, part: Partition, what: str) -> None:
    """:func:`average_over_shards` on a K-FAC partition, in place: ``what="factors"`` (``A``,
    ``S`` and the Fisher diagonals) or ``"eigenvalues"`` (EK-FAC's ``eigen_diag``)."""
    if not isinstance(operator, AllReducedOperator):
        return
    if what == "factors":
        tensors = [t for ly in part.layers for t in (ly.A, ly.S)]
        tensors += [blk.diag for blk in part.diagonal]
    else:
        tensors = [ly.eigen_diag for ly in part.layers]
    if any(t is None for t in tensors):
        raise InflError(f"K-FAC {what} are missing before averaging; this is a bug in infl")
    averaged = iter(average_over_shards(operator, [t for t in tensors if t is not None]))
    if what == "factors":
        for ly in part.layers:
            ly.A, ly.S = next(averaged), next(averaged)
        for blk in part.diagonal:
            blk.diag = next(averaged)
    else:
        for ly in part.layers:
            ly.eigen_diag = next(averaged)


def shard_seed(operator: LinearOperator, seed: int) -> int:
    """``seed`` on rank 0 (and in one process); a seed of its own on every other rank, so that
    Monte-Carlo draws on different shards are independent."""
    if not isinstance(operator, AllReducedOperator):
        return seed
    return seed + (operator.group.rank << 32)


def num_examples(operator: LinearOperator, default: int) -> int:
    """:math:`n` over all ranks for an :class:`AllReducedOperator`, else ``default``."""
    if isinstance(operator, AllReducedOperator):
        return operator.shard_data.shard.total
    return default


def data_digest(data: IndexedData, samples: int = 8) -> str:
    """A cheap content digest of ``data``: ``n`` and the bytes of up to ``samples`` examples
    spread evenly over it (first and last included)."""
    n = len(data)
    if getattr(data, "streamed", False):  # no random access; sharding refuses it anyway
        return f"a stream of {n} examples"
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(str(n).encode())
    picks = sorted({round(i * (n - 1) / max(samples - 1, 1)) for i in range(samples)})
    for leaf in tensor_leaves(data.select(picks)):
        t = leaf.detach().cpu().contiguous()
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def tensor_digest(tensor: torch.Tensor) -> str:
    """A content digest of one tensor (dtype, shape and bytes)."""
    t = tensor.detach().cpu().contiguous()
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(str((t.dtype, tuple(t.shape))).encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]
