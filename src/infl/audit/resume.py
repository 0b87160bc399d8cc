"""The audit's store: each evidence section is kept as it finishes, so a rerun resumes.

An audit with ``store=DIR`` (``infl audit --out OUT`` uses ``OUT/evidence``) writes each
finished piece of evidence to an :class:`infl.store.Store` in ``DIR``, atomically:

* ``stationarity``, ``curvature``, ``solver_agreement``, ``sensitivity``, ``retraining``:
  JSON records holding the section (its numbers and reading), the seconds it took and the
  exact (unrounded) values later sections build on;
* ``reference``: the reference scores and predicted removal effects (tensors), so that later
  sections need no new solve;
* ``retraining_progress`` and ``retrains/``: the finished retrains of an unfinished
  retraining check (:func:`infl.retrain_ground_truth`'s own store).

The store's settings (``config.json``) are everything that decides the results: content
digests of the model's parameters and buffers, the objective and both data sets, and the
audit's arguments (solvers, damping, curvature, test points, retraining counts, top-k,
budget, seed). A rerun with the same settings loads the finished sections instead of
recomputing them; one with other settings is refused with a
:class:`~infl.errors.StoreMismatchError` naming the first differing setting, unless
``fresh=True`` (``--fresh``) deletes the old evidence first. An interrupted run (Ctrl-C, a
kill) leaves only whole records behind: each is written to a temporary file and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from infl.data import as_indexed, tensor_leaves
from infl.errors import StoreMismatchError
from infl.fingerprint import fingerprint, refuse_unreliable
from infl.objective import Objective
from infl.solvers.base import Solver, solver_spec
from infl.store import SETTINGS_FILE, Store

__all__ = ["STORE_FORMAT", "EvidenceStore", "audit_settings", "open_evidence_store"]

STORE_FORMAT = 1
"""Version of the audit store's layout (a store of another version is refused)."""

_KIND = "infl-audit-evidence"


def _digest_tensors(tensors: list[torch.Tensor], h: Any) -> None:
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def data_digest(data: Any, name: str) -> str:
    """SHA-256 (24 hex digits) of every tensor of ``data``, in order, with its length."""
    indexed = as_indexed(data, name)
    h = hashlib.sha256(str(len(indexed)).encode())
    for _, batch in indexed.chunks(1024):
        _digest_tensors(tensor_leaves(batch), h)
    return h.hexdigest()[:24]


