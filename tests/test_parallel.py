"""The one process pool (infl.parallel)."""

from __future__ import annotations

import operator

import pytest

from infl.errors import InputError
from infl.parallel import pickle_payload, run_tasks


def _scaled(item: int, payload: dict) -> int:
    if item < 0:
        raise ValueError(f"negative item {item}")
    return item * payload["scale"]


def test_workers_1_runs_in_order_in_this_process():
    seen = []

    def record(item, payload):  # a closure: fine without pickling
        seen.append(item)
        return item + payload

    out = list(run_tasks(record, [3, 1, 2], 10, workers=1, progress=False))
    assert out == [(3, 13), (1, 11), (2, 12)]
    assert seen == [3, 1, 2]


def test_pool_returns_every_result():
    items = list(range(7))
    out = dict(run_tasks(operator.mul, items, 3, workers=2, threads=1, progress=False))
    assert out == {i: 3 * i for i in items}


def test_worker_error_is_raised_here():
    with pytest.raises(ValueError, match="negative item -1"):
        list(run_tasks(_scaled, [1, -1, 2], {"scale": 2}, workers=2, progress=False))


def test_unpicklable_payload_and_bad_workers():
    with pytest.raises(InputError, match=r"cannot be pickled.*lambda"):
        list(run_tasks(operator.add, [1, 2], lambda: 0, workers=2, progress=False))
    with pytest.raises(InputError, match="workers must be a positive integer"):
        list(run_tasks(operator.add, [1], 0, workers=0, progress=False))
    assert pickle_payload({"a": 1})


def test_empty_and_single_item_need_no_pool():
    assert list(run_tasks(operator.add, [], 1, workers=4, progress=False)) == []
    assert list(run_tasks(lambda i, p: i + p, [5], 1, workers=4, progress=False)) == [(5, 6)]
