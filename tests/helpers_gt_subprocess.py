"""Run a stored retraining job; the resume test kills this process part-way through.

Usage: python helpers_gt_subprocess.py STORE_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_gt import RESUME_SETTINGS, resume_problem
from infl import Objective
from infl.ground_truth import retrain_ground_truth


def main() -> None:
    import torch

    torch.set_num_threads(1)
    model, train, test, removals = resume_problem()
    objective = Objective(RESUME_SETTINGS["loss"], weight_decay=RESUME_SETTINGS["wd"])
    retrain_ground_truth(
        model,
        objective,
        train,
        test,
        removals,
        store=sys.argv[1],
        progress=False,
        **RESUME_SETTINGS["protocol"],
    )
    print("finished", flush=True)


if __name__ == "__main__":
    main()
