"""A results directory that survives interruption and refuses to mix settings.

A :class:`Store` is a directory holding

* ``config.json``, the *settings* that define every result in it (written when the store is
  created, compared on every reopen), and
* named *records*, each one file, written atomically as soon as it is finished: JSON
  (``<name>.json``), a dict of tensors (``<name>.pt``, read back with ``weights_only=True``)
  or a dict of arrays (``<name>.npz``).

A later run with the same settings loads the finished records instead of recomputing them, so
a killed run loses only the work in flight. A run with different settings is refused with a
:class:`~infl.StoreMismatchError` that names the first differing key.

:func:`write_atomic` is the one way files are written: a temporary file in the same directory,
flushed and ``fsync``-ed, then :func:`os.replace` onto the target, so a reader sees either the
old file or the new one, never half of one. Files get the user's normal permissions
(``0o666`` less the umask), not the ``0o600`` of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch

from infl.errors import InputError, StoreMismatchError

__all__ = ["SETTINGS_FILE", "Store", "write_atomic"]

SETTINGS_FILE = "config.json"
"""Name of the settings record at the root of every store."""

Kind = Literal["json", "pt", "npz"]
_SUFFIX: dict[str, str] = {"json": ".json", "pt": ".pt", "npz": ".npz"}
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask (reading it means setting it; the lock keeps threads consistent)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def write_atomic(
    path: str | os.PathLike[str], content: str | bytes | Callable[[IO[bytes]], None]
) -> None:
    """Write ``content`` to ``path`` atomically (never half-written, even if killed).

    Parameters
    ----------
    path
        The target file; its directory is created if missing.
    content
        Text (written as UTF-8), bytes, or a callable ``write(fh)`` that writes to a binary
        file handle (e.g. ``lambda fh: torch.save(obj, fh)``).

    Notes
    -----
    The file is created with mode ``0o666 & ~umask`` (``0o644`` under the usual umask), like a
    file written with :func:`open`.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(content, str):
                fh.write(content.encode("utf-8"))
            elif isinstance(content, bytes):
                fh.write(content)
            else:
                content(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _canonical(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as they read back from JSON (tuples become lists, keys strings)."""
    try:
        result: dict[str, Any] = json.loads(json.dumps(dict(settings)))
    except TypeError as err:
        raise InputError(f"store settings must be JSON-serialisable: {err}") from err
    return result


class Store:
    """A directory of named records, all produced under one set of settings.

    Parameters
    ----------
    root
        The directory (created, with its parents, if missing).
    settings
        JSON-serialisable settings that define the results (protocol, data fingerprints,
        a preset's hyperparameters, ...). Written to ``<root>/config.json`` when the store is
        new; compared key by key when it exists.
    records
        Subdirectory of ``root`` that holds the records (``"."``: ``root`` itself).

    Raises
    ------
    StoreMismatchError
        ``root`` holds results written with different settings (the message names the first
        differing key, with both values), or its settings record cannot be read.

    Examples
    --------
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> store = Store(root, {"lr": 0.1})
    >>> store.save_json("cell-0", {"accuracy": 0.9})
    >>> Store(root, {"lr": 0.1}).load_json("cell-0")
    {'accuracy': 0.9}
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        settings: Mapping[str, Any],
        *,
        records: str = ".",
    ) -> None:
        self.root = Path(root)
        self.records_dir = self.root / records
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self.settings = _canonical(settings)
        path = self.root / SETTINGS_FILE
        if not path.exists():
            write_atomic(path, json.dumps(self.settings, indent=2, sort_keys=True))
            return
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(found, dict):
                raise ValueError(f"expected a JSON object, found {type(found).__name__}")
        except (OSError, ValueError) as err:
            raise StoreMismatchError(
                f"cannot read the store's settings {path} ({err}); use a new store path"
            ) from err
        differing = sorted(
            key
            for key in set(found) | set(self.settings)
            if found.get(key, "<missing>") != self.settings.get(key, "<missing>")
        )
        if differing:
            key = differing[0]
            old, new = found.get(key, "<missing>"), self.settings.get(key, "<missing>")
            more = f" (and {len(differing) - 1} more settings)" if len(differing) > 1 else ""
            raise StoreMismatchError(
                f"{self.root} holds results of different settings: {key!r} was {old!r} there "
                f"and is {new!r} now{more}. Use a new store path for the new settings, or "
                f"repeat the stored ones ({key}={old!r}) to resume"
            )

    # -- paths -----------------------------------------------------------------------------
    def path(self, name: str, kind: Kind) -> Path:
        """The file of record ``name`` of ``kind`` (``"json"``, ``"pt"`` or ``"npz"``)."""
        if kind not in _SUFFIX:
            raise InputError(f"kind must be one of {sorted(_SUFFIX)}, got {kind!r}")
        if not name or "/" in name or os.sep in name or name.startswith("."):
            raise InputError(f"a record name must be a plain file name, got {name!r}")
        return self.records_dir / f"{name}{_SUFFIX[kind]}"

    def names(self, kind: Kind) -> list[str]:
        """Names of the finished records of ``kind``, sorted."""
        suffix = _SUFFIX[kind]
        return sorted(
            p.name[: -len(suffix)]
            for p in self.records_dir.glob(f"*{suffix}")
            if not p.name.startswith(".")
        )

    def __contains__(self, item: tuple[str, Kind]) -> bool:
        name, kind = item
        return self.path(name, kind).exists()

    # -- JSON ------------------------------------------------------------------------------
    def load_json(self, name: str) -> Any:
        """The JSON record ``name``, or ``None`` if it has not been written."""
        path = self.path(name, "json")
        if not path.exists():
            return None
        return json.loads(path.read_text(encoding="utf-8"))

    def save_json(self, name: str, value: Any, *, indent: int | None = 1) -> None:
        """Write ``value`` (JSON-serialisable) as record ``name``, atomically."""
        write_atomic(self.path(name, "json"), json.dumps(value, indent=indent, sort_keys=True))

    # -- tensors ---------------------------------------------------------------------------
    def load_tensors(self, name: str) -> dict[str, Any] | None:
        """The tensor record ``name`` (tensors and plain Python values), or ``None``."""
        path = self.path(name, "pt")
        if not path.exists():
            return None
        record: dict[str, Any] = torch.load(path, weights_only=True)
        return record

    def save_tensors(self, name: str, record: Mapping[str, Any]) -> None:
        """Write a dict of tensors and plain values as record ``name``, atomically."""
        value = dict(record)
        write_atomic(self.path(name, "pt"), lambda fh: torch.save(value, fh))

    # -- arrays ----------------------------------------------------------------------------
    def load_arrays(self, name: str) -> dict[str, np.ndarray] | None:
        """The array record ``name`` as a dict of NumPy arrays, or ``None``."""
        path = self.path(name, "npz")
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def save_arrays(self, name: str, arrays: Mapping[str, Any]) -> None:
        """Write a dict of arrays (NumPy arrays or CPU tensors) as record ``name``."""
        plain: dict[str, Any] = {
            key: (value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value)
            for key, value in arrays.items()
        }
        buffer = io.BytesIO()
        np.savez(buffer, **plain)
        write_atomic(self.path(name, "npz"), buffer.getvalue())
