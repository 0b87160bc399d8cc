"""ScoreStore: influence(test, out=...) writes tiles that equal the in-memory scores, resumes
after a kill or a full disk without recomputing finished tiles, refuses other settings."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
from torch import nn

from infl import (
    ExactHessian,
    InflError,
    InfluenceCalculator,
    InputError,
    Objective,
    ScoreStore,
    StoreMismatchError,
    StoreWriteError,
    score_store,
)
from infl.export import load_scores

M, N, CHUNK, ROWS = 10, 40, 8, 4  # 3 row blocks x 5 column chunks = 15 tiles


def _problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N + M, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N + M,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    return model, Objective("cross_entropy", 0.01), (x[:N], y[:N]), (x[N:], y[N:])


def _calc(model, objective, train, damping: float = 1.0) -> InfluenceCalculator:
    probe = InfluenceCalculator(
        model, objective, train, ExactHessian(damping=damping), progress=False,
        check_minimum=False, chunk_size=CHUNK,
    )  # fmt: skip
    per_row = (6 * probe.num_params + CHUNK) * 8
    return InfluenceCalculator(
        model, objective, train, ExactHessian(damping=damping), progress=False,
        check_minimum=False, chunk_size=CHUNK, cache_bytes=0,
        memory_budget=2 * per_row * ROWS + 2 * per_row - 1,
    )  # fmt: skip


def _count_train_chunks(monkeypatch, calc) -> list[int]:
    """Count the chunks of training gradients computed (the work a tile costs): formed
    (``train_grads``) or multiplied without forming them (``train_grad_products``)."""
    calls = [0]
    inside = [False]
    grads, products = calc.wrapper.train_grads, calc.wrapper.train_grad_products

    def counted_grads(batch):
        calls[0] += not inside[0]
        return grads(batch)

    def counted_products(batch, vectors, **options):
        calls[0] += 1
        inside[0] = True
        try:
            return products(batch, vectors, **options)
        finally:
            inside[0] = False

    monkeypatch.setattr(calc.wrapper, "train_grads", counted_grads)
    monkeypatch.setattr(calc.wrapper, "train_grad_products", counted_products)
    return calls


def test_a_store_holds_the_in_memory_scores_and_exports_them(tmp_path):
    model, objective, train, test = _problem()
    calc = _calc(model, objective, train)
    store = calc.influence(test, out=tmp_path / "scores.npy")
    assert (store.row_blocks, store.col_chunks, store.complete) == (3, 5, True)
    ref = calc.influence(test)
    torch.testing.assert_close(store.scores(), ref, rtol=0, atol=1e-12)
    again = ScoreStore.open(tmp_path / "scores.npy")
    torch.testing.assert_close(again.scores(), ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), ref.numpy(), atol=1e-12)
    again.save(tmp_path / "scores.npz", train_ids=[f"t{i}" for i in range(N)])
    table = load_scores(tmp_path / "scores.npz")
    torch.testing.assert_close(table.scores, ref, rtol=0, atol=1e-12)
    assert table.train_ids[3] == "t3"
    assert table.metadata["value_name"] == "influence"
    assert "negative = training example i is helpful" in table.metadata["meaning"]


def test_a_finished_store_is_reopened_without_any_work(tmp_path, monkeypatch):
    model, objective, train, test = _problem()
    _calc(model, objective, train).influence(test, out=tmp_path / "s.npy")
    calc = _calc(model, objective, train)
    calls = _count_train_chunks(monkeypatch, calc)
    store = calc.influence(test, out=tmp_path / "s.npy")
    assert store.complete
    assert calls[0] == 0
    assert calc._fitted is None


def test_a_killed_run_resumes_without_recomputing_finished_tiles(tmp_path, monkeypatch):
    model, objective, train, test = _problem()
    calc = _calc(model, objective, train)
    written = [0]
    original = ScoreStore.write

    def killed_after_seven(self, row_start, col_start, tile):
        original(self, row_start, col_start, tile)
        written[0] += 1
        if written[0] == 7:
            raise KeyboardInterrupt  # Ctrl-C right after tile 7 was recorded

    monkeypatch.setattr(ScoreStore, "write", killed_after_seven)
    with pytest.raises(KeyboardInterrupt):
        calc.influence(test, out=tmp_path / "s.npy")
    monkeypatch.setattr(ScoreStore, "write", original)
    partial = ScoreStore.open(tmp_path / "s.npy")
    assert partial.tiles_done == 7
    assert not partial.complete
    with pytest.raises(InputError, match="not complete"):
        partial.scores()

    resumed = _calc(model, objective, train)
    calls = _count_train_chunks(monkeypatch, resumed)
    store = resumed.influence(test, out=tmp_path / "s.npy")
    assert calls[0] == 15 - 7  # row block 1 from its 3rd chunk, row block 2 whole
    torch.testing.assert_close(store.scores(), calc.influence(test), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ("damping", "solver"),
        ("test data", "test data"),
        ("training data", "training data"),
        ("model", "model parameters"),
    ],
)
def test_a_store_of_other_settings_is_refused_naming_the_setting(tmp_path, change, setting):
    model, objective, train, test = _problem()
    _calc(model, objective, train).influence(test, out=tmp_path / "s.npy")
    damping = 2.0 if change == "damping" else 1.0
    if change == "test data":
        test = (test[0] + 1.0, test[1])
    if change == "training data":
        train = (train[0].flip(0), train[1].flip(0))
    if change == "model":
        with torch.no_grad():
            model[0].weight.add_(0.01)
    calc = _calc(model, objective, train, damping=damping)
    with pytest.raises(StoreMismatchError, match=f"'{setting}' was"):
        calc.influence(test, out=tmp_path / "s.npy")


def test_a_full_disk_is_a_clear_error_that_loses_no_finished_tile(tmp_path, monkeypatch):
    model, objective, train, test = _problem()
    calc = _calc(model, objective, train)
    real = score_store.write_atomic
    records = [0]

    def disk_fills_up(path, content):
        if path.name == "progress.json":
            records[0] += 1
            if records[0] == 5:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(path, content)

    monkeypatch.setattr(score_store, "write_atomic", disk_fills_up)
    with pytest.raises(StoreWriteError, match="disk is full") as info:
        calc.influence(test, out=tmp_path / "s.npy")
    assert isinstance(info.value, InflError)
    assert "resume" in str(info.value)
    assert ScoreStore.open(tmp_path / "s.npy").tiles_done == 4

    monkeypatch.setattr(score_store, "write_atomic", real)  # space freed
    resumed = _calc(model, objective, train)
    calls = _count_train_chunks(monkeypatch, resumed)
    store = resumed.influence(test, out=tmp_path / "s.npy")
    assert calls[0] == 15 - 4
    torch.testing.assert_close(store.scores(), calc.influence(test), rtol=0, atol=1e-12)


def test_no_room_for_the_matrix_is_refused_before_any_work(tmp_path, monkeypatch):
    model, objective, train, test = _problem()

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(score_store.os, "posix_fallocate", no_space, raising=False)
    calc = _calc(model, objective, train)
    with pytest.raises(StoreWriteError, match=r"\[10, 40\] torch.float64 array"):
        calc.influence(test, out=tmp_path / "s.npy")
    assert not (tmp_path / "s.npy").exists()
    assert calc._fitted is None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_opening_a_missing_store_and_writing_out_of_order_are_refused(tmp_path):
    with pytest.raises(InputError, match="no score store"):
        ScoreStore.open(tmp_path / "none.npy")
    store = ScoreStore(
        tmp_path / "x.npy", {}, shape=(3, 4), block_rows=2, block_cols=2, dtype=torch.float32
    )
    with pytest.raises(InputError, match="not the next unfinished tile"):
        store.write(0, 2, torch.zeros(2, 2))
    store.write(0, 0, torch.ones(2, 2))
    assert store.done(0) == 1
    assert store.tiles_done == 1
    assert store.scores(partial=True)[:2, :2].eq(1).all()
