"""A ``[m, n]`` score matrix on disk, written tile by tile, resumable, refusing other settings.

``calc.influence(test, out="scores.npy")`` writes the influence scores to ``scores.npy``, a
plain NumPy ``.npy`` file that is memory-mapped (``numpy.load(path, mmap_mode="r")`` reads it;
only the tiles being written are in memory), and keeps its bookkeeping in the directory
``scores.npy.store/``:

* ``config.json`` — the settings that define the scores (fingerprints of the model's
  parameters, the objective, the training data, the test data and the measurement; the
  solver and its damping; the curvature; the shape, dtype and tile layout), compared on every
  reopen by :class:`infl.store.Store`: a store of other settings is refused with a
  :class:`~infl.StoreMismatchError` naming the first differing setting;
* ``progress.json`` — for each row block of test examples, how many leading column chunks of
  training examples are finished.

A tile is finished when its bytes are in the ``.npy`` file *and flushed to disk*
(``msync``); only then is ``progress.json`` rewritten, atomically (temporary file, ``fsync``,
rename). A run killed at any point — Ctrl-C, a crash, a full disk — leaves a store whose
progress record claims only flushed tiles; the next call with the same settings resumes at
the first unfinished tile and computes nothing twice. The ``.npy`` file is created full size
(``posix_fallocate`` where the platform has it), so a full disk is found when the store is
created, not as a ``SIGBUS`` half-way through a memory-mapped write.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from infl import persistence, streaming
from infl.data import as_indexed
from infl.errors import InflError, InputError, StoreMismatchError
from infl.export import MEANINGS, ScoreTable, _ids, save_scores
from infl.fingerprint import fingerprint, refuse_unreliable
from infl.solvers.base import solver_spec
from infl.store import Store, write_atomic

if TYPE_CHECKING:
    import pandas as pd

    from infl.calculator import InfluenceCalculator
    from infl.export import Ids

__all__ = [
    "PROGRESS",
    "STORE_FORMAT",
    "ScoreStore",
    "StoreWriteError",
    "create_npy",
    "influence_to_store",
]

STORE_FORMAT = "infl.score-store"
PROGRESS = "progress"
"""Name of the progress record (``progress.json``) in the store directory."""


class StoreWriteError(InflError, OSError):
    """A store's file could not be written (a full disk, a quota, a read-only directory).

    Everything finished before the failure stays on disk and is reused by the next call.
    """


def _write_failed(what: str, path: Path, err: OSError) -> StoreWriteError:
    reason = (
        "the disk is full (or a quota is reached)"
        if err.errno in (errno.ENOSPC, errno.EDQUOT)
        else f"{type(err).__name__}: {err}"
    )
    return StoreWriteError(
        f"could not write {what} to {os.fspath(path)}: {reason}. Every tile finished before "
        "this is kept on disk: free space (or point the store at another disk) and call "
        "again with the same settings to resume"
    )


def _numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    """The ``.npy`` dtype holding ``dtype`` (bfloat16 as its raw ``int16`` bits)."""
    if dtype == torch.bfloat16:
        return np.dtype(np.int16)
    return np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)


def create_npy(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Create the ``.npy`` file ``path`` of ``shape``/``dtype``, full size, atomically.

    Written under a temporary name, its blocks reserved (``posix_fallocate``), ``fsync``-ed
    and renamed into place, so ``path`` either does not exist or is a complete file.

    Raises
    ------
    StoreWriteError
        The file cannot be created or its space reserved (a full disk names the size).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=_numpy_dtype(dtype), shape=shape)
        del array
        with open(tmp, "r+b") as fh:
            size = os.fstat(fh.fileno()).st_size
            if hasattr(os, "posix_fallocate") and size > 0:
                os.posix_fallocate(fh.fileno(), 0, size)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _write_failed(f"a {list(shape)} {dtype} array", path, err) from err


class ScoreStore:
    """A ``[m, n]`` matrix of scores on disk: ``<path>`` (``.npy``) and ``<path>.store/``.

    Usually made by :meth:`InfluenceCalculator.influence(test, out=path)
    <infl.InfluenceCalculator.influence>` and read back with :meth:`ScoreStore.open`. The
    values keep the meaning and sign of their ``kind`` (:data:`infl.export.MEANINGS`; for
    ``"influence"``: negative = the training example is helpful to the test example).

    Parameters
    ----------
    path
        The ``.npy`` file (``.npy`` is appended when the name has another suffix).
    settings
        JSON-serialisable settings that define the values (compared on reopen).
    shape
        ``(m, n)``.
    block_rows, block_cols
        The tile layout: row blocks of ``block_rows`` test examples, column chunks of
        ``block_cols`` training examples (part of the settings).
    dtype
        The values' dtype.
    kind
        What the values are (``"influence"``, ...), stored for export.

    Raises
    ------
    StoreMismatchError
        ``path`` holds a store of other settings (the message names the first differing
        setting), or its files are damaged.
    StoreWriteError
        The files cannot be created (a full disk, a read-only directory).

    Examples
    --------
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from infl import ExactHessian, InfluenceCalculator, Objective, ScoreStore
    >>> X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    >>> calc = InfluenceCalculator(nn.Linear(3, 2), Objective("cross_entropy"), (X, y),
    ...     ExactHessian(damping=0.1), progress=False, check_minimum=False, chunk_size=8)
    >>> path = tempfile.mkdtemp() + "/scores.npy"
    >>> store = calc.influence((X[:5], y[:5]), out=path)
    >>> store.complete, ScoreStore.open(path).scores().shape
    (True, torch.Size([5, 20]))
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        settings: Mapping[str, Any],
        *,
        shape: tuple[int, int],
        block_rows: int,
        block_cols: int,
        dtype: torch.dtype,
        kind: str = "influence",
    ) -> None:
        self.path = _npy_path(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.block_rows, self.block_cols = int(block_rows), int(block_cols)
        self.dtype = dtype
        self.kind = kind
        full = {
            "format": STORE_FORMAT,
            "version": 1,
            "kind": kind,
            "shape": list(self.shape),
            "dtype": str(dtype),
            "block_rows": self.block_rows,
            "block_cols": self.block_cols,
            **dict(settings),
        }
        try:
            self.store = Store(_store_dir(self.path), full)
        except OSError as err:
            raise _write_failed("the store's settings", _store_dir(self.path), err) from err
        self.settings = self.store.settings
        self.row_blocks = -(-self.shape[0] // self.block_rows)
        self.col_chunks = -(-self.shape[1] // self.block_cols)
        self._done = self._read_progress()
        if not self.path.exists():
            if any(self._done):
                raise StoreMismatchError(
                    f"{_store_dir(self.path)} records finished tiles but their file "
                    f"{self.path} is missing; delete {_store_dir(self.path)} to start over"
                )
            create_npy(self.path, self.shape, dtype)
        self._array = self._open_array("r+")

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ScoreStore:
        """The store at ``path``, with the settings it was written with (to read it).

        Raises
        ------
        InputError
            No store at ``path``.
        StoreMismatchError
            Its settings record is damaged or of another format.
        """
        npy = _npy_path(path)
        config = _store_dir(npy) / "config.json"
        if not config.is_file():
            raise InputError(
                f"no score store at {os.fspath(npy)} (no {config}); write one with "
                "calc.influence(test, out=path)"
            )
        try:
            settings = json.loads(config.read_text(encoding="utf-8"))
            if settings.get("format") != STORE_FORMAT:
                raise ValueError(f"format {settings.get('format')!r}")
            dtype = getattr(torch, str(settings["dtype"]).removeprefix("torch."))
            shape = (int(settings["shape"][0]), int(settings["shape"][1]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise StoreMismatchError(
                f"{config} is not the settings record of an infl score store ({err}); "
                "write the scores again to a new path"
            ) from err
        rest = {
            k: v
            for k, v in settings.items()
            if k not in ("format", "version", "kind", "shape", "dtype", "block_rows", "block_cols")
        }
        return cls(
            npy,
            rest,
            shape=shape,
            block_rows=int(settings["block_rows"]),
            block_cols=int(settings["block_cols"]),
            dtype=dtype,
            kind=str(settings.get("kind", "influence")),
        )

    def _open_array(self, mode: Literal["r", "r+"]) -> np.memmap[Any, Any]:
        try:
            array = np.load(self.path, mmap_mode=mode)
        except (OSError, ValueError) as err:
            raise StoreMismatchError(
                f"cannot read {self.path} as the store's .npy file ({err}); delete it and "
                f"{_store_dir(self.path)} to start over"
            ) from err
        if tuple(array.shape) != self.shape or array.dtype != _numpy_dtype(self.dtype):
            raise StoreMismatchError(
                f"{self.path} holds a {list(array.shape)} {array.dtype} array where the store "
                f"records {list(self.shape)} {self.dtype}; delete it and "
                f"{_store_dir(self.path)} to start over"
            )
        if not isinstance(array, np.memmap):
            raise StoreMismatchError(f"{self.path} cannot be memory-mapped")
        return array

    def _read_progress(self) -> list[int]:
        record = self.store.load_json(PROGRESS)
        if record is None:
            return [0] * self.row_blocks
        done = record.get("done") if isinstance(record, dict) else None
        if (
            not isinstance(done, list)
            or len(done) != self.row_blocks
            or any(not isinstance(d, int) or not 0 <= d <= self.col_chunks for d in done)
        ):
            raise StoreMismatchError(
                f"the progress record of {_store_dir(self.path)} is damaged; delete the store "
                "to start over"
            )
        return list(done)

    # ------------------------------------------------------------------ progress
    def done(self, row_block: int) -> int:
        """How many leading column chunks of row block ``row_block`` are finished."""
        return self._done[row_block]

    @property
    def complete(self) -> bool:
        """Whether every tile is finished."""
        return all(d == self.col_chunks for d in self._done)

    @property
    def tiles_done(self) -> int:
        """Finished tiles, of ``row_blocks * col_chunks``."""
        return sum(self._done)

    def write(self, row_start: int, col_start: int, tile: torch.Tensor) -> None:
        """Write one tile and record it as finished (bytes flushed first, then the record).

        Tiles of a row block must come in column order (the next unfinished one).

        Raises
        ------
        InputError
            A tile that is not the next unfinished one of its row block, or of the wrong
            shape.
        StoreWriteError
            The disk refused the bytes or the progress record; the tiles finished before
            stay recorded.
        """
        r, c = row_start // self.block_rows, col_start // self.block_cols
        rows = min(self.block_rows, self.shape[0] - row_start)
        cols = min(self.block_cols, self.shape[1] - col_start)
        if (
            row_start % self.block_rows
            or col_start % self.block_cols
            or c != self._done[r]
            or tuple(tile.shape) != (rows, cols)
        ):
            raise InputError(
                f"tile at ({row_start}, {col_start}) of shape {tuple(tile.shape)} is not the next "
                f"unfinished tile of row block {r} (column chunk {self._done[r]}, shape "
                f"({rows}, {cols}))"
            )
        values = tile.detach().to("cpu", self.dtype)
        if self.dtype == torch.bfloat16:
            values = values.view(torch.int16)
        try:
            self._array[row_start : row_start + rows, col_start : col_start + cols] = values.numpy()
            self._array.flush()
        except OSError as err:
            raise _write_failed("a tile of scores", self.path, err) from err
        done = [*self._done]
        done[r] += 1
        self._save_progress(done)
        self._done = done

    def _save_progress(self, done: list[int]) -> None:
        target = self.store.path(PROGRESS, "json")
        try:
            write_atomic(target, json.dumps({"done": done}))
        except OSError as err:
            raise _write_failed("the progress record", target, err) from err

    # ------------------------------------------------------------------ reading
    def scores(self, *, partial: bool = False) -> torch.Tensor:
        """The ``[m, n]`` scores as a tensor (read into memory).

        Raises
        ------
        InputError
            Unfinished tiles remain (``partial=True`` returns them as they are on disk: zeros
            where nothing was written).
        """
        if not partial and not self.complete:
            raise InputError(
                f"the score store {self.path} is not complete ({self.tiles_done} of "
                f"{self.row_blocks * self.col_chunks} tiles): call calc.influence(test, "
                "out=path) again with the same settings to finish it, or pass partial=True"
            )
        values = torch.from_numpy(np.array(self._array))
        if self.dtype == torch.bfloat16:
            values = values.view(torch.bfloat16)
        return values

    def mmap(self) -> np.memmap[Any, Any]:
        """The ``[m, n]`` memory-mapped array, read-only (nothing is read until indexed)."""
        return self._open_array("r")

    def table(self, test_ids: Ids = None, train_ids: Ids = None) -> ScoreTable:
        """The scores as an :class:`infl.export.ScoreTable` (what :func:`infl.export.load_scores`
        returns), with metadata saying what they mean and the settings they were made with."""
        m, n = self.shape
        metadata = {
            "value_name": self.kind,
            "meaning": MEANINGS.get(self.kind, "not stated"),
            "settings": self.settings,
        }
        return ScoreTable(
            self.scores(), _ids(test_ids, m, "test_ids"), _ids(train_ids, n, "train_ids"), metadata
        )

    def to_frame(
        self, test_ids: Ids = None, train_ids: Ids = None, *, long: bool = True
    ) -> pd.DataFrame:
        """:meth:`table` as a pandas ``DataFrame`` (see :func:`infl.export.scores_to_frame`)."""
        return self.table(test_ids, train_ids).to_frame(long=long)

    def save(
        self, path: str | os.PathLike[str], test_ids: Ids = None, train_ids: Ids = None
    ) -> None:
        """Export to ``.csv`` or ``.npz`` with :func:`infl.export.save_scores`."""
        table = self.table(test_ids, train_ids)
        save_scores(
            path,
            table.scores,
            table.test_ids,
            table.train_ids,
            value_name=self.kind,
            metadata={"settings": self.settings},
        )


def _npy_path(path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    return target if target.suffix == ".npy" else target.with_name(target.name + ".npy")


def _store_dir(npy: Path) -> Path:
    return npy.with_name(npy.name + ".store")


def influence_to_store(
    calc: InfluenceCalculator, test_data: Any, path: str | os.PathLike[str]
) -> ScoreStore:
    """The body of ``calc.influence(test, out=path)``: every unfinished tile of the ``[m, n]``
    influence scores written to the store at ``path`` (created, or resumed when it holds the
    same settings), then the store.

    Settings: fingerprints of the model's parameters and buffers, the objective, the training
    data and the test data (one pass over each to hash them), the measurement's content
    fingerprint, the solver and its hyperparameters (``damping`` included), the curvature,
    the dtype and the tile layout (``chunk_size`` columns; rows from ``memory_budget``, see
    :func:`infl.streaming.row_block_size`).

    Raises
    ------
    StoreMismatchError
        The store holds other settings, or the measurement cannot be fingerprinted and the
        store already exists (it could not be told apart from another measurement).
    StoreWriteError
        A write failed (a full disk); the finished tiles are kept.
    """
    test = as_indexed(test_data, "test data")
    m, n = len(test), calc.num_train
    npy = _npy_path(path)
    measurement = fingerprint(calc.measurement, "measurement")
    refuse_unreliable(_store_dir(npy), {"measurement": measurement})
    settings = {
        **persistence._identity(calc.wrapper.model, calc.objective, calc.train),
        "test data": f"{m} examples, sha1 {persistence._fingerprint(test)[:16]}",
        "measurement": measurement.digest,
        "solver": solver_spec(calc.solver),
        "curvature": calc.curvature,
    }
    if calc.curvature_dtype is not None:  # products in another dtype (stores before: none)
        settings["curvature dtype"] = str(calc.curvature_dtype)
    store = ScoreStore(
        npy,
        settings,
        shape=(m, n),
        block_rows=streaming.row_block_size(calc, m),
        block_cols=calc.chunk_size,
        dtype=calc.wrapper.dtype,
    )
    tiles = streaming.score_tiles(
        calc, test, block_rows=store.block_rows, done=store.done, desc="scoring to store"
    )
    for row_start, col_start, tile in tiles:
        store.write(row_start, col_start, tile)
    return store