def model_digest(model: nn.Module) -> str:
    """SHA-256 (24 hex digits) of the model's state (names, dtypes, shapes, values) and of
    which parameters are trainable."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for key, value in model.state_dict().items():
        h.update(key.encode())
        _digest_tensors([value], h)
    h.update(",".join(n for n, p in model.named_parameters() if p.requires_grad).encode())
    return h.hexdigest()[:24]


def audit_settings(
    model: nn.Module,
    objective: Objective,
    train_data: Any,
    test_data: Any,
    arguments: dict[str, Any],
    solvers: dict[str, Solver] | None,
) -> dict[str, Any]:
    """The settings an audit store is keyed by (JSON values).

    Parameters
    ----------
    model, objective, train_data, test_data
        The audited setup, recorded as content digests.
    arguments
        The audit's other arguments (damping, curvature, test points, budget, ...): plain
        JSON values.
    solvers
        The compared solvers (``None``: the defaults, which follow from the rest), recorded by
        class and hyperparameters.
    """
    return {
        "kind": _KIND,
        "format": STORE_FORMAT,
        "model": model_digest(model),
        "objective": fingerprint(objective, "objective").key(),
        "train_data": data_digest(train_data, "training data"),
        "test_data": data_digest(test_data, "test data"),
        "solvers": None
        if solvers is None
        else {name: solver_spec(s) for name, s in sorted(solvers.items())},
        **arguments,
    }


def _is_audit_store(root: Path) -> bool:
    try:
        found = json.loads((root / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and found.get("kind") == _KIND


class EvidenceStore:
    """Load-or-compute of the audit's records, with the seconds each took.

    Parameters
    ----------
    store
        The underlying store, or ``None`` (nothing kept: every record is computed).

    Attributes
    ----------
    resumed : list of str
        Names of the records loaded instead of computed, in order.
    resumed_seconds : float
        The seconds those records took when they were computed.
    """

    def __init__(self, store: Store | None) -> None:
        self.store = store
        self.resumed: list[str] = []
        self.resumed_seconds = 0.0

    def record(self, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The JSON record ``name``: loaded if finished before, else ``compute()``-d and saved.

        ``compute`` returns a JSON-ready dict; the saved record adds ``"seconds"``, the time
        ``compute`` took, unless ``compute`` says itself (work done before it was called).
        """
        if self.store is not None:
            found = self.store.load_json(name)
            if found is not None:
                self.resumed.append(name)
                self.resumed_seconds += float(found.get("seconds", 0.0))
                return dict(found)
        start = time.perf_counter()
        # through JSON, so that a computed record and a resumed one are the same values
        value: dict[str, Any] = json.loads(json.dumps(compute()))
        value.setdefault("seconds", time.perf_counter() - start)
        if self.store is not None:
            self.store.save_json(name, value)
        return value

    def tensors(
        self, name: str, compute: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The tensor record ``name``: loaded if finished before, else computed and saved."""
        if self.store is not None:
            found = self.store.load_tensors(name)
            if found is not None:
                self.resumed.append(name)
                return found
        value = compute()
        if self.store is not None:
            self.store.save_tensors(name, {k: v.detach().cpu() for k, v in value.items()})
        return value

    def load(self, name: str) -> dict[str, Any] | None:
        """The JSON record ``name`` as stored, or ``None`` (not finished, or no store)."""
        if self.store is None:
            return None
        found = self.store.load_json(name)
        return None if found is None else dict(found)

    def has(self, name: str) -> bool:
        """Whether the JSON record ``name`` is finished."""
        return self.store is not None and (name, "json") in self.store

    def spent(self, name: str) -> float:
        """Seconds recorded in the JSON record ``name`` (0 if it does not exist)."""
        if self.store is None:
            return 0.0
        found = self.store.load_json(name)
        return 0.0 if found is None else float(found.get("seconds", 0.0))


def open_evidence_store(
    root: str | os.PathLike[str] | None,
    settings: dict[str, Any],
    *,
    fresh: bool = False,
    objective: Objective | None = None,
) -> EvidenceStore:
    """Open (or create) the audit store at ``root`` for ``settings``.

    Parameters
    ----------
    root
        The store directory; ``None``: an :class:`EvidenceStore` that keeps nothing.
    settings
        From :func:`audit_settings`.
    fresh
        Delete an existing audit store at ``root`` first (start over). A directory that is
        not an audit store is never deleted.
    objective
        Its loss is checked to be fingerprinted reliably before a store is resumed.

    Raises
    ------
    StoreMismatchError
        ``root`` holds evidence of other settings (the message names the first differing
        setting and says to pass ``fresh=True``/``--fresh`` or use another directory), or
        something that is not an audit store.
    """
    if root is None:
        return EvidenceStore(None)
    path = Path(root)
    exists = (path / SETTINGS_FILE).exists()
    if exists and not _is_audit_store(path):
        raise StoreMismatchError(
            f"{path} holds a {SETTINGS_FILE} that is not an infl audit's: choose another "
            "output directory"
        )
    if exists and fresh:
        shutil.rmtree(path)
    if objective is not None:
        refuse_unreliable(path, {"objective": fingerprint(objective, "objective")})
    try:
        store = Store(path, settings)
    except StoreMismatchError as err:
        raise StoreMismatchError(
            f"{err}. Or start over with --fresh (fresh=True), which deletes the evidence in {path}"
        ) from None
    return EvidenceStore(store)
