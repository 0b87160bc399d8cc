"""Progress bars: a bar only when asked for, the same items either way."""

from __future__ import annotations

from infl.progress import progress_iter


def test_a_disabled_bar_is_the_items_themselves_and_an_enabled_one_shows(capsys) -> None:
    items = [(0, "a"), (3, "b")]
    assert list(progress_iter(items, desc="x", enabled=False)) == items
    assert capsys.readouterr().err == ""
    assert list(progress_iter(iter(items), desc="scoring", enabled=True, total=2)) == items
    assert "scoring" in capsys.readouterr().err
