"""The one-reduction finiteness checks against the elementwise definition."""

from __future__ import annotations

import pytest
import torch

from infl.finite import all_finite, first_nonfinite_row


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite_matches_isfinite(dtype: torch.dtype) -> None:
    x = torch.randn(7, 5, dtype=dtype)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[3, 2] = bad
        assert not all_finite(y)


def test_overflowing_sum_of_finite_values_is_still_finite() -> None:
    huge = torch.full((4, 3), torch.finfo(torch.float32).max)
    assert not torch.isfinite(huge.sum())  # the sum overflows ...
    assert all_finite(huge)  # ... but every entry is finite
    assert first_nonfinite_row(huge) is None


def test_first_nonfinite_row_names_the_first_bad_row() -> None:
    x = torch.randn(6, 4, dtype=torch.float64)
    assert first_nonfinite_row(x) is None
    x[4, 1] = float("nan")
    x[2, 0] = float("inf")
    x[1] = torch.finfo(torch.float64).max  # overflows its row sum, but finite
    assert first_nonfinite_row(x) == 2


def test_empty_and_integer_tensors_are_finite() -> None:
    assert all_finite(torch.empty(0))
    assert all_finite(torch.arange(5))
    assert first_nonfinite_row(torch.empty(0, 3)) is None
