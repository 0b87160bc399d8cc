"""Scores and fitted solvers that can leave the process: tables, files, saved fits.

Scores (``[m, n]``, test-major, as :class:`~infl.InfluenceCalculator` returns them):

* :func:`scores_to_frame` — a pandas ``DataFrame``, long (one row per test/train pair) or
  wide (test ids as index, train ids as columns). pandas is optional:
  ``pip install infl[export]``.
* :func:`save_scores` / :func:`load_scores` — ``.csv`` (long form, columns ``test_id``,
  ``train_id``, ``value``; no pandas needed) or ``.npz`` (the matrix, both id lists and a
  metadata record saying what the values mean and which sign is helpful). Files are written
  atomically with the user's normal permissions (``0o666`` less the umask).

Fitted solvers: :func:`write_fitted_state` / :func:`read_fitted_state` hold the file format
behind :meth:`InfluenceCalculator.save` / :meth:`InfluenceCalculator.load` — one
``torch.save`` file of plain dicts (tensors on the CPU) with a JSON header, read back with
``torch.load(weights_only=True)`` (no pickled code runs on load).

Ids name the rows (test examples) and columns (training examples): by default ``0..m-1`` and
``0..n-1``; otherwise any sequence of ints or of strings (one kind per axis), unique, of the
matching length.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from infl.errors import InputError, StoreMismatchError
from infl.store import write_atomic

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "MEANINGS",
    "ScoreTable",
    "check_same",
    "load_scores",
    "read_fitted_state",
    "save_scores",
    "scores_to_frame",
    "write_fitted_state",
]

Ids = Sequence[int] | Sequence[str] | np.ndarray | torch.Tensor | None

SCORES_FORMAT = "infl.scores"
FITTED_FORMAT = "infl.fitted-solver"
FORMAT_VERSION = 1

MEANINGS: dict[str, str] = {
    "influence": (
        "influence[j, i] = -grad f(test_j)^T (H + damping*I)^-1 g_i (Koh & Liang's I_up,loss); "
        "with the loss measurement, negative = training example i is helpful to test example j "
        "(up-weighting it lowers the test loss), positive = harmful"
    ),
    "removal_effect": (
        "removal_effect[j, i] = -influence[j, i] / n, the predicted change of f(test_j) when "
        "training example i is removed and the model retrained; with the loss measurement, "
        "positive = removing i raises the test loss (i is helpful), negative = i is harmful"
    ),
    "self_influence": (
        "self_influence[i] = -grad f(z_i)^T (H + damping*I)^-1 g_i (I_up,loss of z_i on itself); "
        "negative for a positive definite curvature with the loss measurement (exactly "
        "-g_i^T A^-1 g_i without weight decay); more negative = more unusual"
    ),
    "self_influence_score": (
        "self_influence_score[i] = grad f(z_i)^T (H + damping*I)^-1 g_i = -self_influence; "
        "positive for a positive definite curvature with the loss measurement (exactly "
        "g_i^T A^-1 g_i without weight decay); higher = more unusual / more likely mislabelled"
    ),
}
"""What each named kind of score means, with its sign convention (stored in ``.npz`` files)."""


# ---------------------------------------------------------------------------------- checks
def _matrix(scores: Any) -> np.ndarray:
    """``scores`` as a 2-D real NumPy array (a tensor is copied to the CPU)."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    array = np.asarray(scores)
    if array.ndim != 2:
        raise InputError(
            f"scores must be a [m, n] matrix (test-major), got shape {array.shape}; for a "
            "vector such as self_influence() pass scores[None] (one row)"
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"scores must be real numbers, got dtype {array.dtype}")
    return array


def _ids(ids: Ids, size: int, axis: str) -> list[int] | list[str]:
    """Validated ids of one axis: ``0..size-1`` by default, else ints or strings, unique."""
    if ids is None:
        return list(range(size))
    if isinstance(ids, (str, bytes)):
        raise InputError(f"{axis} must be a sequence of ids, got the single string {ids!r}")
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    values = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
    if len(values) != size:
        raise InputError(
            f"{axis} has {len(values)} ids but the scores have {size} "
            f"{'rows (test examples)' if axis == 'test_ids' else 'columns (training examples)'}; "
            f"pass exactly {size} ids (or None for 0..{size - 1})"
        )
    out: list[Any] = []
    for value in values:
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise InputError(
                f"{axis} must hold ints or strings, found {value!r} "
                f"({type(value).__name__}); convert the ids with str() or int()"
            )
        out.append(value)
    kinds = {type(v) for v in out}
    if len(kinds) > 1:
        raise InputError(
            f"{axis} mixes ints and strings (e.g. {out[0]!r} and "
            f"{next(v for v in out if type(v) is not type(out[0]))!r}); use one kind per axis"
        )
    seen: set[Any] = set()
    for value in out:
        if value in seen:
            raise InputError(f"{axis} must be unique, but {value!r} occurs more than once")
        seen.add(value)
    return out


