"""What the attribution baselines share: argument checks, test gradients, streamed train passes.

Every baseline scores ``[m, n]`` (test-major) with the sign of
:meth:`infl.InfluenceCalculator.influence`: **negative = helpful** (up-weighting training
example ``i`` lowers the test measurement ``j``), positive = harmful. Training gradients are
the calculator's :math:`g_i = \\nabla\\ell(z_i) + \\lambda_{wd}\\theta` and test gradients are
those of the measurement :math:`\\nabla f(z_j)` (the loss by default).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from infl.chunking import ChunkSize, resolve_chunk_size
from infl.data import IndexedData, as_indexed
from infl.errors import InputError
from infl.model import ModelWrapper, as_training_data
from infl.objective import Objective, PerExampleFn, loss_measurement


def setup(
    model: Any, objective: Objective, train: Any, test: Any, measurement: PerExampleFn | None
) -> tuple[ModelWrapper, IndexedData, IndexedData, PerExampleFn]:
    """The wrapper, the training and test data as :class:`IndexedData`, and the measurement."""
    if not isinstance(objective, Objective):
        raise InputError(
            f"objective must be an infl.Objective, got {type(objective).__name__}; pass the "
            "objective the model was trained with, e.g. infl.Objective('cross_entropy', 1e-3)"
        )
    wrapper = ModelWrapper(model, objective)
    train_data = as_training_data(train, "training data")
    test_data = as_indexed(test, "test data")
    if len(train_data) == 0 or len(test_data) == 0:
        raise InputError(
            f"need at least one training and one test example, got n={len(train_data)} and "
            f"m={len(test_data)}"
        )
    wrapper.check_data(train_data)
    fn = measurement if measurement is not None else loss_measurement(objective)
    return wrapper, train_data, test_data, fn


def chunk_of(wrapper: ModelWrapper, chunk_size: ChunkSize) -> int:
    """``chunk_size`` as a number for this model (``"auto"``: :mod:`infl.chunking`)."""
    return resolve_chunk_size(chunk_size, wrapper.activation_bytes, wrapper.device)


def test_grads(
    wrapper: ModelWrapper, measurement: PerExampleFn, test: IndexedData, chunk_size: ChunkSize
) -> torch.Tensor:
    """:math:`\\nabla f(z_j)` for every test example: ``[m, p]``."""
    chunks = test.chunks(chunk_of(wrapper, chunk_size))
    return torch.cat([wrapper.per_example_grads(measurement, batch) for _, batch in chunks])


def train_grads(
    wrapper: ModelWrapper, train: IndexedData, chunk_size: ChunkSize
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, g[start:start+b])`` streamed over the training data (``[n, p]`` never kept)."""
    return wrapper.iter_train_grads(train, chunk_of(wrapper, chunk_size))
