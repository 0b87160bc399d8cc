"""What defines a retraining result: the settings a retraining store is keyed by.

A store (:class:`infl.store.Store`) of retrains is valid only for the protocol, objective,
measurement, model and data that produced it. :func:`store_settings` records all of them,
the model and the data as SHA-256 fingerprints of their bytes and the loss and measurement as
content fingerprints (:func:`infl.fingerprint.fingerprint`: a ``functools.partial``'s bound
arguments, a closure's values, a function's code all count), so that reopening a store with
anything different is refused (naming the key) instead of silently mixing results.
:func:`open_store` opens the store and refuses to resume when the loss or the measurement
cannot be fingerprinted reliably, or when the store was written in an older format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from infl.data import IndexedData, tensor_leaves
from infl.errors import StoreMismatchError
from infl.fingerprint import Fingerprint, fingerprint, refuse_unreliable
from infl.retrain.single import EVAL_CHUNK, RetrainJob
from infl.store import SETTINGS_FILE, Store

__all__ = ["STORE_FORMAT", "open_store", "removal_key", "store_settings"]

STORE_FORMAT = 2
"""Version of the on-disk layout of a retraining store.

1: loss and measurement named by qualified name only; 2: by content fingerprint, and each
record says why its retrain stopped (``stop``).
"""


def removal_key(removal: tuple[int, ...]) -> str:
    """The record name of ``removal`` in a store: ``retrain-<24 hex digits of SHA-256>``."""
    digest = hashlib.sha256(",".join(map(str, removal)).encode()).hexdigest()[:24]
    return f"retrain-{digest}"


def _hash_tensors(tensors: Iterable[torch.Tensor], h: Any) -> None:
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _fingerprint_data(data: IndexedData) -> str:
    h = hashlib.sha256()
    h.update(str(len(data)).encode())
    for _, batch in data.chunks(EVAL_CHUNK):
        _hash_tensors(tensor_leaves(batch), h)
    return h.hexdigest()[:24]


def _fingerprint_model(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _hash_tensors([t], h)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    h.update(",".join(trainable).encode())
    return h.hexdigest()[:24]


def _callables(job: RetrainJob) -> dict[str, Fingerprint]:
    return {
        "loss": fingerprint(job.objective.per_example_loss, "loss"),
        "measurement": fingerprint(job.measurement, "measurement"),
    }


def store_settings(job: RetrainJob) -> dict[str, Any]:
    """The settings record of a store of ``job``'s retrains (JSON-serialisable)."""
    cfg = dataclasses.asdict(job.config)
    # leave-one-out stores keep the keys they had before PBRF existed (they still resume); a
    # PBRF store records its target as one key, so a store of the other target names "target"
    target, proximity = cfg.pop("target"), cfg.pop("proximity")
    if target != "loo":
        cfg["target"] = {"name": target, "proximity": proximity}
    return {
        "format": STORE_FORMAT,
        **cfg,
        "weight_decay": job.objective.decay_settings(),
        **{name: fp.key() for name, fp in _callables(job).items()},
        "model": _fingerprint_model(job.model),
        "dtype": str(job.dtype),
        "train_data": _fingerprint_data(job.train),
        "test_data": _fingerprint_data(job.test),
    }


def open_store(root: str | os.PathLike[str], job: RetrainJob) -> Store:
    """The store of ``job``'s retrains at ``root`` (created when new).

    Parameters
    ----------
    root
        The store directory.
    job
        The retraining job whose settings (:func:`store_settings`) key the store.

    Raises
    ------
    StoreMismatchError
        ``root`` was written in another store format (an older infl); or it holds results and
        the loss or the measurement cannot be fingerprinted reliably (the message says which
        part and why); or it holds results of other settings (the first differing key).
    """
    path = Path(root) / SETTINGS_FILE
    if path.exists():
        try:
            found = json.loads(path.read_text(encoding="utf-8")).get("format")
        except (OSError, ValueError, AttributeError):
            found = None  # unreadable: Store explains
        if found is not None and found != STORE_FORMAT:
            raise StoreMismatchError(
                f"{os.fspath(root)} is a retraining store of format {found!r}; this infl writes "
                f"format {STORE_FORMAT} (loss and measurement fingerprinted by content, not by "
                "name), so its retrains cannot be matched to the current settings safely. Use a "
                "new store directory (or delete this one) to retrain"
            )
        refuse_unreliable(root, _callables(job))
    return Store(root, store_settings(job))
