"""Building an :class:`~infl.calculator.InfluenceCalculator` and its variants.

The bodies of the constructor's steps and of ``with_solver``: the argument checks, the
distributed set-up (ranks that must agree, this rank's shard, the all-reduced curvature
operator), the minimum check at construction, and the fit carried over to a variant that
differs only in damping. The maths and the parameters are documented on the calculator; the
functions take it (or its pieces) and use its public attributes. This module never imports
:mod:`infl.calculator` at run time.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from infl import train_gradients
from infl.chunking import ChunkSize, check_chunk_size
from infl.data import IndexedData
from infl.distributed import (
    ProcessGroup,
    Shard,
    ShardedData,
    data_digest,
    process_group,
    shard_operator,
    tensor_digest,
)
from infl.errors import InputError
from infl.fingerprint import fingerprint
from infl.mixed_precision import mixed_precision_operator
from infl.model import ModelWrapper, Stationarity
from infl.objective import Objective
from infl.operators import (
    GaussNewtonOperator,
    HessianOperator,
    LinearOperator,
    TrainingDataOperator,
)
from infl.solvers.base import Solver, solver_spec

if TYPE_CHECKING:
    from infl.calculator import InfluenceCalculator

CURVATURES: dict[str, type[TrainingDataOperator]] = {
    "hessian": HessianOperator,
    "gauss_newton": GaussNewtonOperator,
}
"""``curvature=`` names of :class:`InfluenceCalculator` and the operators they build."""


def check_arguments(
    objective: Objective, solver: Solver, chunk_size: ChunkSize, curvature: str
) -> None:
    """Refuse, before any work, an objective, solver, ``chunk_size`` or ``curvature`` of the
    wrong kind (``InputError`` saying what to pass)."""
    if not isinstance(objective, Objective):
        raise InputError(f"objective must be an infl.Objective, got {type(objective).__name__}")
    if not isinstance(solver, Solver):
        raise InputError(f"solver must be an infl solver, got {type(solver).__name__}")
    check_chunk_size(chunk_size)
    if not isinstance(curvature, str) or curvature not in CURVATURES:
        raise InputError(
            f"curvature must be one of {sorted(CURVATURES)}, got {curvature!r}: 'hessian' "
            "for the Hessian of the objective, 'gauss_newton' for the generalised "
            "Gauss-Newton matrix (positive semi-definite)"
        )


def distribute(
    wrapper: ModelWrapper,
    objective: Objective,
    train: IndexedData,
    solver: Solver,
    curvature: str,
    distributed: bool | None,
) -> tuple[ProcessGroup, Shard, IndexedData]:
    """The process group, this rank's shard and its training data (all of it in one process).

    Under ``torch.distributed`` the ranks are first checked to agree on the data, model,
    objective, solver, curvature and dtype (:func:`_rank_facts`), before any collective.
    """
    group = process_group(distributed)
    if group.world_size > 1:  # refuse ranks that disagree before any collective
        group.check_same(_rank_facts(wrapper, objective, train, solver, curvature))
    shard = group.shard(len(train))
    local_train = train if group.world_size == 1 else ShardedData(train, shard)
    return group, shard, local_train


def curvature_operator(
    curvature: str,
    wrapper: ModelWrapper,
    local_train: IndexedData,
    chunk_size: int,
    group: ProcessGroup,
    curvature_dtype: torch.dtype | None = None,
) -> LinearOperator:
    """The ``curvature=`` operator on this rank's shard, its products all-reduced over ranks;
    with ``curvature_dtype`` (checked by :func:`infl.mixed_precision.check_curvature_dtype`)
    its products are taken in that dtype (:func:`infl.mixed_precision.mixed_precision_operator`,
    one process only)."""
    operator = CURVATURES[curvature](wrapper, local_train, chunk_size)
    if curvature_dtype is None:
        return shard_operator(operator, group, local_train)
    if group.world_size > 1:
        raise InputError(
            f"curvature_dtype={curvature_dtype} is not supported under torch.distributed "
            f"({group.world_size} ranks) yet: use curvature_dtype=None, or run one process"
        )
    return mixed_precision_operator(operator, curvature_dtype)


def check_minimum(calc: InfluenceCalculator) -> Stationarity:
    """The construction-time minimum check (:attr:`InfluenceCalculator.stationarity`).

    Warns (:class:`~infl.errors.InflWarning`, at the caller of the constructor) when the
    model is not at a minimum of the objective.
    """
    # the pass fills the [n, p] gradient cache (when it fits) that scoring reuses, except
    # where scoring never needs [n, p]: a low-rank inverse scores from [n, r] projections,
    # and nn.Linear models multiply their gradients without forming them
    wrapper = calc.wrapper
    if calc.solver.low_rank_scoring or wrapper.has_linear_shortcut:
        stationarity = wrapper.stationarity_from_moments(
            train_gradients.iter_train_moments(calc, desc="checking the minimum"),
            calc.num_train,
            all_reduce=calc.group.all_reduce_sum,
        )
    else:
        stationarity = wrapper.check_stationarity(
            train_gradients.iter_train_grads(calc, desc="checking the minimum"),
            calc.num_train,
            all_reduce=calc.group.all_reduce_sum,
        )
    stationarity.warn_if_not_minimum(stacklevel=3)  # the constructor's caller
    return stationarity


def with_solver(calc: InfluenceCalculator, solver: Solver) -> InfluenceCalculator:
    """The body of :meth:`InfluenceCalculator.with_solver`: a shallow copy with ``solver``,
    no inverse-HVPs, and the fit carried over when only the (numeric) damping differs."""
    if not isinstance(solver, Solver):
        raise InputError(f"solver must be an infl solver, got {type(solver).__name__}")
    other = copy.copy(calc)
    other.solver = solver
    other._ihvp_cache = OrderedDict()
    other._fitted = None
    if (
        calc._fitted is not None
        and _same_but_damping(calc.solver, solver)
        and not isinstance(solver.damping, str)  # "auto" is resolved by a new fit
    ):
        other._fitted = calc._fitted.with_damping(solver.damping)
    return other


def _rank_facts(
    wrapper: ModelWrapper, objective: Objective, train: IndexedData, solver: Solver, curvature: str
) -> dict[str, str]:
    """What every rank of a distributed calculator must agree on (compared at construction)."""
    return {
        "training examples": str(len(train)),
        "training data (sampled examples)": data_digest(train),
        "model parameters": f"p={wrapper.num_params}, sha1 {tensor_digest(wrapper.flat_params)}",
        "objective": fingerprint(objective, "objective").digest,
        "solver": repr(solver_spec(solver)),
        "curvature": curvature,
        "dtype": str(wrapper.dtype),
    }


def _same_but_damping(old: Solver, new: Solver) -> bool:
    if type(old) is not type(new):
        return False
    fields = [f.name for f in dataclasses.fields(old) if f.name != "damping"]  # type: ignore[arg-type]
    return all(getattr(old, name) == getattr(new, name) for name in fields)
