"""The spec files of examples/audit keep the ``setup()`` contract of ``infl audit --spec``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from infl.audit import load_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "audit"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "weight_decay", "num_params"),
    [("logistic_l2", 1e-2, 15), ("shallow_mlp_wd", 1e-3, 131), ("deep_relu_mlp", 0.0, 253)],
)
def test_example_spec_returns_a_trained_model_and_its_data(name, weight_decay, num_params):
    model, objective, train, test = load_spec(EXAMPLES / f"{name}.py")
    assert not model.training
    assert objective.weight_decay == weight_decay
    assert sum(p.numel() for p in model.parameters()) == num_params
    x, y = train
    assert x.shape == (120, 4)
    assert x.dtype == torch.float64
    assert len(test[0]) == 30
    with torch.no_grad():
        accuracy = (model(x).argmax(dim=1) == y).double().mean()
    assert accuracy > 0.9  # trained, not a fresh initialisation
