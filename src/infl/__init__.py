"""infl: influence functions for PyTorch, and the tools to check whether they can be trusted."""

from infl.calculator import InfluenceCalculator
from infl.curvature import estimate_top_eigenvalue
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
from infl.model import ModelWrapper
from infl.objective import (
    Objective,
    logit_measurement,
    loss_measurement,
    margin_measurement,
    supervised_loss,
)
from infl.operators import DampedOperator, DenseOperator, HessianOperator, LinearOperator
from infl.solvers import ConjugateGradient, ExactHessian, FittedSolver, LiSSA, Solver, SolveResult

__version__ = "0.1.0"

__all__ = [
    "ConjugateGradient",
    "DampedOperator",
    "DenseOperator",
    "ExactHessian",
    "FittedSolver",
    "HessianOperator",
    "IndexedData",
    "InflError",
    "InflWarning",
    "InfluenceCalculator",
    "InputError",
    "LiSSA",
    "LinearOperator",
    "ModelStateError",
    "ModelWrapper",
    "NonFiniteError",
    "NotPositiveDefiniteError",
    "Objective",
    "SolveResult",
    "Solver",
    "SolverDivergedError",
    "StoreMismatchError",
    "__version__",
    "estimate_top_eigenvalue",
    "logit_measurement",
    "loss_measurement",
    "margin_measurement",
    "supervised_loss",
]
