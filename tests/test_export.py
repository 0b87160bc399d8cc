"""Scores leave the process: DataFrames, CSV and NPZ files, ids, permissions, pandas refusal."""

from __future__ import annotations

import builtins
import os
import stat

import numpy as np
import pytest
import torch

from infl import ExactHessian, InfluenceCalculator, InputError, Objective
from infl.export import MEANINGS, load_scores, save_scores, scores_to_frame

pd = pytest.importorskip("pandas")


@pytest.fixture
def scores() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, generator=gen, dtype=torch.float64) * 1e-3


def test_long_frame_has_one_row_per_pair_test_major(scores):
    frame = scores_to_frame(scores, ["a", "b", "c"], [10, 11, 12, 13, 14])
    assert frame.columns.tolist() == ["test_id", "train_id", "influence"]
    assert frame.shape == (15, 3)
    assert frame["test_id"].tolist() == ["a"] * 5 + ["b"] * 5 + ["c"] * 5
    assert frame["train_id"].tolist() == [10, 11, 12, 13, 14] * 3
    assert frame["influence"].to_numpy().tolist() == scores.reshape(-1).tolist()
    row = frame[(frame.test_id == "b") & (frame.train_id == 13)]
    assert float(row["influence"].iloc[0]) == float(scores[1, 3])


def test_default_ids_and_wide_frame(scores):
    long = scores_to_frame(scores, value_name="removal_effect")
    assert long.columns.tolist() == ["test_id", "train_id", "removal_effect"]
    assert long["test_id"].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    wide = scores_to_frame(scores, long=False)
    assert wide.shape == (3, 5)
    assert wide.index.tolist() == [0, 1, 2]
    assert wide.columns.tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(wide.to_numpy(), scores.numpy())


@pytest.mark.parametrize(
    ("test_ids", "train_ids", "words"),
    [
        ([0, 1], None, "test_ids has 2 ids but the scores have 3 rows"),
        (None, list("abcd"), "train_ids has 4 ids but the scores have 5 columns"),
        ([0, 1, 1], None, "unique, but 1 occurs more than once"),
        ([0, "a", 2], None, "mixes ints and strings"),
        ([0, 1.5, 2], None, "ints or strings, found 1.5"),
        ("abc", None, "single string"),
    ],
)
def test_bad_ids_are_refused(scores, test_ids, train_ids, words, tmp_path):
    with pytest.raises(InputError, match=words):
        scores_to_frame(scores, test_ids, train_ids)
    with pytest.raises(InputError, match=words):
        save_scores(tmp_path / "s.npz", scores, test_ids, train_ids)


def test_bad_scores_and_paths_are_refused(scores, tmp_path):
    with pytest.raises(InputError, match=r"\[m, n\] matrix.*scores\[None\]"):
        scores_to_frame(scores[0])
    with pytest.raises(InputError, match=r"\.csv.*\.npz"):
        save_scores(tmp_path / "s.parquet", scores)
    with pytest.raises(InputError, match="no scores file"):
        load_scores(tmp_path / "missing.csv")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="expected the header test_id,train_id,value"):
        load_scores(tmp_path / "other.csv")
    (tmp_path / "gap.csv").write_text("test_id,train_id,value\n0,0,1.0\n0,1,2.0\n1,0,3.0\n")
    with pytest.raises(InputError, match="3 rows for 2 test and 2 train ids"):
        load_scores(tmp_path / "gap.csv")


@pytest.mark.parametrize("suffix", [".csv", ".npz"])
def test_round_trip_is_exact(scores, tmp_path, suffix):
    path = tmp_path / f"scores{suffix}"
    save_scores(path, scores, ["q1", "q,2", 'q"3'], [5, 6, 7, 8, 9])
    table = load_scores(path)
    assert torch.equal(table.scores, scores)  # bit-exact, also through CSV text
    assert table.test_ids == ["q1", "q,2", 'q"3']
    assert table.train_ids == [5, 6, 7, 8, 9]


def test_csv_is_the_documented_long_form(tmp_path):
    save_scores(tmp_path / "s.csv", torch.tensor([[0.5, -1.0]], dtype=torch.float64))
    assert (tmp_path / "s.csv").read_text() == "test_id,train_id,value\n0,0,0.5\n0,1,-1.0\n"


def test_npz_keeps_dtype_and_metadata(tmp_path):
    scores = torch.tensor([[1.0, 2.0]], dtype=torch.float32)
    save_scores(
        tmp_path / "s.npz", scores, value_name="self_influence_score", metadata={"solver": "X"}
    )
    table = load_scores(tmp_path / "s.npz")
    assert table.scores.dtype == torch.float32
    assert table.metadata["value_name"] == "self_influence_score"
    assert table.metadata["meaning"] == MEANINGS["self_influence_score"]
    assert "more likely mislabelled" in table.metadata["meaning"]
    assert table.metadata["solver"] == "X"
    assert table.to_frame().columns.tolist() == ["test_id", "train_id", "self_influence_score"]
    with pytest.raises(InputError, match="JSON-serialisable"):
        save_scores(tmp_path / "t.npz", scores, metadata={"bad": object()})


def test_every_score_kind_states_its_sign():
    for kind in ("influence", "removal_effect", "self_influence", "self_influence_score"):
        meaning = MEANINGS[kind]
        assert any(word in meaning for word in ("helpful", "unusual")), kind


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(scores, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_scores(tmp_path / "s.csv", scores)
        save_scores(tmp_path / "s.npz", scores)
    finally:
        os.umask(old)
    for name in ("s.csv", "s.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.npz"]  # no temp left


def test_missing_pandas_is_refused_naming_the_extra(scores, monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("No module named 'pandas'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    with pytest.raises(InputError, match=r"pip install infl\[export\]"):
        scores_to_frame(scores)
    save_scores(tmp_path / "s.csv", scores)  # files need no pandas
    assert torch.equal(load_scores(tmp_path / "s.csv").scores, scores)


def test_calculator_influence_frame(logistic):
    p = logistic
    calc = InfluenceCalculator(
        p.model, Objective("bce_with_logits", weight_decay=p.wd), (p.x, p.y), ExactHessian(),
        progress=False, check_minimum=False,
    )  # fmt: skip
    test = (p.x_test[:2], p.y_test[:2])
    train_ids = [f"train-{i}" for i in range(len(p.x))]
    frame = calc.influence_frame(test, ["t0", "t1"], train_ids)
    assert frame.shape == (2 * len(p.x), 3)
    assert frame["influence"].tolist() == calc.influence(test).reshape(-1).tolist()
    assert frame["train_id"].iloc[len(p.x) + 3] == "train-3"
    removal = calc.influence_frame(test, kind="removal_effect", long=False)
    assert np.array_equal(removal.to_numpy(), calc.removal_effect(test).numpy())
    with pytest.raises(InputError, match="kind must be"):
        calc.influence_frame(test, kind="self_influence")
