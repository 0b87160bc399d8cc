"""Group influence: the predicted effect of removing a whole group of training examples.

:func:`group_removal_effect` is the body of ``InfluenceCalculator.group_removal_effect``
(whose docstring gives the maths: order 1, the sum of the members' removal effects; order 2,
with the group's own share of the curvature, Basu, You & Feizi 2020); :func:`_normalize_groups`
turns index lists or a label array into groups of training indices. The functions take the
calculator and use its public pieces (gradients, the fitted solver, the curvature products);
this module never imports :mod:`infl.calculator` at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from infl.data import IndexedData
from infl.errors import InputError

if TYPE_CHECKING:
    from infl.calculator import InfluenceCalculator


def group_removal_effect(
    calc: InfluenceCalculator, test_data: Any, groups: Any, order: int
) -> torch.Tensor:
    """``[m, G]``: the predicted change of each test measurement when each group is removed."""
    if isinstance(order, bool) or order not in (1, 2):
        raise InputError(f"order must be 1 or 2, got {order!r}")
    members = _normalize_groups(groups, calc.num_train)
    n = calc.num_train
    ihvp = calc.inverse_hvp(test_data).value  # A^{-1} grad f: [m, p]
    sums = torch.stack([grad_sum(calc, idx) for idx in members]).to(ihvp)  # s_U: [G, p]
    effect = ihvp @ sums.T / n
    if order == 1:
        return effect
    shifts = calc.fitted_solver().solve(sums / n, progress=calc.progress).value  # [G, p]
    corrections = []
    for g, idx in enumerate(members):
        data = IndexedData(calc.train.select(idx), name=f"group {g}")
        product = (
            calc.wrapper.ggn_vp(data, shifts[g : g + 1], calc.chunk_size)
            if calc.curvature == "gauss_newton"
            else calc.wrapper.hvp(data, shifts[g : g + 1], calc.chunk_size)
        )
        corrections.append(product[0] * (idx.numel() / n))  # p_U H_U A^{-1} s_U / n
    return effect + ihvp @ torch.stack(corrections).to(ihvp).T


def grad_sum(calc: InfluenceCalculator, idx: torch.Tensor) -> torch.Tensor:
    """:math:`\\sum_{i\\in U} g_i` (``[p]``), from the gradient cache when it is filled."""
    cached = calc._grad_cache.value
    if cached is not None and cached.shape[0] == calc.num_train:  # not a rank's shard rows
        return cached[idx.to(cached.device)].sum(dim=0)
    total = torch.zeros(calc.num_params, dtype=calc.wrapper.dtype, device=calc.wrapper.device)
    for start in range(0, idx.numel(), calc.chunk_size):
        batch = calc.train.select(idx[start : start + calc.chunk_size])
        total += calc.wrapper.train_grads(batch).sum(dim=0)
    return total


def _normalize_groups(groups: Any, n: int) -> list[torch.Tensor]:
    """Groups of training indices (``list[LongTensor]``) from index lists or a label array."""
    import numpy as np

    if isinstance(groups, (torch.Tensor, np.ndarray)):
        arr = np.asarray(groups.detach().cpu() if isinstance(groups, torch.Tensor) else groups)
        if arr.ndim != 1:
            raise InputError(
                f"groups as an array must be a label array of shape [n={n}], got shape "
                f"{arr.shape}; give several groups as a list of index lists"
            )
        return _label_groups(arr, n)
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise InputError(
            "groups must be a list of index lists or a label array [n], got "
            f"{type(groups).__name__}"
        )
    items = list(groups)
    if not items:
        raise InputError("groups is empty: give at least one group of training indices")
    if all(_is_index(v) for v in items):
        return _label_groups(np.asarray(items), n)
    out = []
    for g, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            item = item.reshape(-1).tolist()
        if _is_index(item) or isinstance(item, (str, bytes)) or not isinstance(item, Sequence):
            raise InputError(
                f"group {g} is {item!r}; every group must be a list of training indices (a "
                "label array [n] must be all labels, not a mix of labels and lists)"
            )
        if not item:
            raise InputError(f"group {g} is empty; every group needs at least one index")
        for v in item:
            if not _is_index(v):
                raise InputError(f"group {g} contains {v!r}, which is not an integer index")
            if not 0 <= int(v) < n:
                raise InputError(
                    f"group {g} contains index {int(v)}, out of range for {n} training "
                    f"examples (valid: 0..{n - 1})"
                )
        ints = [int(v) for v in item]
        if len(set(ints)) != len(ints):
            dup = next(v for v in ints if ints.count(v) > 1)
            raise InputError(f"group {g} lists index {dup} more than once")
        if len(ints) >= n:
            raise InputError(f"group {g} holds all {n} training examples; nothing would be left")
        out.append(torch.tensor(sorted(ints), dtype=torch.long))
    return out


def _label_groups(labels: Any, n: int) -> list[torch.Tensor]:
    import numpy as np

    if labels.shape[0] != n:
        raise InputError(
            f"a label array must have one label per training example, length n={n}; got "
            f"length {labels.shape[0]}. To give explicit groups, pass a list of index lists "
            "(one group: [[i, j, ...]])"
        )
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise InputError("the label array contains NaN or infinite labels; label every example")
    values = np.unique(labels)
    if len(values) == 1:
        raise InputError(
            f"the label array has one label ({values[0]!r}) for all {n} examples: that group "
            "would remove everything"
        )
    return [torch.as_tensor(np.nonzero(labels == v)[0], dtype=torch.long) for v in values]


def _is_index(v: Any) -> bool:
    import numpy as np

    return not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, np.integer))
