"""What defines a retraining result: the settings a retraining store is keyed by.

A store (:class:`infl.store.Store`) of retrains is valid only for the protocol, objective,
measurement, model and data that produced it. :func:`store_settings` records all of them,
the model and the data as SHA-256 fingerprints of their bytes, so that reopening a store with
anything different is refused (naming the key) instead of silently mixing results.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from infl.data import IndexedData, tensor_leaves
from infl.retrain.single import EVAL_CHUNK, RetrainJob

__all__ = ["STORE_FORMAT", "removal_key", "store_settings"]

STORE_FORMAT = 1
"""Version of the on-disk layout of a retraining store."""


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


def _describe(fn: Any) -> str:
    """A stable description of a callable for the store config."""
    if dataclasses.is_dataclass(fn):
        return repr(fn)
    module = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qual}"


def store_settings(job: RetrainJob) -> dict[str, Any]:
    """The settings record of a store of ``job``'s retrains (JSON-serialisable)."""
    cfg = dataclasses.asdict(job.config)
    return {
        "format": STORE_FORMAT,
        **cfg,
        "weight_decay": job.objective.weight_decay,
        "loss": _describe(job.objective.per_example_loss),
        "measurement": _describe(job.measurement),
        "model": _fingerprint_model(job.model),
        "dtype": str(job.dtype),
        "train_data": _fingerprint_data(job.train),
        "test_data": _fingerprint_data(job.test),
    }
