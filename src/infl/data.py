"""Indexed access to training and test data.

infl needs three things of a data set: its size ``n``, its examples in a fixed order (so that
column ``i`` of a score matrix always means training example ``i``), and, for stochastic
solvers and retraining, random access to arbitrary subsets. :class:`IndexedData` provides them
for the three forms users hold data in:

* a batch of tensors — a tensor, a tuple/list of tensors, or a dict of tensors, all with the
  same leading dimension ``n`` (for example ``(X, y)``);
* a map-style :class:`torch.utils.data.Dataset` (examples are collated with
  ``default_collate``);
* a :class:`torch.utils.data.DataLoader` over a map-style dataset with a sequential sampler
  (a shuffling loader is refused: its order changes from one pass to the next);
* an :class:`torch.utils.data.IterableDataset` that states its length (``__len__``), or a
  ``DataLoader`` over one: a *stream*, read in order, one pass at a time, never held in memory.

A stream supports what a pass in order needs — ``len``, :meth:`IndexedData.chunks`, and
:meth:`IndexedData.select` of a contiguous ascending range (read up to its end) — which is
everything :class:`~infl.InfluenceCalculator` needs for ``influence``, ``removal_effect``,
``top_k``, ``self_influence()`` of all examples, the score and gradient stores and the
streamed solvers (CG, Arnoldi, K-FAC/EK-FAC, exact). Operations that need random access —
``select`` of arbitrary indices (``self_influence(indices)``, ``train_grads(indices)``,
``param_change``, group influence), ``without`` (retraining), stochastic subsampling (LiSSA) —
raise :class:`~infl.errors.InputError` saying to pass a map-style ``Dataset`` instead. The
stream must yield the same examples in the same order on every pass (infl counts them and
refuses a pass that yields more or fewer than the stated length).

A *batch* is whatever the user's loss understands; infl only needs every tensor leaf of it to
have the batch dimension first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler
from torch.utils.data._utils.collate import default_collate

from infl.errors import InputError

Batch = Any
"""A batch of examples: a tensor, or a tuple/list/dict (possibly nested) of tensors whose
leading dimension indexes the examples."""


def tree_map_tensors(fn: Callable[[torch.Tensor], Any], batch: Batch) -> Batch:
    """Apply ``fn`` to every tensor leaf of a (nested) tuple/list/dict batch."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: tree_map_tensors(fn, v) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(tree_map_tensors(fn, v) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(tree_map_tensors(fn, v) for v in batch)
    return batch


def tensor_leaves(batch: Batch) -> list[torch.Tensor]:
    """The tensor leaves of a batch, in a deterministic order."""
    leaves: list[torch.Tensor] = []
    tree_map_tensors(lambda t: leaves.append(t), batch)
    return leaves


def batch_size(batch: Batch) -> int:
    """Number of examples in ``batch`` (the common leading dimension of its tensor leaves).

    Raises
    ------
    InputError
        If the batch has no tensors, a 0-d tensor, or leaves of different leading sizes.
    """
    leaves = tensor_leaves(batch)
    if not leaves:
        raise InputError(
            f"a batch must contain at least one tensor; got {type(batch).__name__}. "
            "Pass tensors, a tuple/list/dict of tensors, a Dataset or a DataLoader."
        )
    if any(t.dim() == 0 for t in leaves):
        raise InputError(
            "every tensor in a batch needs a leading example dimension; found a 0-d tensor"
        )
    sizes = {int(t.shape[0]) for t in leaves}
    if len(sizes) != 1:
        raise InputError(
            f"tensors in one batch have different leading sizes {sorted(sizes)}; "
            "all tensors of a batch must index the same examples along dim 0"
        )
    return sizes.pop()


def slice_batch(batch: Batch, index: slice | torch.Tensor) -> Batch:
    """Select examples ``index`` (a slice or a 1-d index tensor) from every tensor leaf."""
    return tree_map_tensors(lambda t: t[index], batch)


def batch_to(batch: Batch, device: torch.device, dtype: torch.dtype) -> Batch:
    """Move tensor leaves to ``device``; cast floating-point leaves to ``dtype``."""

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    return tree_map_tensors(move, batch)