def _pandas() -> Any:
    try:
        import pandas
    except ImportError as err:
        raise InputError(
            "scores_to_frame needs pandas, which is not installed: pip install infl[export] "
            "(or pip install pandas). save_scores writes .csv and .npz without it."
        ) from err
    return pandas


# ---------------------------------------------------------------------------------- frames
def scores_to_frame(
    scores: torch.Tensor | np.ndarray,
    test_ids: Ids = None,
    train_ids: Ids = None,
    *,
    value_name: str = "influence",
    long: bool = True,
) -> pd.DataFrame:
    """A ``[m, n]`` score matrix as a pandas ``DataFrame``.

    Parameters
    ----------
    scores
        ``[m, n]``, row ``j`` a test example, column ``i`` a training example (as
        :meth:`InfluenceCalculator.influence` returns them). Which sign is helpful depends on
        the kind of score: see :data:`MEANINGS`.
    test_ids, train_ids
        ``m`` and ``n`` ids (ints or strings, unique); default ``0..m-1`` and ``0..n-1``.
    value_name
        Name of the value column (long form).
    long
        ``True`` (default): ``m * n`` rows with columns ``test_id``, ``train_id`` and
        ``value_name``, test-major (all training examples of test 0 first). ``False``: the
        ``[m, n]`` matrix with the test ids as index and the train ids as columns.

    Raises
    ------
    InputError
        pandas is not installed (``pip install infl[export]``); ``scores`` is not 2-D; ids of
        the wrong length, type, or repeated.

    Examples
    --------
    >>> import torch
    >>> frame = scores_to_frame(torch.tensor([[0.5, -1.0]]), ["t"], ["a", "b"])
    >>> frame.columns.tolist(), frame["influence"].tolist()
    (['test_id', 'train_id', 'influence'], [0.5, -1.0])
    """
    pandas = _pandas()
    matrix = _matrix(scores)
    m, n = matrix.shape
    tests, trains = _ids(test_ids, m, "test_ids"), _ids(train_ids, n, "train_ids")
    if not isinstance(value_name, str) or value_name in ("test_id", "train_id", ""):
        raise InputError(
            f"value_name must be a non-empty string other than 'test_id'/'train_id', got "
            f"{value_name!r}"
        )
    if not long:
        return pandas.DataFrame(
            matrix,
            index=pandas.Index(tests, name="test_id"),
            columns=pandas.Index(trains, name="train_id"),
        )
    return pandas.DataFrame(
        {
            "test_id": np.repeat(np.asarray(tests, dtype=object), n),
            "train_id": np.tile(np.asarray(trains, dtype=object), m),
            value_name: matrix.reshape(-1),
        }
    ).astype({"test_id": _id_dtype(tests), "train_id": _id_dtype(trains)})


def _id_dtype(ids: list[int] | list[str]) -> Any:
    return "int64" if ids and isinstance(ids[0], int) else object


# ---------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class ScoreTable:
    """Scores read back by :func:`load_scores`.

    Attributes
    ----------
    scores
        ``[m, n]`` tensor (``.npz``: the dtype saved; ``.csv``: float64).
    test_ids, train_ids
        The ids of the rows and columns.
    metadata
        What the values mean, their sign convention and the solver's facts (``.npz``; empty
        for ``.csv``).
    """

    scores: torch.Tensor
    test_ids: list[int] | list[str]
    train_ids: list[int] | list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_frame(self, *, long: bool = True) -> pd.DataFrame:
        """:func:`scores_to_frame` of these scores (value column named after their kind)."""
        name = str(self.metadata.get("value_name", "value"))
        return scores_to_frame(
            self.scores, self.test_ids, self.train_ids, value_name=name, long=long
        )


def _suffix(path: str | os.PathLike[str]) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in (".csv", ".npz"):
        raise InputError(
            f"cannot tell the format of {os.fspath(path)!r}: use a .csv (long form: test_id, "
            "train_id, value) or .npz (matrix, ids and metadata) file name"
        )
    return suffix


