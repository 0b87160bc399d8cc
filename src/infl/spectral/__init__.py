"""Spectral maths below the solvers: Lanczos and the solver advice it implies.

Solvers, diagnostics and low-rank methods all import from here; nothing here imports a solver.

* :mod:`~infl.spectral.lanczos` — Lanczos with full reorthogonalisation (extreme Ritz values,
  quick extreme-eigenvalue estimates);
* :mod:`~infl.spectral.advice` — damping, LiSSA scale and depth, CG iterations from the
  extreme eigenvalues, with the one scale margin :data:`SCALE_MARGIN`;
* :mod:`~infl.spectral.damping` — ``damping="auto"``: the rule that reads :math:`\\lambda` off a
  Lanczos (or exact) :math:`\\lambda_{\\min}`, with its margin :data:`AUTO_DAMPING_MARGIN`.
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
from infl.spectral.damping import (
    AUTO_DAMPING_LANCZOS_STEPS,
    AUTO_DAMPING_MARGIN,
    AUTO_DAMPING_RETRIES,
    AutoDamping,
    auto_damping,
    auto_damping_exact,
    auto_damping_from_ritz,
    damping_from_extremes,
)
from infl.spectral.lanczos import LanczosResult, estimate_extreme_eigenvalues, lanczos

__all__ = [
    "AUTO_DAMPING_LANCZOS_STEPS",
    "AUTO_DAMPING_MARGIN",
    "AUTO_DAMPING_RETRIES",
    "DAMPING_RTOL",
    "SCALE_MARGIN",
    "AutoDamping",
    "LanczosResult",
    "SolverAdvice",
    "advice_from_extremes",
    "auto_damping",
    "auto_damping_exact",
    "auto_damping_from_ritz",
    "damping_from_extremes",
    "estimate_extreme_eigenvalues",
    "lanczos",
    "lissa_contraction",
    "lissa_depth",
    "zero_threshold",
]
