"""``infl audit`` spec: a one-hidden-layer tanh MLP trained with weight decay on iris.

Basu et al. (2021) found influence estimates fairly accurate for shallow networks trained with
weight decay to (near) a minimum: the Hessian may have a few small negative eigenvalues, but
damping handles them and retraining agrees.

    infl audit --spec examples/audit/shallow_mlp_wd.py --out results/audit-shallow
"""

from __future__ import annotations

import torch

from infl import Objective, fit_to_minimum
from infl.studies.datasets import load_iris
from infl.studies.models import mlp

WEIGHT_DECAY = 1e-3


def setup():
    """The trained model (131 parameters), its objective, and the iris data."""
    data = load_iris(seed=0, dtype=torch.float64)
    model = mlp(4, data.num_classes, width=16, depth=1, activation="tanh", seed=0).double()
    objective = Objective("cross_entropy", weight_decay=WEIGHT_DECAY)
    # train to the minimum of the objective (mean loss + weight decay) that influence assumes
    fit_to_minimum(model, objective, data.train, grad_tol=1e-9, num_threads=1)
    return model.eval(), objective, data.train, (data.x_test, data.y_test)
