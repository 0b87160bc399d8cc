"""Retraining ground truth: what actually happens to a test measurement when data is removed.

:func:`fit_to_minimum` trains a model to the minimum of the objective influence assumes (with
the L-BFGS engine of every ``"lbfgs"`` retrain); :func:`retrain_ground_truth` retrains without
each removal (leave-one-out or groups) and reports the actual change of every test measurement;
:func:`retrain_subsets` retrains on random fractions of the data (for the linear datamodeling
score). The protocol of every retrain is one :class:`RetrainConfig`. The package never imports
:mod:`infl.calculator` or :mod:`infl.model`: the ground truth shares no code path
with the influence estimates it checks.

Modules: :mod:`~infl.retrain.fit` (:func:`fit_to_minimum` and its L-BFGS engine),
:mod:`~infl.retrain.config` (the protocol), :mod:`~infl.retrain.records` (results),
:mod:`~infl.retrain.removals` (validating removals), :mod:`~infl.retrain.single` (one retrain
through :mod:`torch.optim`), :mod:`~infl.retrain.batched` (many SGD runs under one ``vmap``,
or as batched matrix products for Linear/activation MLPs: :mod:`~infl.retrain.stacked_linear`),
:mod:`~infl.retrain.grouped` (full-batch SGD retrains on that engine),
:mod:`~infl.retrain.fingerprint` (what a store of retrains is keyed by) and
:mod:`~infl.retrain.ground_truth` (the public functions).
"""

from infl.retrain.config import RetrainConfig
from infl.retrain.fit import FitResult, fit_to_minimum
from infl.retrain.ground_truth import retrain_ground_truth, retrain_subsets
from infl.retrain.records import GroundTruth, SubsetRetrain
from infl.retrain.removals import normalize_removals

__all__ = [
    "FitResult",
    "GroundTruth",
    "RetrainConfig",
    "SubsetRetrain",
    "fit_to_minimum",
    "normalize_removals",
    "retrain_ground_truth",
    "retrain_subsets",
]
