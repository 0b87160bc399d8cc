"""Check influence estimates against leave-one-out retraining on a strongly convex model.

L2-regularised logistic regression (float64) on 80 synthetic points: the calculator's
predicted removal effects are compared with the actual change of the test losses after
retraining without each training point (warm start, L-BFGS to ||grad J|| <= 1e-10).

Run:  python examples/ground_truth_convex.py      (a few seconds)
"""

from __future__ import annotations

import torch
from torch import nn

from infl import (
    ExactHessian,
    InfluenceCalculator,
    Objective,
    RetrainConfig,
    fit_to_minimum,
    retrain_ground_truth,
)
from infl.metrics import fidelity_report, top_k_overlap


def main() -> None:
    torch.manual_seed(0)
    n, m, d, wd = 80, 5, 4, 0.01
    X = torch.randn(n + m, d, dtype=torch.float64)
    y = (X @ torch.randn(d, dtype=torch.float64) + 0.5 * torch.randn(n + m) > 0).double()
    train, test = (X[:n], y[:n]), (X[n:], y[n:])

    model = nn.Linear(d, 1).double()
    objective = Objective("bce_with_logits", weight_decay=wd)
    # theta*: the minimum of J (train tightly: influence functions assume a minimum)
    fit_to_minimum(model, objective, train, grad_tol=1e-12)
    model.eval()

    calc = InfluenceCalculator(model, objective, train, ExactHessian(), progress=False)
    predicted = calc.removal_effect(test)  # [m, n]
    truth = retrain_ground_truth(
        model,
        objective,
        train,
        test,
        config=RetrainConfig(grad_tol=1e-10),
        num_threads=1,
        progress=False,
    )
    actual = truth.corrected_change  # [m, n]

    print(f"control run moved the test losses by at most {truth.control_change.abs().max():.1e}")
    for name, value in fidelity_report(predicted, actual).items():
        print(f"{name:>15}: {value:.4f}")
    overlap = [top_k_overlap(predicted[j], actual[j], k=10) for j in range(m)]
    print(f"top-10 overlap per test point: {overlap}")


if __name__ == "__main__":
    main()
