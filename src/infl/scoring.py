"""The calculator's test side and its dense scores.

The bodies of ``InfluenceCalculator.test_grads`` (:func:`measurement_grads`),
``train_grads``, ``inverse_hvp`` (with its cache of the 8 latest test batches), ``influence``
(dispatch to the store, per-layer, low-rank and row-blocked paths, else ``[m, n]`` from the
streamed training gradients, gathered over ranks), ``top_k`` and ``influence_frame``; the
maths, shapes, signs and costs are documented on those methods. The functions take the
calculator and use its public pieces; this module never imports :mod:`infl.calculator` at run
time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from infl import score_store, streaming, train_gradients
from infl.data import as_indexed
from infl.errors import InputError
from infl.export import Ids, scores_to_frame
from infl.persistence import _fingerprint
from infl.solvers.base import SolveResult

if TYPE_CHECKING:
    import pandas as pd

    from infl.calculator import InfluenceCalculator

IHVP_CACHE_SIZE = 8
"""How many test batches' inverse-HVPs a calculator keeps (the latest ones)."""


def measurement_grads(calc: InfluenceCalculator, test_data: Any) -> torch.Tensor:
    """:math:`\\nabla f(z_j)` for every test example: ``[m, p]``."""
    test = as_indexed(test_data, "test data")
    rows = [
        calc.wrapper.per_example_grads(calc.measurement, batch)
        for _, batch in test.chunks(calc.chunk_size)
    ]
    return torch.cat(rows)


def train_grads(
    calc: InfluenceCalculator, indices: Sequence[int] | torch.Tensor | None
) -> torch.Tensor:
    """:math:`g_i` at ``indices`` (``[k, p]``), or all ``[n, p]`` gathered over ranks."""
    if indices is None:
        local = torch.cat(
            [g for _, g in train_gradients.iter_train_grads(calc, desc="train gradients")]
        )
        return calc.group.gather_shard_rows(local, calc.num_train)
    return calc.wrapper.train_grads(calc.train.select(indices))


def inverse_hvp(calc: InfluenceCalculator, test_data: Any) -> SolveResult:
    """:math:`A^{-1}\\nabla f(z_j)` (``[m, p]``), solved once per distinct test batch."""
    key = _fingerprint(as_indexed(test_data, "test data"))
    if key in calc._ihvp_cache:
        calc._ihvp_cache.move_to_end(key)
        return calc._ihvp_cache[key]
    fitted = calc.fitted_solver()
    before = fitted.damping
    result = fitted.solve(calc.test_grads(test_data), progress=calc.progress)
    if fitted.damping != before:  # damping="auto" raised it: older results are stale
        calc._ihvp_cache.clear()
    calc._ihvp_cache[key] = result
    while len(calc._ihvp_cache) > IHVP_CACHE_SIZE:
        calc._ihvp_cache.popitem(last=False)
    return result


def influence(
    calc: InfluenceCalculator,
    test_data: Any,
    per_layer: bool,
    out: str | os.PathLike[str] | None,
) -> torch.Tensor | dict[str, torch.Tensor] | score_store.ScoreStore:
    """:math:`-\\nabla f(z_j)^T A^{-1} g_i`: ``[m, n]``, per layer, or written to ``out``."""
    if out is not None:
        if per_layer:
            raise InputError("per_layer=True scores cannot be written to a store (out=)")
        return score_store.influence_to_store(calc, test_data, out)
    if per_layer:
        return train_gradients.per_layer_influence(calc, test_data)
    blocked = streaming.blocked_influence(calc, test_data)
    if blocked is not None:
        return blocked
    low_rank_scores = train_gradients.low_rank_influence(calc, test_data)
    if low_rank_scores is not None:
        return low_rank_scores
    ihvp = calc.inverse_hvp(test_data).value
    local_n = len(calc.local_train)  # this rank's columns; all n in one process
    scores = torch.empty(ihvp.shape[0], local_n, dtype=ihvp.dtype, device=ihvp.device)
    # a low-rank solver scoring without its projections (see train_gradients.projects) keeps
    # its promise never to hold [n, p]
    fill = not calc.solver.low_rank_scoring
    blocks = train_gradients.iter_train_products(calc, ihvp, desc="scoring", fill_cache=fill)
    for start, block in blocks:
        scores[:, start : start + block.shape[1]] = -block
    return calc.group.gather_columns(scores, calc.num_train)


def top_k(
    calc: InfluenceCalculator, test_data: Any, k: int, by: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and influence values (both ``[m, k]``) of the ``k`` top examples by ``by``."""
    if not 1 <= k <= calc.num_train:
        raise InputError(f"k must be in 1..{calc.num_train}, got {k}")
    if streaming.single_process(calc):
        return streaming.top_k(calc, test_data, k, by)
    scores = calc.influence(test_data)
    if by == "abs":
        key = scores.abs()
    elif by == "helpful":
        key = -scores
    elif by == "harmful":
        key = scores
    else:
        raise InputError(f"by must be 'abs', 'helpful' or 'harmful', got {by!r}")
    idx = key.topk(k, dim=1).indices
    return idx, scores.gather(1, idx)


def influence_frame(
    calc: InfluenceCalculator,
    test_data: Any,
    test_ids: Ids,
    train_ids: Ids,
    kind: str,
    long: bool,
) -> pd.DataFrame:
    """``calc.influence`` or ``calc.removal_effect`` as a ``DataFrame`` (see the method)."""
    if kind == "influence":
        scores = calc.influence(test_data)
    elif kind == "removal_effect":
        scores = calc.removal_effect(test_data)
    else:
        raise InputError(f"kind must be 'influence' or 'removal_effect', got {kind!r}")
    return scores_to_frame(scores, test_ids, train_ids, value_name=kind, long=long)
