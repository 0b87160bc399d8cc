"""IndexedData: one example order for tensors, datasets and loaders; refusals name the fix."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from infl import IndexedData, InputError
from infl.data import batch_size, batch_to, tensor_leaves


def _xy(n: int = 7):
    x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
    y = torch.arange(n) % 2
    return x, y


class _DictDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda x, y: (x, y),
        lambda x, y: TensorDataset(x, y),
        lambda x, y: DataLoader(TensorDataset(x, y), batch_size=3, shuffle=False),
    ],
    ids=["tensors", "dataset", "loader"],
)
def test_every_form_gives_the_same_examples_in_the_same_order(wrap):
    x, y = _xy()
    data = IndexedData(wrap(x, y))
    assert len(data) == 7
    bx, by = data.select([5, 0, 5])
    torch.testing.assert_close(bx, x[[5, 0, 5]])
    torch.testing.assert_close(by, y[[5, 0, 5]])
    starts, rows = [], []
    for start, (cx, _) in data.chunks(3):
        starts.append(start)
        rows.append(cx)
    assert starts == [0, 3, 6]
    assert data.num_chunks(3) == 3
    torch.testing.assert_close(torch.cat(rows), x)


def test_dict_batches_keep_their_keys_through_select_and_chunks():
    x, y = _xy()
    data = IndexedData(_DictDataset(x, y))
    batch = data.select([1, 2])
    assert set(batch) == {"x", "y"}
    torch.testing.assert_close(batch["x"], x[1:3])
    direct = IndexedData({"x": x, "y": y})
    _, first = next(direct.chunks(4))
    torch.testing.assert_close(first["y"], y[:4])


def test_without_removes_examples_and_keeps_the_order():
    x, y = _xy()
    rest = IndexedData((x, y)).without([0, 4])
    assert len(rest) == 5
    torch.testing.assert_close(rest.select(range(5))[0], x[[1, 2, 3, 5, 6]])
    with pytest.raises(InputError, match="leaves no data"):
        IndexedData((x[:2], y[:2])).without([0, 1])


def test_wrapping_an_indexed_data_shares_it():
    x, y = _xy()
    data = IndexedData((x, y), name="training data")
    again = IndexedData(data)
    assert len(again) == len(data)
    torch.testing.assert_close(again.select([3])[0], x[[3]])


def test_batch_helpers():
    x, y = _xy()
    assert batch_size({"a": x, "b": [y, y]}) == 7
    assert len(tensor_leaves({"a": x, "b": [y, y]})) == 3
    moved = batch_to((x, y), torch.device("cpu"), torch.float64)
    assert moved[0].dtype == torch.float64  # floating leaves take the model's dtype
    assert moved[1].dtype == y.dtype  # integer labels stay integers


class _Stream(IterableDataset):
    def __iter__(self):
        yield from range(3)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: DataLoader(TensorDataset(*_xy()), shuffle=True), "shuffle=False"),
        (lambda: _Stream(), "map-style"),
        (lambda: "data.csv", "cannot index a str"),
        (lambda: (torch.zeros(3, 2), torch.zeros(4)), "different leading sizes"),
        (lambda: (torch.zeros(0, 2), torch.zeros(0)), "empty"),
        (lambda: (torch.tensor(1.0),), "0-d tensor"),
        (lambda: ("a", "b"), "at least one tensor"),
    ],
    ids=["shuffling-loader", "iterable", "string", "ragged", "empty", "scalar", "no-tensor"],
)
def test_bad_data_is_refused_with_the_fix(make, words):
    with pytest.raises(InputError, match=words):
        IndexedData(make(), name="training data")


def test_out_of_range_and_empty_selections_name_the_index():
    data = IndexedData(_xy(), name="test data")
    with pytest.raises(InputError, match=r"test data: index 9 is out of range for 7 examples"):
        data.select([1, 9])
    with pytest.raises(InputError, match="index -1"):
        data.select([-1])
    with pytest.raises(InputError, match="empty set"):
        data.select([])
    with pytest.raises(InputError, match="chunk_size"):
        next(data.chunks(0))
