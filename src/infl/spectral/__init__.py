"""Spectral maths below the solvers: Lanczos and the solver advice it implies.

Solvers, diagnostics and low-rank methods all import from here; nothing here imports a solver.

* :mod:`~infl.spectral.lanczos` — Lanczos with full reorthogonalisation (extreme Ritz values,
  quick extreme-eigenvalue estimates);
* :mod:`~infl.spectral.advice` — damping, LiSSA scale and depth, CG iterations from the
  extreme eigenvalues, with the one scale margin :data:`SCALE_MARGIN`.
"""

from infl.spectral.advice import (
    DAMPING_RTOL,
    SCALE_MARGIN,
    SolverAdvice,
    advice_from_extremes,
    lissa_contraction,
    lissa_depth,
    zero_threshold,
)
from infl.spectral.lanczos import LanczosResult, estimate_extreme_eigenvalues, lanczos

__all__ = [
    "DAMPING_RTOL",
    "SCALE_MARGIN",
    "LanczosResult",
    "SolverAdvice",
    "advice_from_extremes",
    "estimate_extreme_eigenvalues",
    "lanczos",
    "lissa_contraction",
    "lissa_depth",
    "zero_threshold",
]
