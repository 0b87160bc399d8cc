"""infl.studies.datasets: shipped iris/digits, the IDX and CIFAR-10 pickle readers, bad files."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from infl.errors import InputError
from infl.studies.datasets import (
    Split,
    load_cifar10,
    load_digits,
    load_iris,
    load_mnist,
    read_idx,
    stratified_split,
)


def _check_partition(split: Split, n_total: int) -> None:
    both = torch.cat([split.train_indices, split.test_indices])
    assert torch.equal(torch.sort(both).values, torch.arange(n_total))
    assert split.y_train.dtype == torch.int64
    assert split.y_test.dtype == torch.int64
    assert len(split.x_train) == len(split.y_train) == split.n_train
    assert len(split.x_test) == len(split.y_test) == split.n_test


# --------------------------------------------------------------------------- shipped data
def test_iris_shapes_classes_and_stratified_split():
    s = load_iris(seed=0)
    assert (s.name, s.num_classes, s.input_shape) == ("iris", 3, (4,))
    assert (s.n_train, s.n_test) == (120, 30)
    assert s.x_train.dtype == torch.float32
    _check_partition(s, 150)
    assert s.y_train.bincount().tolist() == [40, 40, 40]
    assert s.y_test.bincount().tolist() == [10, 10, 10]
    # iris rows are sorted by class, 50 per class
    assert torch.equal(s.y_train, s.train_indices // 50)


def test_iris_is_zscored_with_training_statistics_only():
    s = load_iris(seed=3, dtype=torch.float64)
    assert s.x_train.dtype == torch.float64
    torch.testing.assert_close(s.x_train.mean(0), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(s.x_train.std(0, unbiased=False), torch.ones(4, dtype=torch.float64))
    # the test part is not re-standardised on its own
    assert float((s.x_test.mean(0)).abs().max()) > 1e-3


def test_iris_matches_scikit_learn_copy():
    datasets = pytest.importorskip("sklearn.datasets")
    ref = datasets.load_iris()
    s = load_iris(seed=1, dtype=torch.float64)
    x = torch.from_numpy(ref.data)
    tr = s.train_indices
    z = (x - x[tr].mean(0)) / x[tr].std(0, unbiased=False)
    torch.testing.assert_close(s.x_test, z[s.test_indices])
    assert np.array_equal(s.y_test.numpy(), ref.target[s.test_indices.numpy()])


def test_split_is_deterministic_by_seed():
    a, b, c = load_iris(seed=7), load_iris(seed=7), load_iris(seed=8)
    assert torch.equal(a.test_indices, b.test_indices)
    assert torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.test_indices, c.test_indices)
    d1, d2 = load_digits(seed=5), load_digits(seed=5)
    assert torch.equal(d1.test_indices, d2.test_indices)
    assert not torch.equal(d1.test_indices, load_digits(seed=6).test_indices)


def test_digits_flat_and_images_agree_and_match_scikit_learn():
    flat = load_digits(seed=0)
    img = load_digits(seed=0, images=True)
    assert flat.input_shape == (64,)
    assert img.input_shape == (1, 8, 8)
    assert (flat.num_classes, flat.n_train + flat.n_test) == (10, 1797)
    assert (flat.n_train, flat.n_test) == (1438, 359)
    _check_partition(flat, 1797)
    assert torch.equal(img.x_train.reshape(-1, 64), flat.x_train)
    assert float(flat.x_train.min()) == 0.0
    assert float(flat.x_train.max()) == 1.0
    assert torch.equal(flat.x_train * 16, torch.round(flat.x_train * 16))  # counts / 16
    # stratified: each class holds out about 20% of its ~180 examples
    assert flat.y_test.bincount(minlength=10).min() >= 34
    datasets = pytest.importorskip("sklearn.datasets")
    ref = datasets.load_digits()
    assert np.array_equal(flat.x_test.numpy() * 16, ref.data[flat.test_indices.numpy()])
    assert np.array_equal(flat.y_train.numpy(), ref.target[flat.train_indices.numpy()])
    assert np.array_equal(img.x_test[:, 0].numpy() * 16, ref.images[img.test_indices.numpy()])


def test_split_helpers():
    s = load_iris()
    x, y = s.train
    assert x is s.x_train
    assert y is s.y_train
    s64 = s.to(dtype=torch.float64)
    assert s64.x_test.dtype == torch.float64
    assert s64.y_test.dtype == torch.int64


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_test_fraction_is_refused(fraction):
    with pytest.raises(InputError, match="test_fraction"):
        load_iris(test_fraction=fraction)


def test_stratified_split_keeps_each_class_on_both_sides():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3])
    train, test = stratified_split(labels, 0.1, seed=0)
    assert set(labels[test].tolist()) == {0, 1, 2}  # at least one per class of size >= 2
    assert set(labels[train].tolist()) == {0, 1, 2, 3}
    with pytest.raises(InputError, match="floating-point"):
        load_iris(dtype=torch.int64)


# --------------------------------------------------------------------------- IDX files
_IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float64: 0x0E}


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write ``array`` in the IDX format, independently of the reader under test."""
    code = _IDX_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    ("dtype", "shape"),
    [(np.uint8, (5, 4, 3)), (np.uint8, (7,)), (np.int8, (3, 2)), (np.int32, (4, 2)),
     (np.int16, (6,)), (np.float64, (2, 3))],
)  # fmt: skip
def test_read_idx_round_trips(tmp_path, compress, dtype, shape):
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        array = rng.standard_normal(shape).astype(dtype)
    path = write_idx(tmp_path / ("a.idx.gz" if compress else "a.idx"), array, compress)
    got = read_idx(path)
    assert got.shape == shape
    assert got.dtype.kind == np.dtype(dtype).kind
    np.testing.assert_array_equal(got, array)


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path = write_idx(tmp_path / "no-suffix", array, compress=True)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_bad_magic_number(tmp_path):
    path = tmp_path / "page.html"
    path.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(InputError, match="bad magic number"):
        read_idx(path)


