"""Removals: which training examples a retrain leaves out, validated and normalised."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from infl.errors import InputError

__all__ = ["Removal", "normalize_removals"]

Removal = int | Sequence[int] | torch.Tensor
"""One removal: a training index (leave-one-out) or a group of indices."""


def normalize_removals(removals: Any, n: int) -> list[tuple[int, ...]]:
    """Turn ``removals`` into a list of sorted index tuples, validating each.

    Parameters
    ----------
    removals
        ``None`` (leave-one-out for every training example), a 1-d integer tensor/array or a
        sequence of ints (leave-one-out for each), or a sequence whose items are ints or
        groups (sequences / 1-d tensors of ints). A 2-d tensor is read as one group per row.
    n
        Number of training examples.

    Raises
    ------
    InputError
        An index out of ``0..n-1``, an empty group, an index repeated within a group, a group
        that removes every example, or a non-integer index.
    """
    if removals is None:
        return [(i,) for i in range(n)]
    if isinstance(removals, (torch.Tensor, np.ndarray)):
        arr = np.asarray(
            removals.detach().cpu() if isinstance(removals, torch.Tensor) else removals
        )
        if arr.ndim == 1:
            items: list[Any] = arr.tolist()
        elif arr.ndim == 2:
            items = arr.tolist()
        else:
            raise InputError(f"removals as an array must be 1-d or 2-d, got shape {arr.shape}")
    elif isinstance(removals, (int, np.integer)):
        items = [int(removals)]
    else:
        items = list(removals)
    if not items:
        raise InputError("removals is empty: give at least one index or group to remove")
    out = []
    for pos, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            item = item.reshape(-1).tolist() if item.dim() > 0 else int(item)
        group = [item] if _is_int(item) else list(item)
        if not group:
            raise InputError(f"removal {pos} is an empty group; every removal needs >= 1 index")
        for v in group:
            if not _is_int(v):
                raise InputError(f"removal {pos} contains {v!r}, which is not an integer index")
            if not 0 <= int(v) < n:
                raise InputError(
                    f"removal {pos} contains index {int(v)}, out of range for {n} training "
                    f"examples (valid: 0..{n - 1})"
                )
        ints = sorted(int(v) for v in group)
        if len(set(ints)) != len(ints):
            dup = next(v for v in ints if ints.count(v) > 1)
            raise InputError(
                f"removal {pos} lists index {dup} more than once; a group is a set of "
                "distinct indices"
            )
        if len(ints) >= n:
            raise InputError(f"removal {pos} removes all {n} training examples; nothing is left")
        out.append(tuple(ints))
    return out


def _is_int(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, (int, np.integer))
