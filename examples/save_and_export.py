"""Save a fitted solver, load it with no Hessian-vector product, and export scores.

Trains a softmax regression on the bundled 8x8 digits (shipped with infl; no download) to the
minimum of its objective (``infl.fit_to_minimum``), fits
``ExactHessian`` (650 HVPs and an eigendecomposition), saves the fit, loads it into a fresh
calculator (0 HVPs, identical scores), then writes the scores of a few test digits to CSV and
NPZ and, when pandas is installed, shows them as a DataFrame. Runs in a few seconds on a CPU.

    python examples/save_and_export.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

import infl
from infl.export import load_scores, save_scores
from infl.studies.datasets import load_digits

WEIGHT_DECAY = 1e-2


def main() -> None:
    torch.set_num_threads(1)
    split = load_digits(seed=0, test_fraction=0.5, dtype=torch.float64)
    objective = infl.Objective("cross_entropy", weight_decay=WEIGHT_DECAY)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10).double()
    infl.fit_to_minimum(model, objective, split.train, grad_tol=1e-8)  # theta*: influence needs it
    model.eval()
    test = (split.x_test[:3], split.y_test[:3])
    folder = Path(tempfile.mkdtemp(prefix="infl-example-"))

    start = time.perf_counter()
    calc = infl.InfluenceCalculator(
        model, objective, split.train, infl.ExactHessian(damping=1e-3), progress=False
    )
    scores = calc.influence(test)
    fit_hvps = calc.operator.num_matvecs
    calc.save(folder / "fit.pt")
    print(f"fitted with {fit_hvps} HVPs in {time.perf_counter() - start:.1f} s; saved")

    start = time.perf_counter()
    loaded = infl.InfluenceCalculator.load(
        folder / "fit.pt", model, objective, split.train, progress=False
    )
    same = torch.equal(loaded.influence(test), scores)
    print(
        f"loaded in {time.perf_counter() - start:.1f} s with {loaded.operator.num_matvecs} HVPs; "
        f"identical scores: {same}"
    )

    suspects = loaded.self_influence_score().argsort(descending=True)[:5]
    print(f"highest self-influence scores (most unusual training digits): {suspects.tolist()}")

    train_ids = [f"train-{i}" for i in range(loaded.num_train)]
    test_ids = ["digit-a", "digit-b", "digit-c"]
    save_scores(folder / "scores.csv", scores, test_ids, train_ids)
    save_scores(
        folder / "scores.npz", scores, test_ids, train_ids, metadata=calc.fitted_solver().info
    )
    table = load_scores(folder / "scores.npz")
    print(f"wrote {folder / 'scores.csv'} and scores.npz; NPZ says: {table.metadata['meaning']}")
    try:
        frame = loaded.influence_frame(test, test_ids, train_ids)
    except infl.InputError as err:  # pandas is optional
        print(f"(no DataFrame: {err})")
        return
    print(frame.sort_values("influence").head(5).to_string(index=False))


if __name__ == "__main__":
    main()
