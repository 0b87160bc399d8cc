"""Curvature diagnostics: can an influence estimate be trusted for this model?

* :mod:`~infl.diagnostics.spectrum` — extreme (Lanczos) or all (dense) eigenvalues of the
  damped Hessian, negative-eigenvalue count and mass, condition number.
* :mod:`~infl.diagnostics.advice` — the damping, LiSSA scale/depth and CG iterations that the
  spectrum implies (the maths is :mod:`infl.spectral`, which the solvers use too).
* :mod:`~infl.diagnostics.agreement` — convergence traces and agreement between solvers.

Plots of all three live in :mod:`infl.plotting` (``pip install infl[plot]``).
"""

from infl.diagnostics.advice import (
    SCALE_MARGIN,
    SolverAdvice,
    advice_from_extremes,
    advise,
    lissa_contraction,
    lissa_depth,
)
from infl.diagnostics.agreement import (
    Agreement,
    LissaTrace,
    SolverAgreement,
    compare_inverse_hvps,
    lissa_trace,
    residual_trace,
    solver_agreement,
    spearman_rows,
)
from infl.diagnostics.spectrum import (
    DENSE_MAX_PARAMS,
    LanczosResult,
    Spectrum,
    eigsh_extremes,
    estimate_extreme_eigenvalues,
    hessian_spectrum,
    lanczos,
)

__all__ = [
    "DENSE_MAX_PARAMS",
    "SCALE_MARGIN",
    "Agreement",
    "LanczosResult",
    "LissaTrace",
    "SolverAdvice",
    "SolverAgreement",
    "Spectrum",
    "advice_from_extremes",
    "advise",
    "compare_inverse_hvps",
    "eigsh_extremes",
    "estimate_extreme_eigenvalues",
    "hessian_spectrum",
    "lanczos",
    "lissa_contraction",
    "lissa_depth",
    "lissa_trace",
    "residual_trace",
    "solver_agreement",
    "spearman_rows",
]
