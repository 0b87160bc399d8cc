"""infl: influence functions for PyTorch, and the tools to check whether they can be trusted."""

from infl.calculator import InfluenceCalculator
from infl.correction import (
    CorrectionResult,
    CorrectionSummary,
    compare_rankings,
    correct_prediction,
)
from infl.curvature import estimate_top_eigenvalue
from infl.data import IndexedData
from infl.diagnostics import (
    SolverAdvice,
    SolverAgreement,
    Spectrum,
    advise,
    compare_inverse_hvps,
    hessian_spectrum,
    lanczos,
    lissa_trace,
    solver_agreement,
)
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
from infl.fading import FadingResult, influence_fading
from infl.ground_truth import GroundTruth, RetrainConfig, retrain_ground_truth, retrain_subsets
from infl.metrics import (
    kendall,
    linear_datamodeling_score,
    pearson,
    precision_at_k,
    relative_error,
    sign_agreement,
    spearman,
    taylor_gap,
    top_k_overlap,
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
from infl.selection import (
    at_influence_percentile,
    at_loss_percentile,
    highest_loss,
    top_k_influence,
)
from infl.solvers import ConjugateGradient, ExactHessian, FittedSolver, LiSSA, Solver, SolveResult

__version__ = "0.1.0"

__all__ = [
    "ConjugateGradient",
    "CorrectionResult",
    "CorrectionSummary",
    "DampedOperator",
    "DenseOperator",
    "ExactHessian",
    "FadingResult",
    "FittedSolver",
    "GroundTruth",
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
    "RetrainConfig",
    "SolveResult",
    "Solver",
    "SolverAdvice",
    "SolverAgreement",
    "SolverDivergedError",
    "Spectrum",
    "StoreMismatchError",
    "__version__",
    "advise",
    "at_influence_percentile",
    "at_loss_percentile",
    "compare_inverse_hvps",
    "compare_rankings",
    "correct_prediction",
    "estimate_top_eigenvalue",
    "hessian_spectrum",
    "highest_loss",
    "influence_fading",
    "kendall",
    "lanczos",
    "linear_datamodeling_score",
    "lissa_trace",
    "logit_measurement",
    "loss_measurement",
    "margin_measurement",
    "pearson",
    "precision_at_k",
    "relative_error",
    "retrain_ground_truth",
    "retrain_subsets",
    "sign_agreement",
    "solver_agreement",
    "spearman",
    "supervised_loss",
    "taylor_gap",
    "top_k_influence",
    "top_k_overlap",
]
