"""Finiteness checks that cost one reduction, not a boolean copy of the tensor.

``torch.isfinite(t).all()`` writes a boolean tensor as large as ``t`` and then reduces it:
on a ``[256, 85002]`` float32 chunk of per-example gradients it took 152 ms against 7 ms for
a row sum (one thread). A NaN or infinity in a row makes that row's sum NaN or infinite, so a
finite sum proves a finite row; only a non-finite sum (an overflow of huge finite values, or a
real NaN/inf) is looked at entry by entry.
"""

from __future__ import annotations

import math

import torch

__all__ = ["all_finite", "first_nonfinite_row"]


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite (one sum; exact check only if it overflows)."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    if math.isfinite(float(tensor.sum())):  # a Python float: no second tensor op on the sum
        return True
    return bool(torch.isfinite(tensor).all())


def first_nonfinite_row(matrix: torch.Tensor) -> int | None:
    """The first row of ``matrix`` ``[b, ...]`` holding a NaN or infinity, or ``None``.

    Cost: one row-wise sum and its total; only when the total is not finite are the rows whose
    sum is not finite checked entry by entry.
    """
    if matrix.numel() == 0 or not matrix.is_floating_point():
        return None
    sums = matrix.reshape(matrix.shape[0], -1).sum(dim=1)
    if math.isfinite(float(sums.sum())):
        return None
    for row in (~torch.isfinite(sums)).nonzero().reshape(-1).tolist():
        if not bool(torch.isfinite(matrix[row]).all()):
            return int(row)
    return None
