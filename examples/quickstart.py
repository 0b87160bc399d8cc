"""Quickstart: which training digits drive a prediction, and do the estimates hold up?

Trains an L2-regularised softmax regression on the digits shipped with infl (scikit-learn's
8x8 images, 1,797 examples; no download) to the minimum of its objective (infl.fit_to_minimum),
explains the three worst-predicted test digits with
infl.InfluenceCalculator (conjugate gradient inverse-HVPs), then checks the predictions
against actual leave-one-out retraining of the most influential training points.

Run:  python examples/quickstart.py        (about 20 s on 2 CPU cores)
"""

from __future__ import annotations

import time

import torch
from scipy import stats
from torch import nn

import infl
from infl.studies.datasets import load_digits

WEIGHT_DECAY = 1e-3
torch.manual_seed(0)
torch.set_default_dtype(torch.float64)


def main() -> None:
    split = load_digits(seed=0, test_fraction=0.44, dtype=torch.float64)  # 1,005 train
    x_train, y_train, x_test, y_test = split.x_train, split.y_train, split.x_test, split.y_test

    # theta*: the minimum of mean cross-entropy + (weight_decay/2)||theta||^2 (influence assumes it)
    objective = infl.Objective("cross_entropy", weight_decay=WEIGHT_DECAY)
    model = nn.Linear(64, 10)
    infl.fit_to_minimum(model, objective, (x_train, y_train), grad_tol=1e-8, max_iter=500)
    model.eval()
    with torch.no_grad():
        test_losses = nn.functional.cross_entropy(model(x_test), y_test, reduction="none")
        accuracy = (model(x_test).argmax(1) == y_test).double().mean()
    print(f"softmax regression on digits: n={len(y_train)}, p=650, test accuracy {accuracy:.3f}")

    worst = test_losses.argsort(descending=True)[:3]
    test = (x_test[worst], y_test[worst])

    calc = infl.InfluenceCalculator(
        model,
        objective,
        (x_train, y_train),
        infl.ConjugateGradient(rtol=1e-8, max_iter=300),
        progress=False,
    )
    start = time.perf_counter()
    effects = calc.removal_effect(test)  # [3, n]: predicted change of each test loss
    solve = calc.inverse_hvp(test)
    print(
        f"removal effects of all {len(y_train)} training points on 3 test points in "
        f"{time.perf_counter() - start:.2f} s (CG: {solve.iterations} iterations, "
        f"max relative residual {float(solve.residual_norms.max()):.1e})"
    )

    for row, j in enumerate(worst.tolist()):
        helpful = effects[row].argsort(descending=True)[:3].tolist()
        print(
            f"  test #{j} (label {int(y_test[j])}, loss {float(test_losses[j]):.2f}): removing "
            f"training {helpful} (labels {y_train[helpful].tolist()}) would raise its loss most"
        )

    # Verify on the first test point: retrain without each of the 20 most influential points.
    row = 0
    candidates = effects[row].abs().argsort(descending=True)[:20]
    actual = []
    start = time.perf_counter()
    for i in candidates.tolist():
        keep = torch.arange(len(y_train)) != i
        retrained = nn.Linear(64, 10)
        retrained.load_state_dict(model.state_dict())  # warm start from theta*
        infl.fit_to_minimum(retrained, objective, (x_train[keep], y_train[keep]), grad_tol=1e-8)
        retrained.eval()
        with torch.no_grad():
            new_loss = nn.functional.cross_entropy(retrained(test[0][:1]), test[1][:1])
        actual.append(float(new_loss - test_losses[worst[row]]))
    predicted = effects[row, candidates].numpy()
    pearson = stats.pearsonr(predicted, actual).statistic
    spearman = stats.spearmanr(predicted, actual).statistic
    print(
        f"leave-one-out check on the 20 most influential points ({time.perf_counter() - start:.1f}"
        f" s of retraining): Pearson {pearson:.3f}, Spearman {spearman:.3f}"
    )


if __name__ == "__main__":
    main()
