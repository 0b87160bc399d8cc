"""``infl audit`` spec: a deep, narrow ReLU MLP trained without weight decay on iris.

Basu et al.'s (2021) fragile setting: depth 8, width 5, no weight decay, trained with SGD for
a fixed number of epochs rather than to a minimum. Their influence estimates were poor here;
the audit should not call it *trustworthy*, and should say why (not a minimum, negative
curvature, retraining disagreeing).

    infl audit --spec examples/audit/deep_relu_mlp.py --out results/audit-deep
"""

from __future__ import annotations

import torch

from infl import Objective
from infl.studies.datasets import load_iris
from infl.studies.models import mlp

STEPS = 2000
LEARNING_RATE = 0.05


def setup():
    """The SGD-trained model (253 parameters), its objective, and the iris data."""
    data = load_iris(seed=0, dtype=torch.float64)
    model = mlp(4, data.num_classes, width=5, depth=8, activation="relu", seed=0).double()
    objective = Objective("cross_entropy")  # no weight decay, as trained
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    x, y = data.x_train, data.y_train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains faster on one thread
    try:
        for _ in range(STEPS):  # full-batch SGD for a fixed budget, not to a minimum
            opt.zero_grad()
            objective.per_example_loss(model, (x, y)).mean().backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), objective, data.train, (data.x_test, data.y_test)
