"""infl: influence functions for PyTorch, and the tools to check whether they can be trusted.

The top level holds the core: the objective and measurements, data, the functional model, the
curvature operators, the inverse-HVP solvers, the :class:`InfluenceCalculator`, retraining
ground truth (and :func:`fit_to_minimum`, training to the minimum influence assumes) and the
errors. Everything else lives in a namespace of its own:

* :mod:`infl.metrics` — fidelity metrics (Pearson, Spearman, top-k overlap, LDS, Taylor gap);
* :mod:`infl.selection` — choosing test points (highest loss, loss percentiles, top influence);
* :mod:`infl.diagnostics` — spectrum, solver advice and agreement;
* :mod:`infl.distributed` — ``torch.distributed``: training-data shards, all-reduced curvature;
* :mod:`infl.retrain` — the retraining engine behind :func:`retrain_ground_truth`;
* :mod:`infl.experiments` — influence over time and mis-prediction correction;
* :mod:`infl.studies` — the papers' studies, their datasets and models;
* :mod:`infl.plotting` — figures (``pip install infl[plot]``).
"""

from infl import diagnostics, distributed, experiments, metrics, selection
from infl.calculator import InfluenceCalculator
from infl.data import IndexedData
from infl.errors import (
    InflError,
    InflWarning,
    InputError,
    ModelStateError,
    NonFiniteError,
    NotPositiveDefiniteError,
    SolverDivergedError,
    StoreMismatchError,
)
from infl.gradient_store import GradientStore
from infl.mixed_precision import MixedPrecisionOperator
from infl.model import ModelWrapper
from infl.objective import (
    Objective,
    logit_measurement,
    loss_measurement,
    margin_measurement,
    supervised_loss,
)
from infl.operators import (
    DampedOperator,
    DenseOperator,
    GaussNewtonOperator,
    HessianOperator,
    LinearOperator,
)
from infl.retrain import (
    GroundTruth,
    RetrainConfig,
    fit_to_minimum,
    retrain_ground_truth,
    retrain_subsets,
)
from infl.score_store import ScoreStore, StoreWriteError
from infl.solvers import (
    EKFAC,
    KFAC,
    Arnoldi,
    ConjugateGradient,
    ExactHessian,
    FittedSolver,
    LiSSA,
    Solver,
    SolveResult,
)

__version__ = "0.1.0"

__all__ = [
    "EKFAC",
    "KFAC",
    "Arnoldi",
    "ConjugateGradient",
    "DampedOperator",
    "DenseOperator",
    "ExactHessian",
    "FittedSolver",
    "GaussNewtonOperator",
    "GradientStore",
    "GroundTruth",
    "HessianOperator",
    "IndexedData",
    "InflError",
    "InflWarning",
    "InfluenceCalculator",
    "InputError",
    "LiSSA",
    "LinearOperator",
    "MixedPrecisionOperator",
    "ModelStateError",
    "ModelWrapper",
    "NonFiniteError",
    "NotPositiveDefiniteError",
    "Objective",
    "RetrainConfig",
    "ScoreStore",
    "SolveResult",
    "Solver",
    "SolverDivergedError",
    "StoreMismatchError",
    "StoreWriteError",
    "__version__",
    "diagnostics",
    "distributed",
    "experiments",
    "fit_to_minimum",
    "logit_measurement",
    "loss_measurement",
    "margin_measurement",
    "metrics",
    "retrain_ground_truth",
    "retrain_subsets",
    "selection",
    "supervised_loss",
]
