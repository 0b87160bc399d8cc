"""Data sets for the studies: shipped iris and digits, and real MNIST / CIFAR-10 from disk.

Every loader returns a :class:`Split`: float feature tensors, ``int64`` labels, and a fixed
train/test split that depends only on ``seed``. Nothing is downloaded and nothing outside
infl's own dependencies (torch, numpy) is needed:

* :func:`load_iris` and :func:`load_digits` read small copies shipped inside the package
  (``infl/data_files/``, exported once from scikit-learn's bundled copies by
  ``scripts/export_datasets.py``; UCI ML repository, CC BY 4.0).
* :func:`load_mnist` reads the IDX files (``train-images-idx3-ubyte[.gz]`` …) and
  :func:`load_cifar10` the python-pickle batches (``data_batch_1`` … ``test_batch``) that the
  user already has; :func:`read_idx` is the IDX reader on its own. The file readers live in
  :mod:`infl.studies.file_readers`.

Preprocessing (applied by the loaders, documented on each):

==========  ======================================  ===========================  ==========
data set    features                                ``x`` shape                  split
==========  ======================================  ===========================  ==========
iris        z-score with *training* mean / std      ``[n, 4]``                   seeded
digits      pixel / 16, in [0, 1]                   ``[n, 64]`` or ``[n,1,8,8]`` seeded
MNIST       pixel / 255, in [0, 1]                  ``[n, 1, 28, 28]``/``[n,784]`` official
CIFAR-10    pixel / 255, in [0, 1]                  ``[n, 3, 32, 32]``           official
==========  ======================================  ===========================  ==========

Seeded splits are stratified (each class contributes ``round(test_fraction * n_class)`` test
examples); within the train and test parts examples keep the order of the source file, and
``Split.train_indices`` / ``Split.test_indices`` give their rows in it.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from infl.errors import InputError
from infl.studies.file_readers import (
    MNIST_FILES,
    as_labels,
    find_file,
    load_cifar_batch,
    mnist_candidates,
    read_idx,
)

__all__ = [
    "Split",
    "load_cifar10",
    "load_digits",
    "load_iris",
    "load_mnist",
    "read_idx",
    "stratified_split",
]


@dataclass(frozen=True)
class Split:
    """A data set split into training and test parts.

    Attributes
    ----------
    x_train
        Features ``[n_train, *input_shape]``, floating point.
    y_train
        Class labels ``[n_train]``, ``int64`` in ``0 .. num_classes - 1``.
    x_test
        Features ``[n_test, *input_shape]``.
    y_test
        Labels ``[n_test]``.
    num_classes
        Number of classes ``C``.
    name
        Short name (``"iris"``, ``"digits"``, ``"mnist"``, ``"cifar10"``).
    description
        One line saying where the data came from and how it was preprocessed.
    train_indices, test_indices
        ``int64`` rows of the source data that form each part (for MNIST/CIFAR-10, rows of
        the official training and test files respectively).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str
    description: str
    train_indices: torch.Tensor
    test_indices: torch.Tensor

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test examples."""
        return int(self.y_test.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example's features (``(4,)``, ``(1, 8, 8)``, ``(3, 32, 32)`` …)."""
        return tuple(self.x_train.shape[1:])

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_train, y_train)``, the batch form infl's calculators take."""
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_test, y_test)``."""
        return self.x_test, self.y_test

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Split:
        """A copy with features (and labels, for ``device``) moved/cast; labels stay ``int64``."""
        return replace(
            self,
            x_train=self.x_train.to(device=device, dtype=dtype),
            x_test=self.x_test.to(device=device, dtype=dtype),
            y_train=self.y_train.to(device=device),
            y_test=self.y_test.to(device=device),
        )


# --------------------------------------------------------------------------- helpers
def _check_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating-point torch dtype, got {dtype}")


def _check_fraction(name: str, value: float, *, allow_one: bool = False) -> None:
    hi_ok = value <= 1.0 if allow_one else value < 1.0
    if not (value > 0.0 and hi_ok):
        bound = "(0, 1]" if allow_one else "(0, 1)"
        raise InputError(f"{name} must be in {bound}, got {value}")


def stratified_split(
    labels: torch.Tensor, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded stratified train/test indices.

    Each class ``c`` with ``n_c`` examples puts ``round(test_fraction * n_c)`` of them,
    chosen by a ``torch.Generator`` seeded with ``seed``, in the test part (at least one when
    ``n_c >= 2``, and never all of them).

    Parameters
    ----------
    labels
        Integer labels ``[n]``.
    test_fraction
        Fraction of each class held out, in (0, 1).
    seed
        Seed of the generator; the same arguments always give the same split.

    Returns
    -------
    (train_indices, test_indices)
        Two sorted ``int64`` index tensors that partition ``0 .. n-1``.
    """
    _check_fraction("test_fraction", test_fraction)
    labels = torch.as_tensor(labels).reshape(-1)
    gen = torch.Generator().manual_seed(int(seed))
    test_parts = []
    for c in torch.unique(labels, sorted=True).tolist():
        members = (labels == c).nonzero().reshape(-1)
        n_c = int(members.numel())
        k = round(test_fraction * n_c)
        k = min(max(k, 1 if n_c >= 2 else 0), n_c - 1)
        perm = torch.randperm(n_c, generator=gen)
        test_parts.append(members[perm[:k]])
    test_idx = torch.sort(torch.cat(test_parts)).values
    mask = torch.ones(labels.numel(), dtype=torch.bool)
    mask[test_idx] = False
    train_idx = mask.nonzero().reshape(-1)
    return train_idx.to(torch.int64), test_idx.to(torch.int64)