def save_scores(
    path: str | os.PathLike[str],
    scores: torch.Tensor | np.ndarray,
    test_ids: Ids = None,
    train_ids: Ids = None,
    *,
    value_name: str = "influence",
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write a ``[m, n]`` score matrix to ``.csv`` or ``.npz``, atomically.

    Parameters
    ----------
    path
        ``*.csv``: long form, a header ``test_id,train_id,value`` then ``m * n`` rows,
        test-major, values written with full precision (``repr``, so float64 reads back
        exactly); no metadata. ``*.npz``: arrays ``scores`` (the dtype given), ``test_ids``,
        ``train_ids`` and ``metadata`` (a JSON string: the format, ``value_name``, what the
        values mean and which sign is helpful, and anything in ``metadata``).
    scores
        ``[m, n]``, test-major. Which sign is helpful depends on the kind: :data:`MEANINGS`.
    test_ids, train_ids
        Ids of rows and columns (ints or strings, unique); default ``0..m-1`` / ``0..n-1``.
    value_name
        The kind of score (``"influence"``, ``"removal_effect"``, ``"self_influence"``,
        ``"self_influence_score"`` get their meaning from :data:`MEANINGS`; any other name is
        stored as given).
    metadata
        JSON-serialisable facts to keep with ``.npz`` scores, e.g. ``fitted.info`` (solver,
        damping, ...).

    Raises
    ------
    InputError
        Unknown suffix, non-2-D scores, bad ids, or metadata that is not JSON-serialisable.

    Notes
    -----
    The file appears complete or not at all (a temporary file renamed into place), with mode
    ``0o666`` less the umask. CSV ids are read back as ints when every id of an axis is a
    plain integer, so the string ids ``"7"`` return as the int ``7``: use ``.npz`` to keep id
    types exactly.
    """
    suffix = _suffix(path)
    matrix = _matrix(scores)
    m, n = matrix.shape
    tests, trains = _ids(test_ids, m, "test_ids"), _ids(train_ids, n, "train_ids")
    if suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["test_id", "train_id", "value"])
        for j, test in enumerate(tests):
            writer.writerows(
                (test, train, repr(value))
                for train, value in zip(trains, matrix[j].tolist(), strict=True)
            )
        write_atomic(path, buffer.getvalue())
        return
    record = {
        "format": SCORES_FORMAT,
        "version": FORMAT_VERSION,
        "value_name": value_name,
        "meaning": MEANINGS.get(value_name, "not stated (pass metadata= to say)"),
        "shape": [m, n],
        **dict(metadata or {}),
    }
    try:
        text = json.dumps(record, sort_keys=True)
    except TypeError as err:
        raise InputError(f"metadata must be JSON-serialisable: {err}") from err
    data = io.BytesIO()
    np.savez(
        data,
        scores=matrix,
        test_ids=np.asarray(tests),
        train_ids=np.asarray(trains),
        metadata=np.asarray(text),
    )
    write_atomic(path, data.getvalue())


def _parse_ids(raw: list[str]) -> list[int] | list[str]:
    """Ints when every id is a canonical integer literal, else the strings."""
    try:
        ints = [int(v) for v in raw]
    except ValueError:
        return raw
    if all(str(i) == v for i, v in zip(ints, raw, strict=True)):
        return ints
    return raw


def load_scores(path: str | os.PathLike[str]) -> ScoreTable:
    """Read scores written by :func:`save_scores` (``.csv`` or ``.npz``).

    Returns
    -------
    ScoreTable
        ``scores`` ``[m, n]``, ``test_ids``, ``train_ids`` and (``.npz``) ``metadata``.

    Raises
    ------
    InputError
        A missing file, an unknown suffix, or a file not in the format :func:`save_scores`
        writes (the message says what was found).
    """
    suffix = _suffix(path)
    if not Path(path).is_file():
        raise InputError(f"no scores file at {os.fspath(path)!r}")
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read {os.fspath(path)!r} as an .npz file: {err}") from err
        missing = {"scores", "test_ids", "train_ids", "metadata"} - set(arrays)
        if missing:
            raise InputError(
                f"{os.fspath(path)!r} is not a scores file written by infl.save_scores: it "
                f"lacks {sorted(missing)}"
            )
        matrix = _matrix(arrays["scores"])
        tests = _ids(arrays["test_ids"], matrix.shape[0], "test_ids")
        trains = _ids(arrays["train_ids"], matrix.shape[1], "train_ids")
        metadata = json.loads(str(arrays["metadata"]))
        return ScoreTable(torch.from_numpy(matrix.copy()), tests, trains, metadata)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows or rows[0] != ["test_id", "train_id", "value"]:
        raise InputError(
            f"{os.fspath(path)!r} is not a long-form scores CSV: expected the header "
            f"test_id,train_id,value, found {','.join(rows[0]) if rows else 'an empty file'}"
        )
    body = rows[1:]
    if any(len(row) != 3 for row in body):
        bad = next(i for i, row in enumerate(body) if len(row) != 3)
        raise InputError(f"{os.fspath(path)!r}: line {bad + 2} has {len(body[bad])} fields, not 3")
    test_pos: dict[str, int] = {}
    train_pos: dict[str, int] = {}
    for row in body:
        test_pos.setdefault(row[0], len(test_pos))
        train_pos.setdefault(row[1], len(train_pos))
    m, n = len(test_pos), len(train_pos)
    if len(body) != m * n:
        raise InputError(
            f"{os.fspath(path)!r} has {len(body)} rows for {m} test and {n} train ids; a full "
            f"matrix needs {m * n} (one row per pair)"
        )
    matrix = np.full((m, n), np.nan)
    filled = np.zeros((m, n), dtype=bool)
    for line, (test, train, value) in enumerate(body, start=2):
        j, i = test_pos[test], train_pos[train]
        if filled[j, i]:
            raise InputError(
                f"{os.fspath(path)!r}: the pair ({test}, {train}) repeats at line {line}"
            )
        try:
            matrix[j, i] = float(value)
        except ValueError as err:
            raise InputError(f"{os.fspath(path)!r}: line {line} has value {value!r}") from err
        filled[j, i] = True
    return ScoreTable(
        torch.from_numpy(matrix), _parse_ids(list(test_pos)), _parse_ids(list(train_pos))
    )


# ---------------------------------------------------------------------------------- fitted
def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()  # clone: a view would save its whole storage
    if isinstance(value, dict):
        return {str(k): _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_cpu(v) for v in value]
    return value


def write_fitted_state(
    path: str | os.PathLike[str], header: Mapping[str, Any], state: Mapping[str, Any]
) -> None:
    """Write a fitted solver's ``state`` and a JSON ``header`` to ``path``, atomically.

    The file is ``torch.save`` of ``{"format", "version", "header": <JSON text>, "state"}``
    with every tensor on the CPU; :func:`read_fitted_state` reads it with
    ``weights_only=True``.
    """
    try:
        text = json.dumps(dict(header), sort_keys=True, indent=1)
    except TypeError as err:
        raise InputError(f"the header of a saved fit must be JSON-serialisable: {err}") from err
    record = {
        "format": FITTED_FORMAT,
        "version": FORMAT_VERSION,
        "header": text,
        "state": _to_cpu(dict(state)),
    }
    write_atomic(path, lambda fh: torch.save(record, fh))


def read_fitted_state(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(header, state)`` of a file written by :func:`write_fitted_state` (tensors on CPU).

    Raises
    ------
    InputError
        No file at ``path``.
    StoreMismatchError
        The file cannot be read as a saved fit (corrupted, truncated, not written by infl) or
        was written in another format version; the message says to refit and save again.
    """
    where = os.fspath(path)
    if not Path(path).is_file():
        raise InputError(f"no saved fit at {where!r}: save one with calc.save(path) first")
    refit = "Refit with InfluenceCalculator(...) and save it again with calc.save(path)."
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds (pickle, zip, runtime) for a bad file
        raise StoreMismatchError(
            f"cannot read {where!r} as a saved infl fit ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no details'}): the file is corrupted, "
            f"truncated or was not written by InfluenceCalculator.save. {refit}"
        ) from err
    if not isinstance(record, dict) or record.get("format") != FITTED_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise StoreMismatchError(
            f"{where!r} is not a saved infl fit (format {found!r}, expected "
            f"{FITTED_FORMAT!r}). {refit}"
        )
    if record.get("version") != FORMAT_VERSION:
        raise StoreMismatchError(
            f"{where!r} was saved in format version {record.get('version')!r}, and this "
            f"version of infl reads version {FORMAT_VERSION}. {refit}"
        )
    try:
        header = json.loads(record["header"])
    except (KeyError, TypeError, ValueError) as err:
        raise StoreMismatchError(f"{where!r} has no readable header ({err}). {refit}") from err
    state = record.get("state")
    if not isinstance(header, dict) or not isinstance(state, dict):
        raise StoreMismatchError(f"{where!r} has no header/state dicts. {refit}")
    return header, state


def check_same(
    path: str | os.PathLike[str], saved: Mapping[str, Any], now: Mapping[str, Any]
) -> None:
    """Refuse a saved fit whose identity (model, objective, data, ...) differs from ``now``.

    Raises
    ------
    StoreMismatchError
        Naming every key that differs, with both values.
    """
    differing = [key for key in now if saved.get(key) != now[key]]
    if differing:
        what = "; ".join(f"{key}: saved {saved.get(key)!r}, now {now[key]!r}" for key in differing)
        raise StoreMismatchError(
            f"the fit saved at {os.fspath(path)!r} was made with a different "
            f"{', '.join(differing)} ({what}). Load it with the model, objective and training "
            "data it was fitted to, or refit with InfluenceCalculator(...) and save again."
        )