class IndexedData:
    """A data set with a fixed example order, chunked iteration and random access.

    Parameters
    ----------
    data
        Tensors (``X``, ``(X, y)``, ``{"x": X, "y": y}``), a map-style ``Dataset``, a
        ``DataLoader`` with a sequential sampler, or an ``IterableDataset`` with ``__len__``
        (or a ``DataLoader`` over one; its items are collated with the loader's
        ``collate_fn`` and read in the main process, whatever its ``num_workers``).
    name
        Used in error messages ("training data", "test data").

    Examples
    --------
    >>> import torch
    >>> d = IndexedData((torch.zeros(5, 3), torch.arange(5)))
    >>> len(d), [i for i, _ in d.chunks(2)]
    (5, [0, 2, 4])
    """

    def __init__(self, data: Any, name: str = "data") -> None:
        self.name = name
        self._tensors: Batch | None = None
        self._dataset: Dataset[Any] | None = None
        self._collate: Callable[[list[Any]], Batch] = default_collate
        self._stream: IterableDataset[Any] | None = None
        self._n: int
        if isinstance(data, IndexedData):
            self._tensors, self._dataset, self._collate, self._stream = (
                data._tensors,
                data._dataset,
                data._collate,
                data._stream,
            )
            self._n = data._n
            return
        if isinstance(data, DataLoader) and isinstance(data.dataset, IterableDataset):
            self._stream = data.dataset
            if data.collate_fn is not None and data.batch_size is not None:
                self._collate = data.collate_fn
            self._n = self._stream_len(data.dataset)
        elif isinstance(data, IterableDataset):
            self._stream = data
            self._n = self._stream_len(data)
        elif isinstance(data, DataLoader):
            if not isinstance(data.sampler, SequentialSampler):
                raise InputError(
                    f"{name}: the DataLoader uses {type(data.sampler).__name__}, so example i "
                    "would not be the same example from one pass to the next. Build the "
                    "DataLoader with shuffle=False (or pass the Dataset itself)."
                )
            self._dataset = data.dataset
            if data.collate_fn is not None:
                self._collate = data.collate_fn
            self._n = self._dataset_len(data.dataset)
        elif isinstance(data, Dataset):
            self._dataset = data
            self._n = self._dataset_len(data)
        elif isinstance(data, (torch.Tensor, tuple, list, Mapping)):
            self._tensors = data
            self._n = batch_size(data)
        else:
            raise InputError(
                f"{name}: cannot index a {type(data).__name__}. Pass tensors (a tensor, a "
                "tuple/list/dict of tensors), a map-style Dataset, or a DataLoader."
            )
        if self._n == 0:
            raise InputError(f"{name} is empty: at least one example is needed")

    def _stream_len(self, stream: IterableDataset[Any]) -> int:
        try:
            n = len(stream)  # type: ignore[arg-type]
        except TypeError as err:
            raise InputError(
                f"{self.name}: the IterableDataset has no length, and infl needs n before the "
                "first pass (score columns, chunk counts, the 1/n of the objective). Give it a "
                "__len__ returning the number of examples it yields, or use a map-style "
                "Dataset"
            ) from err
        if not isinstance(n, int) or n < 0:
            raise InputError(f"{self.name}: len() of the IterableDataset returned {n!r}")
        return n

    @property
    def streamed(self) -> bool:
        """Whether the data is a stream (an ``IterableDataset``): read in order only."""
        return self._stream is not None

    def _refuse_random_access(self, what: str) -> InputError:
        return InputError(
            f"{self.name} is an IterableDataset, which can only be read in order, and {what} "
            "needs random access to its examples. Pass a map-style Dataset (with __getitem__) "
            "or tensors for this operation; streaming passes (influence, top_k, "
            "self_influence of all examples, the score and gradient stores) work on the stream"
        )

    def _stream_items(self) -> Iterator[Any]:
        """The stream's items, checked against its stated length."""
        assert self._stream is not None
        count = 0
        for item in self._stream:
            if count == self._n:
                raise InputError(
                    f"{self.name}: the IterableDataset yielded more than the {self._n} examples "
                    "its __len__ states; make __len__ return the number of examples it yields "
                    "(and yield the same ones, in the same order, on every pass)"
                )
            count += 1
            yield item
        if count != self._n:
            raise InputError(
                f"{self.name}: the IterableDataset yielded {count} examples, but its __len__ "
                f"states {self._n}; make them agree (and yield the same examples, in the same "
                "order, on every pass)"
            )

    def _dataset_len(self, dataset: Any) -> int:
        try:
            return len(dataset)
        except TypeError as err:
            raise InputError(
                f"{self.name}: the dataset has no length (an IterableDataset?); infl needs a "
                "map-style dataset so that every example has a fixed index"
            ) from err

    def __len__(self) -> int:
        return self._n

    def select(self, indices: Sequence[int] | torch.Tensor) -> Batch:
        """The examples at ``indices``, as one batch (in the given order).

        A stream serves only a contiguous ascending range ``a..b-1`` (reading its first ``b``
        examples); other indices raise :class:`~infl.errors.InputError`.
        """
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() == 0:
            raise InputError(f"{self.name}: cannot select an empty set of examples")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self._n:
            bad = lo if lo < 0 else hi
            raise InputError(
                f"{self.name}: index {bad} is out of range for {self._n} examples "
                f"(valid: 0..{self._n - 1})"
            )
        if self._tensors is not None:
            return slice_batch(self._tensors, idx)
        if self._stream is not None:
            first = int(idx[0])
            if not torch.equal(idx, torch.arange(first, first + idx.numel())):
                raise self._refuse_random_access("selecting examples out of order")
            items = []
            for i, item in enumerate(self._stream):
                if i >= first:
                    items.append(item)
                if len(items) == idx.numel():
                    break
            return self._collate(items)
        assert self._dataset is not None
        return self._collate([self._dataset[int(i)] for i in idx])

    def chunks(self, chunk_size: int, *, skip: int = 0) -> Iterator[tuple[int, Batch]]:
        """Yield ``(start, batch)`` over consecutive chunks of at most ``chunk_size`` examples.

        ``skip`` leaves out the first ``skip`` chunks (a resumed pass): tensors and datasets
        are not read for them; a stream reads through them without collating.
        """
        if chunk_size < 1:
            raise InputError(f"chunk_size must be a positive integer, got {chunk_size}")
        if self._stream is not None:
            yield from self._stream_chunks(chunk_size, skip)
            return
        for start in range(skip * chunk_size, self._n, chunk_size):
            stop = min(start + chunk_size, self._n)
            if self._tensors is not None:
                yield start, slice_batch(self._tensors, slice(start, stop))
            else:
                yield start, self.select(range(start, stop))

    def _stream_chunks(self, chunk_size: int, skip: int) -> Iterator[tuple[int, Batch]]:
        first = skip * chunk_size
        items: list[Any] = []
        start = first
        for i, item in enumerate(self._stream_items()):
            if i < first:
                continue
            items.append(item)
            if len(items) == chunk_size:
                yield start, self._collate(items)
                start, items = start + chunk_size, []
        if items:
            yield start, self._collate(items)

    def num_chunks(self, chunk_size: int) -> int:
        """How many chunks :meth:`chunks` yields for ``chunk_size``."""
        return -(-self._n // chunk_size)

    def without(self, indices: Sequence[int] | torch.Tensor) -> IndexedData:
        """A new data set with the examples at ``indices`` removed (order otherwise kept)."""
        if self._stream is not None:
            raise self._refuse_random_access("removing examples (retraining)")
        drop = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        keep = torch.ones(self._n, dtype=torch.bool)
        keep[drop] = False
        kept = torch.nonzero(keep).reshape(-1)
        if kept.numel() == 0:
            raise InputError(f"{self.name}: removing these examples leaves no data")
        return IndexedData(self.select(kept), name=self.name)


def as_indexed(data: Any, name: str) -> IndexedData:
    """Wrap ``data`` in :class:`IndexedData` unless it already is one."""
    return data if isinstance(data, IndexedData) else IndexedData(data, name=name)
