"""Saving and loading a calculator's fitted solver (``calc.save`` / ``InfluenceCalculator.load``).

A saved fit is the fitted solver's state, its hyperparameters, ``curvature``, ``chunk_size``
and the identity it is valid for (fingerprints of the model's parameters and buffers, the
objective and the training data), written by :func:`infl.export.write_fitted_state`. Loading
refuses another model, objective or data set and restores the fit with no HVP.

:func:`save_calculator` and :func:`load_calculator` are the bodies of
:meth:`InfluenceCalculator.save <infl.calculator.InfluenceCalculator.save>` and
:meth:`InfluenceCalculator.load <infl.calculator.InfluenceCalculator.load>`;
:func:`_fingerprint` (a content hash of a data set) also keys the calculator's inverse-HVP
cache. This module never imports :mod:`infl.calculator` at run time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from infl.data import IndexedData, tensor_leaves
from infl.errors import InputError
from infl.export import check_same, read_fitted_state, write_fitted_state
from infl.fingerprint import fingerprint
from infl.model_checks import as_training_data
from infl.objective import Objective, PerExampleFn
from infl.solvers.base import solver_from_spec, solver_spec

if TYPE_CHECKING:
    from infl.calculator import InfluenceCalculator


def save_calculator(calc: InfluenceCalculator, path: str | os.PathLike[str]) -> None:
    """Write ``calc``'s fitted solver (fitting it first) and its identity to ``path``."""
    fitted = calc.fitted_solver()
    info = json.loads(json.dumps(fitted.info, default=str))
    header = {
        "solver": solver_spec(calc.solver),
        "damping": fitted.damping,
        "curvature": calc.curvature,
        "curvature_dtype": _dtype_name(calc.curvature_dtype),
        "chunk_size": calc.chunk_size,
        "identity": _identity(calc.wrapper.model, calc.objective, calc.train),
        "info": info,
    }
    write_fitted_state(path, header, fitted.state())


def load_calculator(
    cls: type[InfluenceCalculator],
    path: str | os.PathLike[str],
    model: nn.Module,
    objective: Objective,
    train_data: Any,
    *,
    measurement: PerExampleFn | None,
    cache_bytes: int,
    progress: bool,
    check_minimum: bool,
) -> InfluenceCalculator:
    """A ``cls`` calculator whose solver is the fit saved at ``path`` (checked against
    ``model``, ``objective`` and ``train_data``; see ``InfluenceCalculator.load``)."""
    header, state = read_fitted_state(path)
    if not isinstance(objective, Objective):
        raise InputError(f"objective must be an infl.Objective, got {type(objective).__name__}")
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    saved = header.get("identity")
    now = _identity(model, objective, as_training_data(train_data, "training data"))
    check_same(path, saved if isinstance(saved, dict) else {}, now)
    solver = solver_from_spec(header.get("solver"))
    calc = cls(
        model,
        objective,
        train_data,
        solver,
        measurement=measurement,
        chunk_size=int(header.get("chunk_size", 256)),
        cache_bytes=cache_bytes,
        progress=progress,
        curvature=str(header.get("curvature", "hessian")),
        curvature_dtype=_dtype_from_name(header.get("curvature_dtype")),
        check_minimum=check_minimum,
    )
    restore_as: Any = solver
    if solver.damping == "auto":  # restore at the damping the saved fit resolved
        restore_as = dataclasses.replace(restore_as, damping=float(header["damping"]))
    calc._fitted = restore_as.restore(calc.operator, state)
    return calc


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    """``"float32"`` for ``torch.float32`` (``None`` stays ``None``), for the JSON header."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _dtype_from_name(name: Any) -> torch.dtype | None:
    """The dtype :func:`_dtype_name` wrote (``None`` for none, or a file from before it)."""
    if name is None:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise InputError(
            f"the saved curvature_dtype {name!r} is not a torch dtype: the file was written "
            "by another version of infl. Refit the solver and save it again."
        )
    return dtype


def _identity(model: nn.Module, objective: Objective, train: IndexedData) -> dict[str, Any]:
    """What a saved fit is only valid for: model parameters, objective, training data."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    model_fp = fingerprint({"trainable": trainable, "state": dict(model.state_dict())}, "model")
    return {
        "model parameters": model_fp.digest,
        "objective": fingerprint(objective, "objective").digest,
        "training data": f"{len(train)} examples, sha1 {_fingerprint(train)[:16]}",
    }


def _fingerprint(data: IndexedData) -> str:
    """A content hash of a test set (its tensors' bytes), to key the inverse-HVP cache."""
    digest = hashlib.sha1(usedforsecurity=False)
    for _, batch in data.chunks(4096):
        for leaf in tensor_leaves(batch):
            t = leaf.detach().cpu().contiguous()
            digest.update(str((t.dtype, tuple(t.shape))).encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