def test_read_idx_size_mismatch(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((10, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(InputError, match="size mismatch"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_idx(tmp_path / "nothing-here")


def _write_mnist(directory: Path, n_train: int = 30, n_test: int = 12, compress: bool = True):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8)[::-1].copy(),
    }
    for stem, array in arrays.items():
        write_idx(directory / (stem + (".gz" if compress else "")), array, compress)
    return arrays


@pytest.mark.parametrize(("compress", "layout"), [(True, ""), (False, "MNIST/raw")])
def test_load_mnist_from_idx_files(tmp_path, compress, layout):
    arrays = _write_mnist(tmp_path / layout if layout else tmp_path, compress=compress)
    s = load_mnist(tmp_path)
    assert (s.name, s.num_classes, s.n_train, s.n_test) == ("mnist", 10, 30, 12)
    assert s.input_shape == (1, 28, 28)
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float().unsqueeze(1) / 255
    torch.testing.assert_close(s.x_train, expected)
    assert s.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    flat = load_mnist(tmp_path, flatten=True, dtype=torch.float64)
    assert flat.input_shape == (784,)
    assert flat.x_test.dtype == torch.float64


def test_load_mnist_seeded_subsets(tmp_path):
    arrays = _write_mnist(tmp_path)
    a = load_mnist(tmp_path, subset_fraction=0.1, seed=3)
    b = load_mnist(tmp_path, subset_fraction=0.1, seed=3)
    c = load_mnist(tmp_path, subset_fraction=0.1, seed=4)
    assert (a.n_train, a.n_test) == (3, 12)
    assert torch.equal(a.train_indices, b.train_indices)
    assert torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.train_indices, c.train_indices)
    labels = arrays["train-labels-idx1-ubyte"][a.train_indices.numpy()]
    assert a.y_train.tolist() == labels.tolist()
    m = load_mnist(tmp_path, max_train=7, max_test=5)
    assert (m.n_train, m.n_test) == (7, 5)
    assert bool((m.train_indices[1:] > m.train_indices[:-1]).all())  # file order kept
    with pytest.raises(InputError, match="not both"):
        load_mnist(tmp_path, subset_fraction=0.1, max_train=3)


def test_load_mnist_missing_file_lists_the_names_looked_for(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(InputError, match="t10k-labels-idx1-ubyte") as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert "looked for" in message
    assert "t10k-labels-idx1-ubyte.gz" in message
    assert str(tmp_path / "MNIST" / "raw") in message


def test_load_mnist_label_count_mismatch(tmp_path):
    _write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8), compress=True)
    with pytest.raises(InputError, match="size mismatch"):
        load_mnist(tmp_path)


