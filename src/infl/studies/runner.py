"""Run a list of independent cells, in parallel processes, resuming from a results store."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Protocol, TypeVar

from tqdm.auto import tqdm

from infl.errors import InputError
from infl.studies.store import CellStore


class Cell(Protocol):
    """Anything with a stable, filename-safe ``cell_id``."""

    @property
    def cell_id(self) -> str: ...


C = TypeVar("C", bound=Cell)
P = TypeVar("P")


def run_cells(
    cells: Sequence[C],
    run: Callable[[C, P], dict[str, Any]],
    settings: P,
    store: CellStore,
    *,
    workers: int = 1,
    progress: bool = True,
    desc: str = "cells",
) -> list[dict[str, Any]]:
    """Run every cell not yet in ``store`` and return all rows in the order of ``cells``.

    Parameters
    ----------
    cells
        The cells to run; those already stored are loaded, not recomputed.
    run
        ``run(cell, settings) -> row``: a module-level (picklable) function.
    settings
        Passed to every call (a frozen preset).
    store
        Where finished rows are written as each cell ends (atomically).
    workers
        Parallel processes (``spawn``); 1 runs in this process.
    progress
        A tqdm bar over cells.

    Notes
    -----
    An interruption (Ctrl-C, a kill) loses only the cells in flight: every finished row is
    already on disk, and the next call with the same store starts from there.
    """
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    rows: dict[str, dict[str, Any]] = {}
    todo: list[C] = []
    for cell in cells:
        stored = store.load(cell.cell_id)
        if stored is None:
            todo.append(cell)
        else:
            rows[cell.cell_id] = stored
    bar = tqdm(total=len(cells), initial=len(rows), desc=desc, disable=not progress)
    try:
        if workers == 1 or len(todo) <= 1:
            for cell in todo:
                row = run(cell, settings)
                store.save(cell.cell_id, row)
                rows[cell.cell_id] = row
                bar.update(1)
        else:
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                pending: dict[Future[dict[str, Any]], C] = {
                    pool.submit(run, cell, settings): cell for cell in todo
                }
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        cell = pending.pop(future)
                        row = future.result()
                        store.save(cell.cell_id, row)
                        rows[cell.cell_id] = row
                        bar.update(1)
    finally:
        bar.close()
    return [rows[cell.cell_id] for cell in cells]