def _random_subset(n: int, k: int, seed: int) -> torch.Tensor:
    """``k`` of ``0 .. n-1``, chosen by a seeded generator, in ascending order."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.sort(torch.randperm(n, generator=gen)[:k]).values


def _subset_size(
    n: int, fraction: float | None, maximum: int | None, what: str, fraction_name: str
) -> int:
    if fraction is not None and maximum is not None:
        raise InputError(f"give either {fraction_name} or max_{what}, not both")
    if fraction is not None:
        _check_fraction(fraction_name, fraction, allow_one=True)
        return max(1, round(fraction * n))
    if maximum is not None:
        if maximum < 1:
            raise InputError(f"max_{what} must be a positive integer, got {maximum}")
        return min(int(maximum), n)
    return n


def _read_shipped(name: str) -> bytes:
    resource = resources.files("infl").joinpath("data_files").joinpath(name)
    try:
        return resource.read_bytes()
    except FileNotFoundError as err:  # pragma: no cover - only on a broken installation
        raise InputError(
            f"the shipped data file infl/data_files/{name} is missing from this installation; "
            "reinstall infl (the file is package data listed in pyproject.toml)"
        ) from err


def _parse_csv(text: str, name: str, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse a numeric CSV with one header line: (features float64 [n, columns-1], labels)."""
    table = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    if table.shape[1] != columns:  # pragma: no cover - shipped data
        raise InputError(f"{name}: expected {columns} columns, got shape {table.shape}")
    return table[:, :-1], table[:, -1].astype(np.int64)


# --------------------------------------------------------------------------- shipped data
def load_iris(
    seed: int = 0, test_fraction: float = 0.2, *, dtype: torch.dtype = torch.float32
) -> Split:
    """Fisher's iris: 150 flowers, 4 measurements, 3 classes (50 each).

    Features are z-scored with the mean and (population) standard deviation of the
    *training* part, :math:`x' = (x - \\mu_{train}) / \\sigma_{train}`, so no test statistic
    leaks into training. The split is stratified: with the default ``test_fraction=0.2``,
    10 test flowers per class, ``n_train = 120``, ``n_test = 30``.

    Parameters
    ----------
    seed
        Seed of the train/test split.
    test_fraction
        Fraction of each class held out for testing, in (0, 1).
    dtype
        Floating dtype of the features (``torch.float64`` for closed-form checks).

    Returns
    -------
    Split
        ``x_train [n_train, 4]``, ``x_test [n_test, 4]``, ``num_classes = 3``.

    Examples
    --------
    >>> from infl.studies.datasets import load_iris
    >>> s = load_iris(seed=0)
    >>> s.x_train.shape, s.x_test.shape, s.num_classes
    (torch.Size([120, 4]), torch.Size([30, 4]), 3)
    """
    _check_dtype(dtype)
    x_np, y_np = _parse_csv(_read_shipped("iris.csv").decode("ascii"), "iris.csv", 5)
    x = torch.from_numpy(x_np)
    y = torch.from_numpy(y_np)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    mean = x[train_idx].mean(dim=0)
    std = x[train_idx].std(dim=0, unbiased=False).clamp_min(1e-12)
    x = (x - mean) / std
    return Split(
        x_train=x[train_idx].to(dtype),
        y_train=y[train_idx],
        x_test=x[test_idx].to(dtype),
        y_test=y[test_idx],
        num_classes=3,
        name="iris",
        description=(
            "UCI iris (150 x 4, 3 classes), shipped with infl; features z-scored with "
            f"training statistics; stratified split, test_fraction={test_fraction}, seed={seed}"
        ),
        train_indices=train_idx,
        test_indices=test_idx,
    )