# --------------------------------------------------------------------------- CIFAR-10
def _cifar_batch(n: int, seed: int) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"synthetic batch",
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


def _write_cifar(directory: Path, old_numpy_names: bool = False) -> dict[str, dict]:
    directory.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": _cifar_batch(4, i) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(3, 99)
    for name, batch in batches.items():
        raw = pickle.dumps(batch, protocol=2)  # CIFAR-10's batches are protocol-2 pickles
        if old_numpy_names:  # as written by numpy 1.x / Python 2
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            assert b"numpy.core.multiarray\n_reconstruct" in raw
        (directory / name).write_bytes(raw)
    return batches


@pytest.mark.parametrize(("subdir", "old_names"), [("cifar-10-batches-py", False), ("", True)])
def test_load_cifar10_round_trips(tmp_path, subdir, old_names):
    batches = _write_cifar(tmp_path / subdir if subdir else tmp_path, old_numpy_names=old_names)
    s = load_cifar10(tmp_path)
    assert (s.name, s.num_classes, s.n_train, s.n_test) == ("cifar10", 10, 20, 3)
    assert s.input_shape == (3, 32, 32)
    # channel-major rows: value (c, i, j) is data[c * 1024 + i * 32 + j]
    data = batches["data_batch_2"][b"data"]
    assert isinstance(data, np.ndarray)
    k = 4 + 1  # second image of the second batch
    for c, i, j in [(0, 0, 0), (1, 5, 31), (2, 31, 7)]:
        assert float(s.x_train[k, c, i, j]) == pytest.approx(data[1, c * 1024 + i * 32 + j] / 255)
    labels = [lab for i in range(1, 6) for lab in batches[f"data_batch_{i}"][b"labels"]]
    assert s.y_train.tolist() == labels
    assert s.y_test.tolist() == batches["test_batch"][b"labels"]
    assert float(s.x_train.min()) >= 0.0
    assert float(s.x_train.max()) <= 1.0


def test_load_cifar10_subsets_are_seeded(tmp_path):
    _write_cifar(tmp_path)
    a = load_cifar10(tmp_path, max_train=5, seed=1)
    b = load_cifar10(tmp_path, max_train=5, seed=1)
    assert a.n_train == 5
    assert torch.equal(a.x_train, b.x_train)
    assert load_cifar10(tmp_path, subset_fraction=0.5).n_train == 10


def test_load_cifar10_missing_batch(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(InputError, match="data_batch_4") as info:
        load_cifar10(tmp_path)
    assert "looked for" in str(info.value)
    assert "cifar-10-batches-py" in str(info.value)


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda b: b.pop(b"labels"), "b'labels'"),
        (lambda b: b.__setitem__(b"data", np.zeros((4, 100), np.uint8)), "size mismatch"),
        (lambda b: b.__setitem__(b"labels", [0, 1]), "size mismatch"),
        (lambda b: b.__setitem__(b"labels", [0, 1, 2, 10]), "labels must be in 0..9"),
    ],
)
def test_load_cifar10_malformed_batch(tmp_path, mutate, words):
    _write_cifar(tmp_path)
    batch = _cifar_batch(4, 3)
    mutate(batch)
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(InputError, match=words):
        load_cifar10(tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("this must not run",))


def test_load_cifar10_refuses_code_in_pickles(tmp_path, capsys):
    _write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _Evil()}))
    with pytest.raises(InputError, match=r"refusing to load builtins\.print"):
        load_cifar10(tmp_path)
    assert "must not run" not in capsys.readouterr().out
    (tmp_path / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(InputError, match="not a CIFAR-10 python batch"):
        load_cifar10(tmp_path)
