"""The one process pool: independent tasks in ``spawn``-ed workers, results as they finish.

:func:`run_tasks` calls ``fn(item, payload)`` for every item. The *payload* (a model and its
data, a study preset, ...) is pickled once and handed to each worker by its initializer, so it
crosses the process boundary once per worker rather than once per task. With ``workers=1`` (or
a single item) everything runs in this process, with no pickling at all: the same function,
the same results, in input order.

Results are yielded as ``(item, result)`` pairs as soon as each task ends, so the caller can
persist every finished result before the next one arrives (an interrupted run loses only the
tasks in flight). :func:`run_resumable` does exactly that for JSON results in a
:class:`~infl.store.Store`: it runs only the items whose record is missing.
"""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from infl.errors import InputError
from infl.store import Store

__all__ = ["pickle_payload", "run_resumable", "run_tasks"]

T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R")

_PAYLOAD: Any = None  # set in each worker by _init_worker


def pickle_payload(payload: Any, what: str = "the task's inputs") -> bytes:
    """``pickle.dumps(payload)``, or an :class:`~infl.InputError` that says what to change.

    Parameters
    ----------
    payload
        The object to send to worker processes.
    what
        What the payload holds, for the message (e.g. ``"the model, loss and data"``).
    """
    try:
        return pickle.dumps(payload)
    except Exception as err:  # pickling raises many types (PicklingError, AttributeError, ...)
        raise InputError(
            f"workers > 1 sends {what} to other processes, but they cannot be pickled "
            f"({type(err).__name__}: {err}). A lambda or a function defined inside another "
            "function is the usual cause: define it at module level (or use the built-in "
            "losses/measurements of infl.objective), or use workers=1"
        ) from err


def _init_worker(payload: bytes, threads: int | None) -> None:
    global _PAYLOAD
    if threads is not None:
        torch.set_num_threads(threads)
    _PAYLOAD = pickle.loads(payload)


def _call(fn: Callable[[T, Any], R], item: T) -> R:
    return fn(item, _PAYLOAD)


def run_tasks(
    fn: Callable[[T, P], R],
    items: Sequence[T],
    payload: P,
    *,
    workers: int = 1,
    threads: int | None = None,
    progress: bool = True,
    desc: str = "tasks",
    unit: str = "task",
    initial: int = 0,
    what: str = "the task's inputs",
) -> Iterator[tuple[T, R]]:
    """Run ``fn(item, payload)`` for every item; yield ``(item, result)`` as each one ends.

    Parameters
    ----------
    fn
        A module-level (picklable) function ``fn(item, payload) -> result``.
    items
        The tasks' arguments (each picklable when ``workers > 1``).
    payload
        Shared by every task; pickled once and sent to each worker when ``workers > 1``.
    workers
        Number of processes (``spawn`` start method). ``1`` (or a single item) runs every
        task here, in order, without pickling.
    threads
        Torch intra-op threads in each worker (``None``: torch's default). Not applied to
        this process on the ``workers=1`` path.
    progress
        Show a tqdm bar over tasks.
    desc, unit
        The bar's label and unit.
    initial
        Tasks already done elsewhere (e.g. loaded from a store): the bar starts there and
        counts up to ``initial + len(items)``.
    what
        What the payload holds, for the error raised when it cannot be pickled.

    Yields
    ------
    tuple
        ``(item, fn(item, payload))``, in completion order (input order when ``workers=1``).

    Raises
    ------
    InputError
        ``workers`` is not a positive integer, or the payload cannot be pickled.

    Notes
    -----
    If the caller stops iterating or a task raises, tasks not yet started are cancelled; the
    exception of the failed task is re-raised here.
    """
    if isinstance(workers, bool) or int(workers) != workers or workers < 1:
        raise InputError(f"workers must be a positive integer, got {workers}")
    todo = list(items)
    bar = tqdm(
        total=initial + len(todo), initial=initial, desc=desc, unit=unit, disable=not progress
    )
    try:
        if workers == 1 or len(todo) <= 1:
            for item in todo:
                result = fn(item, payload)
                bar.update()
                yield item, result
            return
        data = pickle_payload(payload, what)
        with ProcessPoolExecutor(
            max_workers=min(int(workers), len(todo)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(data, threads),
        ) as pool:
            futures: dict[Future[R], T] = {pool.submit(_call, fn, item): item for item in todo}
            try:
                for future in as_completed(futures):
                    result = future.result()
                    bar.update()
                    yield futures[future], result
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()


def _item_name(item: Any) -> str:
    name: str = item.cell_id
    return name


def run_resumable(
    fn: Callable[[T, P], Any],
    items: Sequence[T],
    payload: P,
    store: Store,
    *,
    name: Callable[[T], str] = _item_name,
    workers: int = 1,
    progress: bool = True,
    desc: str = "cells",
    unit: str = "cell",
) -> list[Any]:
    """Run every item whose JSON record is not yet in ``store``; return all results in order.

    Parameters
    ----------
    fn, payload, workers, progress, desc, unit
        As in :func:`run_tasks`; ``fn`` must return a JSON-serialisable result.
    items
        The tasks; those whose record ``name(item)`` is in ``store`` are loaded, not run.
    store
        Where each result is written (:meth:`Store.save_json`) as soon as its task ends.
    name
        The record name of an item (default: its ``cell_id`` attribute); names must be
        unique and plain file names.

    Returns
    -------
    list
        ``[result of item for item in items]``: loaded results as they read back from JSON,
        new ones as ``fn`` returned them.

    Notes
    -----
    An interruption (Ctrl-C, a kill) loses only the tasks in flight: every finished result is
    already on disk, and the next call with the same store starts from there.
    """
    results: dict[str, Any] = {}
    todo: list[T] = []
    for item in items:
        stored = store.load_json(name(item))
        if stored is None:
            todo.append(item)
        else:
            results[name(item)] = stored
    tasks = run_tasks(
        fn,
        todo,
        payload,
        workers=workers,
        progress=progress,
        desc=desc,
        unit=unit,
        initial=len(results),
    )
    for item, result in tasks:
        store.save_json(name(item), result)
        results[name(item)] = result
    return [results[name(item)] for item in items]
