"""The one process pool: independent tasks in ``spawn``-ed workers, results as they finish.

:func:`run_tasks` calls ``fn(item, payload)`` for every item. The *payload* (a model and its
data, a study preset, ...) is pickled once and handed to each worker by its initializer, so it
crosses the process boundary once per worker rather than once per task. With ``workers=1`` (or
a single item) everything runs in this process, with no pickling at all: the same function,
the same results, in input order.

Results are yielded as ``(item, result)`` pairs as soon as each task ends, so the caller can
persist every finished result before the next one arrives (an interrupted run loses only the
tasks in flight).
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

__all__ = ["pickle_payload", "run_tasks"]

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
