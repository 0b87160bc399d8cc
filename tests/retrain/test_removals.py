"""Validating and normalising removals (infl.retrain.removals)."""

from __future__ import annotations

import numpy as np
import torch

from infl.retrain import normalize_removals


def test_normalize_removals():
    assert normalize_removals(None, 3) == [(0,), (1,), (2,)]
    assert normalize_removals(torch.tensor([2, 0]), 3) == [(2,), (0,)]
    assert normalize_removals(np.array([[2, 0], [1, 2]]), 3) == [(0, 2), (1, 2)]
    assert normalize_removals(1, 3) == [(1,)]
