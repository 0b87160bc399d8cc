"""A results directory that survives interruption: one JSON file per finished cell.

A study is a list of independent *cells* (one configuration and seed each). Every finished
cell is written atomically to ``<root>/cells/<cell_id>.json`` as soon as it ends; a rerun
with the same root loads finished cells instead of recomputing them. ``<root>/config.json``
records the settings that define the results; a root written with different settings is
refused, naming the setting that differs.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from infl.errors import StoreMismatchError


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CellStore:
    """Finished cells of one study configuration, keyed by cell id.

    Parameters
    ----------
    root
        The results directory (created if missing).
    config
        JSON-serialisable settings that define the results (a preset's hyperparameters).

    Raises
    ------
    StoreMismatchError
        If ``root`` already holds results written with a different ``config``.
    """

    def __init__(self, root: str | os.PathLike[str], config: Mapping[str, Any]) -> None:
        self.root = Path(root)
        self.cells_dir = self.root / "cells"
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.root / "config.json"
        wanted = json.loads(json.dumps(dict(config)))
        if config_path.exists():
            found = json.loads(config_path.read_text(encoding="utf-8"))
            differing = sorted(
                key for key in set(found) | set(wanted) if found.get(key) != wanted.get(key)
            )
            if differing:
                key = differing[0]
                raise StoreMismatchError(
                    f"{self.root} holds results of a different configuration: {key!r} was "
                    f"{found.get(key)!r} there and is {wanted.get(key)!r} now"
                    + (f" (and {len(differing) - 1} more settings)" if len(differing) > 1 else "")
                    + ". Use another output directory, or the settings that wrote it."
                )
        else:
            write_atomic(config_path, json.dumps(wanted, indent=2, sort_keys=True))

    def _path(self, cell_id: str) -> Path:
        return self.cells_dir / f"{cell_id}.json"

    def load(self, cell_id: str) -> dict[str, Any] | None:
        """The stored result of ``cell_id``, or ``None`` if it has not finished."""
        path = self._path(cell_id)
        if not path.exists():
            return None
        result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return result

    def save(self, cell_id: str, row: Mapping[str, Any]) -> None:
        """Store a finished cell atomically."""
        write_atomic(self._path(cell_id), json.dumps(dict(row), indent=1, sort_keys=True))
