"""Readers of the data files a user already has: IDX (MNIST) and CIFAR-10 pickle batches.

Each reader checks what it reads and raises an :class:`~infl.errors.InputError` that names
the file and what is wrong with it (missing, truncated, another format). The loaders that
turn these arrays into a :class:`~infl.studies.datasets.Split` are
:func:`~infl.studies.datasets.load_mnist` and :func:`~infl.studies.datasets.load_cifar10`;
:func:`read_idx` stays importable from :mod:`infl.studies.datasets`.
"""

from __future__ import annotations

import gzip
import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infl.errors import InputError

__all__ = [
    "MNIST_FILES",
    "as_labels",
    "find_file",
    "load_cifar_batch",
    "mnist_candidates",
    "read_idx",
    "read_maybe_gzip",
]


# --------------------------------------------------------------------------- IDX (MNIST)
_IDX_DTYPES: dict[int, tuple[str, np.dtype[Any]]] = {
    0x08: ("unsigned byte", np.dtype(np.uint8)),
    0x09: ("signed byte", np.dtype(np.int8)),
    0x0B: ("short", np.dtype(">i2")),
    0x0C: ("int", np.dtype(">i4")),
    0x0D: ("float", np.dtype(">f4")),
    0x0E: ("double", np.dtype(">f8")),
}


def read_maybe_gzip(path: Path) -> bytes:
    """File contents, decompressed when the file starts with the gzip magic bytes."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {path}: {err}") from err
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise InputError(
                f"{path} looks gzip-compressed but cannot be decompressed: {err}"
            ) from err
    return data


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), raw or gzip-compressed.

    The format: two zero bytes, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16,
    ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions ``d``, then
    ``d`` big-endian uint32 sizes, then the values in C order, big-endian. Compression is
    detected from the file's first bytes, not its name.

    Parameters
    ----------
    path
        The file, e.g. ``train-images-idx3-ubyte`` or ``train-images-idx3-ubyte.gz``.

    Returns
    -------
    numpy.ndarray
        Shape ``(size_1, …, size_d)``, in native byte order (uint8 for MNIST).

    Raises
    ------
    InputError
        If the file is missing, unreadable, has a bad magic number / unknown type code, or
        holds a different number of bytes than its header announces.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"IDX file {path} does not exist")
    data = read_maybe_gzip(path)
    if len(data) < 4:
        raise InputError(f"{path} is too short ({len(data)} bytes) to be an IDX file")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise InputError(
            f"{path} is not an IDX file: bad magic number 0x{data[:4].hex()} (expected "
            "0x0000TTDD with type code TT in 08/09/0b/0c/0d/0e and DD dimensions); is it an "
            "HTML error page or a file of another format?"
        )
    type_name, dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise InputError(f"{path}: IDX header announces {ndim} dimensions but is truncated")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        raise InputError(
            f"{path}: size mismatch: the header announces {type_name} data of shape {dims} "
            f"({expected} bytes) but the file holds {actual} bytes after the header; the "
            "file is truncated or corrupt, download it again"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def mnist_candidates(data_dir: Path, stem: str) -> list[Path]:
    dirs = [data_dir, data_dir / "MNIST" / "raw", data_dir / "mnist", data_dir / "raw"]
    # some mirrors spell the stem with a dot: train-images.idx3-ubyte
    dotted = stem.replace("-idx", ".idx")
    names = [stem, stem + ".gz", dotted, dotted + ".gz"]
    return [d / n for d in dirs for n in names]


def find_file(candidates: Sequence[Path], what: str, hint: str) -> Path:
    for path in candidates:
        if path.is_file():
            return path
    looked = "\n  ".join(str(p) for p in candidates)
    raise InputError(f"{what} not found; looked for:\n  {looked}\n{hint}")


def as_labels(labels: np.ndarray, n: int, num_classes: int, what: str) -> torch.Tensor:
    if labels.ndim != 1 or labels.shape[0] != n:
        raise InputError(
            f"{what}: size mismatch: {n} images but labels of shape {tuple(labels.shape)}"
        )
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(
            f"{what}: labels must be in 0..{num_classes - 1}, found {int(y.min())}..{int(y.max())}"
        )
    return y


# --------------------------------------------------------------------------- CIFAR-10
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (no arbitrary code from the file)."""

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "scalar"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch only holds numpy arrays, "
                "lists and bytes"
            )
        if module == "numpy.core.multiarray" and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core.multiarray"  # numpy 2 moved it; avoids a deprecation warning
        return super().find_class(module, name)


def load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(data [N, 3072] uint8, labels [N] int64)`` of one CIFAR-10 pickle batch."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, OSError) as err:
        raise InputError(
            f"{path} is not a CIFAR-10 python batch ({type(err).__name__}: {err}); expected "
            "the files of cifar-10-python.tar.gz, extracted"
        ) from err
    if not isinstance(batch, dict):
        raise InputError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    keys = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in keys or "labels" not in keys:
        raise InputError(
            f"{path}: expected the keys b'data' and b'labels', found "
            f"{sorted(str(k) for k in batch)}; is this CIFAR-100 (b'fine_labels')?"
        )
    data = np.asarray(keys["data"])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise InputError(
            f"{path}: size mismatch: b'data' must be uint8 [N, 3072] (3 x 32 x 32), got "
            f"{data.dtype} of shape {data.shape}"
        )
    labels = np.asarray(keys["labels"])
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise InputError(f"{path}: size mismatch: {data.shape[0]} images but {labels.shape} labels")
    return data, labels.astype(np.int64)
