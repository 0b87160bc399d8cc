"""``infl audit`` spec: L2-regularised multinomial logistic regression on iris (convex).

The textbook case where influence functions are exact up to second order: the objective is
strongly convex, training reaches the minimum, and the audit should call every point
*trustworthy*.

    infl audit --spec examples/audit/logistic_l2.py --out results/audit-logistic
"""

from __future__ import annotations

import torch

from infl import Objective, fit_to_minimum
from infl.studies.datasets import load_iris
from infl.studies.models import mlp

WEIGHT_DECAY = 1e-2


def setup():
    """The trained model, its objective, and the iris training and test data."""
    data = load_iris(seed=0, dtype=torch.float64)
    model = mlp(4, data.num_classes, width=1, depth=0, seed=0).double()
    objective = Objective("cross_entropy", weight_decay=WEIGHT_DECAY)
    # train to the minimum of the objective (mean loss + weight decay) that influence assumes
    fit_to_minimum(model, objective, data.train, grad_tol=1e-9, num_threads=1)
    return model.eval(), objective, data.train, (data.x_test, data.y_test)
