"""Progress bars that cost nothing when they are off."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

__all__ = ["progress_iter"]


def progress_iter(
    items: Iterable[T], *, desc: str, enabled: bool, total: int | None = None
) -> Iterator[T]:
    """``items`` behind a transient ``tqdm`` bar when ``enabled``, else ``items`` themselves.

    A disabled ``tqdm`` still costs about 15 microseconds to build and iterate: a few percent
    of a millisecond-scale influence job, which runs several such loops.
    """
    if not enabled:
        return iter(items)
    return iter(tqdm(items, total=total, desc=desc, leave=False))
