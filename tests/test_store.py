"""The settings-checked, atomic results store (infl.store)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from infl.errors import StoreMismatchError
from infl.store import Store, write_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_atomic_text_bytes_and_writer(tmp_path):
    write_atomic(tmp_path / "a" / "t.txt", "héllo")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    write_atomic(tmp_path / "c.pt", lambda fh: torch.save({"x": torch.arange(3)}, fh))
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert torch.load(tmp_path / "c.pt", weights_only=True)["x"].tolist() == [0, 1, 2]
    assert not list(tmp_path.rglob("*.tmp"))


def test_write_atomic_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.txt"
    write_atomic(path, "old")

    def broken(fh):
        fh.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        write_atomic(path, broken)
    assert path.read_text() == "old"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_users_normal_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        store = Store(tmp_path / "s", {"a": 1})
        store.save_json("r", {"v": 1})
        store.save_tensors("t", {"x": torch.zeros(2)})
        store.save_arrays("z", {"x": np.zeros(2)})
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for path in (
        tmp_path / "s" / "config.json",
        store.path("r", "json"),
        store.path("t", "pt"),
        store.path("z", "npz"),
    ):
        assert _mode(path) == expected, (path, oct(_mode(path)))


def test_records_round_trip_and_resume(tmp_path):
    settings = {"lr": 0.1, "depths": (1, 2), "name": "x"}
    store = Store(tmp_path, settings, records="cells")
    assert store.load_json("c0") is None
    assert store.load_tensors("t") is None
    assert store.load_arrays("z") is None
    store.save_json("c0", {"acc": 0.5, "ok": True})
    store.save_tensors("t", {"m": torch.tensor([1.0, 2.0]), "steps": 3, "removal": [1, 2]})
    store.save_arrays("z", {"a": np.arange(4), "b": torch.ones(2, 2)})
    assert (tmp_path / "cells" / "c0.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["depths"] == [1, 2]

    again = Store(tmp_path, settings, records="cells")  # tuples compare as their JSON lists
    assert again.load_json("c0") == {"acc": 0.5, "ok": True}
    rec = again.load_tensors("t")
    assert rec is not None
    assert rec["steps"] == 3
    assert rec["removal"] == [1, 2]
    torch.testing.assert_close(rec["m"], torch.tensor([1.0, 2.0]))
    arrays = again.load_arrays("z")
    assert arrays is not None
    np.testing.assert_array_equal(arrays["a"], np.arange(4))
    np.testing.assert_array_equal(arrays["b"], np.ones((2, 2)))
    assert again.names("json") == ["c0"]
    assert again.names("pt") == ["t"]
    assert ("c0", "json") in again
    assert ("c1", "json") not in again


@pytest.mark.parametrize(
    ("changed", "key"),
    [({"lr": 0.2}, "lr"), ({"extra": 1}, "extra"), ({"name": "y", "lr": 0.3}, "lr")],
)
def test_mismatch_is_refused_naming_the_key(tmp_path, changed, key):
    settings = {"lr": 0.1, "name": "x"}
    Store(tmp_path, settings).save_json("r", [1])
    with pytest.raises(StoreMismatchError) as info:
        Store(tmp_path, {**settings, **changed})
    message = str(info.value)
    assert f"{key!r} was" in message
    assert f"{key}=" in message
    assert "new store path" in message
    if len(changed) > 1:
        assert "1 more settings" in message
    # nothing was overwritten
    assert json.loads((tmp_path / "config.json").read_text()) == settings
    assert Store(tmp_path, settings).load_json("r") == [1]


def test_unreadable_settings_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(StoreMismatchError, match="cannot read"):
        Store(tmp_path, {"a": 1})


def test_bad_names_are_refused(tmp_path):
    store = Store(tmp_path, {})
    for name in ("", "../x", ".hidden"):
        with pytest.raises(Exception, match="plain file name"):
            store.save_json(name, 1)
