"""Scores in tiles, so that memory is set by ``chunk_size`` and ``memory_budget``, not ``n``, ``m``.

A score matrix ``[m, n]`` is produced tile by tile: the test examples in *row blocks* of
``b_r`` examples (:func:`row_block_size`), the training examples in *column chunks* of
``chunk_size`` (the calculator's gradient chunks). For each row block the test gradients
``[b_r, p]`` are taken and solved once (:math:`A^{-1}\\nabla f(z_j)`, ``[b_r, p]``); the
training gradients then stream past them, chunk by chunk, each tile being
``-ihvp @ g_chunk.T`` (``[b_r, chunk_size]``). A low-rank inverse
:math:`U^T\\operatorname{diag}(w)U` scores from the ``[n, r]`` projections instead (no solve)
when :func:`~infl.train_gradients.projects` finds that they pay.

What holds memory: the row block (about ``6 b_r p`` numbers with a Krylov solver's work
vectors), one chunk of per-example gradients (``chunk_size * p``, plus the model's
activations for ``chunk_size`` examples under ``vmap``), one tile, and — only when it fits
``cache_bytes`` — the ``[n, p]`` gradient cache. Consumers of the tiles keep what they need:
:func:`top_k` a running top-``k`` per test example (``[b_r, k + chunk_size]``), the score store
writes each tile to disk, :meth:`~infl.InfluenceCalculator.influence` fills the ``[m, n]``
result it returns.

These are functions of an :class:`~infl.InfluenceCalculator` (this module never imports it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from infl import train_gradients
from infl.data import IndexedData, as_indexed
from infl.errors import InputError

if TYPE_CHECKING:
    from infl.calculator import InfluenceCalculator

__all__ = [
    "SOLVER_WORK_VECTORS",
    "RunningTopK",
    "blocked_influence",
    "check_memory_budget",
    "row_block_size",
    "score_tiles",
    "single_process",
    "top_k",
]

SOLVER_WORK_VECTORS = 6
"""``[b_r, p]`` arrays a row block holds at once: its test gradients, inverse-HVPs and the four
work vectors of conjugate gradients (the largest of the solvers' working sets)."""


def _itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def check_memory_budget(memory_budget: int | None, chunk_size: int, p: int, dtype: Any) -> None:
    """Refuse a ``memory_budget`` that cannot hold one chunk of per-example gradients.

    Raises
    ------
    InputError
        ``memory_budget`` not a positive integer, or below ``2 * chunk_size * p * itemsize``
        (the message gives the largest ``chunk_size`` that fits).
    """
    if memory_budget is None:
        return
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise InputError(
            f"memory_budget must be a positive number of bytes (or None), got {memory_budget!r}"
        )
    need = 2 * chunk_size * p * _itemsize(dtype)
    if need > memory_budget:
        fits = budget_chunk_size(memory_budget, p, dtype) or 0
        fix = f"lower chunk_size to {fits}" if fits >= 1 else "raise memory_budget"
        raise InputError(
            f"memory_budget={memory_budget} bytes cannot hold one chunk of {chunk_size} "
            f"per-example gradients of p={p} parameters and its scores (about {need} bytes); "
            f"{fix}"
        )


def budget_chunk_size(memory_budget: int | None, p: int, dtype: Any) -> int | None:
    """The most examples per chunk whose gradients and scores :func:`check_memory_budget`
    admits (0 when not even one), or ``None`` without a budget (or with one it refuses)."""
    if (
        memory_budget is None
        or isinstance(memory_budget, bool)
        or not isinstance(memory_budget, int)
        or memory_budget < 1
    ):
        return None
    return memory_budget // (2 * p * _itemsize(dtype))


def row_block_size(calc: InfluenceCalculator, m: int) -> int:
    """``b_r``, the test examples scored together (all ``m`` without a ``memory_budget``).

    With a budget :math:`B` bytes, half of it is given to the row block:
    :math:`b_r = \\max(1, \\lfloor (B/2) / ((6p + \\text{chunk\\_size}) \\cdot s) \\rfloor)`
    (``s`` bytes per number, 6 ``[b_r, p]`` arrays: :data:`SOLVER_WORK_VECTORS`), capped at
    ``m``. Each row block costs one pass over the training gradients (from the cache when it
    is filled) and one solve, so a small budget trades memory for passes.
    """
    budget = calc.memory_budget
    if budget is None:
        return m
    per_row = (SOLVER_WORK_VECTORS * calc.num_params + calc.chunk_size) * _itemsize(
        calc.wrapper.dtype
    )
    return max(1, min(m, (budget // 2) // per_row))


def single_process(calc: InfluenceCalculator) -> bool:
    """Whether ``calc`` computes in one process (no ``torch.distributed`` sharding)."""
    group = getattr(calc, "group", None)
    return group is None or int(getattr(group, "world_size", 1)) == 1


def _refuse_distributed(calc: InfluenceCalculator, what: str) -> None:
    if not single_process(calc):
        raise InputError(
            f"{what} runs in one process; under torch.distributed call influence() (its "
            "scores are gathered on every rank) or build the calculator with "
            "distributed=False"
        )


def score_tiles(
    calc: InfluenceCalculator,
    test_data: Any,
    *,
    block_rows: int | None = None,
    done: Callable[[int], int] | None = None,
    desc: str = "scoring",
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(row_start, col_start, tile)`` over the ``[m, n]`` influence scores, tile by tile.

    Parameters
    ----------
    calc
        The calculator (its fitted solver, chunk size and memory budget).
    test_data
        The ``m`` test examples (any form :class:`~infl.IndexedData` takes, streams too).
    block_rows
        ``b_r``; default :func:`row_block_size`.
    done
        ``done(r)``: how many leading column chunks of row block ``r`` are already finished
        and need not be produced (a resumed store). A fully finished row block costs nothing;
        a partly finished one its solve and the remaining chunks' gradients.
    desc
        The progress bar's label.

    Yields
    ------
    row_start, col_start, tile
        ``tile`` is ``influence[row_start : row_start + b, col_start : col_start + c]``
        (``[b, c]``, ``c <= chunk_size``), same values as
        :meth:`~infl.InfluenceCalculator.influence` up to round-off.
    """
    _refuse_distributed(calc, "scoring in tiles (a score store, a budgeted influence or top_k)")
    test = as_indexed(test_data, "test data")
    m, n, chunk = len(test), calc.num_train, calc.chunk_size
    rows = block_rows if block_rows is not None else row_block_size(calc, m)
    col_chunks = -(-n // chunk)
    finished = [done(r) if done is not None else 0 for r in range(test.num_chunks(rows))]
    total = sum(col_chunks - d for d in finished)
    if total == 0:  # a finished store: no fit, no pass
        return
    fitted = calc.fitted_solver()
    low = fitted.low_rank()
    if low is not None:
        todo = [r for r, d in enumerate(finished) if d < col_chunks]
        m_todo = sum(min(rows, m - r * rows) for r in todo)
        if not train_gradients.projects(calc, low[0], m_todo, passes=len(todo)):
            low = None  # the row blocks' inverse-HVPs multiply the training gradients instead
    train_proj = train_gradients.train_projection(calc, low[0]) if low is not None else None
    bar = tqdm(total=total, desc=desc, disable=not calc.progress, leave=False, unit="tile")
    try:
        for r, row_start, batch in _row_blocks(test, rows, finished, col_chunks):
            grads = (
                calc.wrapper.per_example_grads(calc.measurement, batch)
                if low is not None or rows < m
                else None
            )
            skip = finished[r]
            if low is not None and train_proj is not None:
                assert grads is not None
                basis, weights = low
                test_proj = (grads.to(basis) @ basis.T) * weights
                for c in range(skip, col_chunks):
                    cols = slice(c * chunk, min(n, (c + 1) * chunk))
                    yield row_start, cols.start, -(test_proj @ train_proj[cols].T)
                    bar.update(1)
                continue
            if grads is None:  # one block: the calculator's cached inverse-HVPs of the test set
                ihvp = calc.inverse_hvp(test).value
            else:
                ihvp = fitted.solve(grads, progress=False).value
            del grads
            products = train_gradients.iter_train_products(
                calc,
                ihvp,
                desc=f"{desc}, train pass",
                skip=skip,
                fill_cache=not calc.solver.low_rank_scoring,  # a low-rank fit never holds [n, p]
            )
            for start, block in products:
                yield row_start, start, -block
                bar.update(1)
    finally:
        bar.close()


def _row_blocks(
    test: IndexedData, rows: int, finished: list[int], col_chunks: int
) -> Iterator[tuple[int, int, Any]]:
    """``(r, row_start, batch)`` of the unfinished row blocks ``r`` (the leading finished
    ones are skipped without reading them)."""
    if not any(d < col_chunks for d in finished):
        return
    first = next(r for r, d in enumerate(finished) if d < col_chunks)
    for r, (start, batch) in enumerate(test.chunks(rows, skip=first), start=first):
        if finished[r] < col_chunks:
            yield r, start, batch


def blocked_influence(calc: InfluenceCalculator, test_data: Any) -> torch.Tensor | None:
    """``[m, n]`` influence from row blocks when ``memory_budget`` cannot hold all ``m`` test
    rows (``None`` when it can, or under ``torch.distributed``: the caller's one-block path)."""
    if calc.memory_budget is None or not single_process(calc):
        return None
    test = as_indexed(test_data, "test data")
    m = len(test)
    rows = row_block_size(calc, m)
    if rows >= m:
        return None
    scores = torch.empty(m, calc.num_train, dtype=calc.wrapper.dtype, device=calc.wrapper.device)
    for row_start, col_start, tile in score_tiles(calc, test, block_rows=rows):
        scores[row_start : row_start + tile.shape[0], col_start : col_start + tile.shape[1]] = tile
    return scores


class RunningTopK:
    """The ``k`` largest keys seen so far in each of ``b`` rows, over column chunks.

    Memory ``[b, k + c]`` for chunks of ``c`` columns, whatever the number of columns.
    ``by`` picks the key: ``"abs"`` (:math:`|s|`), ``"helpful"`` (:math:`-s`), ``"harmful"``
    (:math:`s`); the scores themselves are kept alongside.
    """

    def __init__(self, rows: int, k: int, by: str, dtype: torch.dtype, device: Any) -> None:
        if by not in ("abs", "helpful", "harmful"):
            raise InputError(f"by must be 'abs', 'helpful' or 'harmful', got {by!r}")
        self.k, self.by = k, by
        self.keys = torch.empty(rows, 0, dtype=dtype, device=device)
        self.values = torch.empty(rows, 0, dtype=dtype, device=device)
        self.indices = torch.empty(rows, 0, dtype=torch.long, device=device)

    def _key(self, scores: torch.Tensor) -> torch.Tensor:
        if self.by == "abs":
            return scores.abs()
        return -scores if self.by == "helpful" else scores

    def update(self, col_start: int, scores: torch.Tensor) -> None:
        """Merge the columns ``col_start .. col_start + c - 1`` (``scores``: ``[b, c]``)."""
        cols = torch.arange(col_start, col_start + scores.shape[1], device=scores.device)
        keys = torch.cat([self.keys, self._key(scores)], dim=1)
        values = torch.cat([self.values, scores], dim=1)
        indices = torch.cat([self.indices, cols.expand(scores.shape[0], -1)], dim=1)
        best = keys.topk(min(self.k, keys.shape[1]), dim=1).indices
        self.keys, self.values = keys.gather(1, best), values.gather(1, best)
        self.indices = indices.gather(1, best)


def top_k(
    calc: InfluenceCalculator, test_data: Any, k: int, by: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of :meth:`InfluenceCalculator.top_k`: ``[m, k]`` indices and scores from the
    tiles of :func:`score_tiles`, keeping a running top-``k`` per test example."""
    if by not in ("abs", "helpful", "harmful"):
        raise InputError(f"by must be 'abs', 'helpful' or 'harmful', got {by!r}")
    test = as_indexed(test_data, "test data")
    m = len(test)
    rows = row_block_size(calc, m)
    out_idx = torch.empty(m, k, dtype=torch.long)
    out_val = torch.empty(m, k, dtype=calc.wrapper.dtype)
    current: RunningTopK | None = None
    current_row = -1

    def flush() -> None:
        if current is not None:
            stop = current_row + current.indices.shape[0]
            out_idx[current_row:stop] = current.indices.cpu()
            out_val[current_row:stop] = current.values.cpu()

    for row_start, col_start, tile in score_tiles(calc, test, block_rows=rows, desc="top-k"):
        if row_start != current_row:
            flush()
            current = RunningTopK(tile.shape[0], k, by, tile.dtype, tile.device)
            current_row = row_start
        assert current is not None
        current.update(col_start, tile)
    flush()
    device = calc.wrapper.device
    return out_idx.to(device), out_val.to(device)
