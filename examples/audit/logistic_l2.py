"""``infl audit`` spec: L2-regularised multinomial logistic regression on iris (convex).

The textbook case where influence functions are exact up to second order: the objective is
strongly convex, training reaches the minimum, and the audit should call every point
*trustworthy*.

    infl audit --spec examples/audit/logistic_l2.py --out results/audit-logistic
"""

from __future__ import annotations

import torch

from infl import Objective
from infl.studies.datasets import load_iris
from infl.studies.models import mlp

WEIGHT_DECAY = 1e-2


def fit(model: torch.nn.Module, objective: Objective, x: torch.Tensor, y: torch.Tensor) -> None:
    """Full-batch L-BFGS on mean loss + (weight_decay/2)|theta|^2, to a tight gradient."""
    params = list(model.parameters())
    opt = torch.optim.LBFGS(
        params, max_iter=2000, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective.per_example_loss(model, (x, y)).mean()
        loss = loss + 0.5 * objective.weight_decay * sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains faster on one thread
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)


def setup():
    """The trained model, its objective, and the iris training and test data."""
    data = load_iris(seed=0, dtype=torch.float64)
    model = mlp(4, data.num_classes, width=1, depth=0, seed=0).double()
    objective = Objective("cross_entropy", weight_decay=WEIGHT_DECAY)
    fit(model, objective, data.x_train, data.y_train)
    return model.eval(), objective, data.train, (data.x_test, data.y_test)