def load_digits(
    seed: int = 0,
    test_fraction: float = 0.2,
    *,
    images: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """UCI handwritten digits: 1,797 grey 8x8 images, 10 classes (≈180 each).

    Pixels are counts 0..16 in the source and are divided by 16, so features lie in [0, 1]
    (a fixed scale, the same for train and test). With the default ``test_fraction=0.2`` the
    stratified split has ``n_train = 1438``, ``n_test = 359``.

    Parameters
    ----------
    seed
        Seed of the train/test split.
    test_fraction
        Fraction of each class held out for testing, in (0, 1).
    images
        ``False``: flat features ``[n, 64]`` (for MLPs / linear models). ``True``: images
        ``[n, 1, 8, 8]`` (for :func:`infl.studies.models.small_cnn`); row-major, so
        ``x.reshape(n, 64)`` recovers the flat form.
    dtype
        Floating dtype of the features.

    Returns
    -------
    Split
        ``num_classes = 10``.

    Examples
    --------
    >>> from infl.studies.datasets import load_digits
    >>> s = load_digits(seed=0, images=True)
    >>> s.input_shape, s.n_train, s.n_test
    ((1, 8, 8), 1438, 359)
    """
    _check_dtype(dtype)
    raw = gzip.decompress(_read_shipped("digits.csv.gz")).decode("ascii")
    x_np, y_np = _parse_csv(raw, "digits.csv.gz", 65)
    x = torch.from_numpy(x_np) / 16.0
    if images:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.from_numpy(y_np)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    return Split(
        x_train=x[train_idx].to(dtype),
        y_train=y[train_idx],
        x_test=x[test_idx].to(dtype),
        y_test=y[test_idx],
        num_classes=10,
        name="digits",
        description=(
            "UCI optical digits (1797 x 8x8, 10 classes), shipped with infl; pixels / 16; "
            f"stratified split, test_fraction={test_fraction}, seed={seed}"
        ),
        train_indices=train_idx,
        test_indices=test_idx,
    )


# --------------------------------------------------------------------------- MNIST
def load_mnist(
    data_dir: str | Path,
    *,
    seed: int = 0,
    subset_fraction: float | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    flatten: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """MNIST from the four IDX files the user already has (no download, no torchvision).

    The files are looked for under ``data_dir``, ``data_dir/MNIST/raw`` (torchvision's
    layout), ``data_dir/mnist`` and ``data_dir/raw``, each as ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, raw
    or with ``.gz``. The official split is kept (60,000 / 10,000); pixels are divided by 255.

    Parameters
    ----------
    data_dir
        Directory holding the files.
    seed
        Seed of the training subset (unused without ``subset_fraction`` / ``max_train``);
        the test subset uses ``seed + 1``.
    subset_fraction
        Keep this fraction of the training images, chosen at random (Basu et al. use 10% of
        MNIST: ``subset_fraction=0.1``).
    max_train
        Keep at most this many training images, chosen at random (exclusive with
        ``subset_fraction``).
    max_test
        Keep at most this many test images, chosen at random.
    flatten
        ``True``: features ``[n, 784]``; ``False``: images ``[n, 1, 28, 28]``.
    dtype
        Floating dtype of the features.

    Returns
    -------
    Split
        ``num_classes = 10``; subsets keep file order, ``train_indices`` / ``test_indices``
        give the rows of the training / test files.

    Raises
    ------
    InputError
        If a file is missing (the message lists every path tried) or malformed.
    """
    _check_dtype(dtype)
    root = Path(data_dir)
    hint = (
        "Put the MNIST IDX files (raw or .gz, as distributed) in data_dir; infl does not "
        "download them. See docs/datasets.md."
    )
    paths = {
        key: find_file(mnist_candidates(root, stem), f"MNIST file {stem}[.gz]", hint)
        for key, stem in MNIST_FILES.items()
    }
    parts = {}
    for part in ("train", "test"):
        images = read_idx(paths[f"{part}_images"])
        labels = read_idx(paths[f"{part}_labels"])
        if images.ndim != 3 or images.dtype != np.uint8:
            raise InputError(
                f"{paths[f'{part}_images']}: expected uint8 images [n, rows, cols], got "
                f"{images.dtype} of shape {images.shape}"
            )
        y = as_labels(labels, images.shape[0], 10, f"MNIST {part} set")
        parts[part] = (images, y)
    n_train = parts["train"][0].shape[0]
    n_test = parts["test"][0].shape[0]
    k_train = _subset_size(n_train, subset_fraction, max_train, "train", "subset_fraction")
    k_test = _subset_size(n_test, None, max_test, "test", "subset_fraction")
    train_idx = _random_subset(n_train, k_train, seed)
    test_idx = _random_subset(n_test, k_test, seed + 1)

    def features(images: np.ndarray, idx: torch.Tensor) -> torch.Tensor:
        x = torch.from_numpy(images[idx.numpy()]).to(dtype) / 255.0
        return x.reshape(len(idx), -1) if flatten else x.unsqueeze(1)

    return Split(
        x_train=features(parts["train"][0], train_idx),
        y_train=parts["train"][1][train_idx],
        x_test=features(parts["test"][0], test_idx),
        y_test=parts["test"][1][test_idx],
        num_classes=10,
        name="mnist",
        description=(
            f"MNIST from {root}: {k_train} of {n_train} training and {k_test} of {n_test} test "
            f"images (seed={seed}); pixels / 255"
        ),
        train_indices=train_idx,
        test_indices=test_idx,
    )


# --------------------------------------------------------------------------- CIFAR-10
def load_cifar10(
    data_dir: str | Path,
    *,
    seed: int = 0,
    subset_fraction: float | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """CIFAR-10 from the python-pickle batches the user already has (no download).

    The six files ``data_batch_1`` … ``data_batch_5`` and ``test_batch`` of
    ``cifar-10-python.tar.gz`` are looked for in ``data_dir/cifar-10-batches-py/`` and then
    in ``data_dir`` itself. Each is a pickled dict with ``b'data'`` (uint8 ``[N, 3072]``,
    channel-major: 1024 red, 1024 green, 1024 blue values, each row-major 32x32) and
    ``b'labels'`` (N ints). Images become ``[N, 3, 32, 32]`` floats in [0, 1] (pixel / 255).
    The official split is kept (50,000 / 10,000).

    The batches are unpickled with a restricted unpickler that only builds numpy arrays,
    lists and bytes, so a tampered file cannot run code.

    Parameters
    ----------
    data_dir
        Directory holding ``cifar-10-batches-py/`` or the batch files.
    seed
        Seed of the training subset; the test subset uses ``seed + 1``.
    subset_fraction
        Keep this fraction of the training images, chosen at random.
    max_train
        Keep at most this many training images (exclusive with ``subset_fraction``).
    max_test
        Keep at most this many test images.
    dtype
        Floating dtype of the features.

    Returns
    -------
    Split
        ``x [n, 3, 32, 32]``, ``num_classes = 10``.

    Raises
    ------
    InputError
        If a batch file is missing (the message lists every path tried) or malformed.
    """
    _check_dtype(dtype)
    root = Path(data_dir)
    hint = (
        "Extract cifar-10-python.tar.gz into data_dir; infl does not download it. "
        "See docs/datasets.md."
    )
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    paths = {
        name: find_file(
            [root / "cifar-10-batches-py" / name, root / name], f"CIFAR-10 file {name}", hint
        )
        for name in names
    }
    train_batches = [load_cifar_batch(paths[n]) for n in names[:5]]
    train_data = np.concatenate([d for d, _ in train_batches])
    train_labels = as_labels(
        np.concatenate([lab for _, lab in train_batches]), train_data.shape[0], 10, "CIFAR-10"
    )
    test_data, test_labels_np = load_cifar_batch(paths["test_batch"])
    test_labels = as_labels(test_labels_np, test_data.shape[0], 10, "CIFAR-10 test_batch")
    n_train, n_test = train_data.shape[0], test_data.shape[0]
    k_train = _subset_size(n_train, subset_fraction, max_train, "train", "subset_fraction")
    k_test = _subset_size(n_test, None, max_test, "test", "subset_fraction")
    train_idx = _random_subset(n_train, k_train, seed)
    test_idx = _random_subset(n_test, k_test, seed + 1)

    def features(data: np.ndarray, idx: torch.Tensor) -> torch.Tensor:
        x = torch.from_numpy(data[idx.numpy()]).to(dtype) / 255.0
        return x.reshape(len(idx), 3, 32, 32)

    return Split(
        x_train=features(train_data, train_idx),
        y_train=train_labels[train_idx],
        x_test=features(test_data, test_idx),
        y_test=test_labels[test_idx],
        num_classes=10,
        name="cifar10",
        description=(
            f"CIFAR-10 from {root}: {k_train} of {n_train} training and {k_test} of {n_test} "
            f"test images (seed={seed}); pixels / 255"
        ),
        train_indices=train_idx,
        test_indices=test_idx,
    )
