"""Solver advice from the spectrum of :math:`H`: :func:`advise`.

The maths (damping, LiSSA scale and depth, CG iterations from the extreme eigenvalues) lives in
:mod:`infl.spectral.advice`, below the solvers; this module runs a spectrum first when given an
operator.
"""

from __future__ import annotations

import math

from infl.diagnostics.spectrum import Spectrum, hessian_spectrum
from infl.errors import InputError
from infl.operators import LinearOperator
from infl.spectral.advice import (
    DAMPING_RTOL,
    SCALE_MARGIN,
    SolverAdvice,
    advice_from_extremes,
    lissa_contraction,
    lissa_depth,
)


def advise(
    source: Spectrum | LinearOperator,
    *,
    damping: float | None = None,
    tol: float = 1e-3,
    scale_margin: float = SCALE_MARGIN,
    damping_rtol: float = DAMPING_RTOL,
    k: int = 5,
    seed: int = 0,
) -> SolverAdvice:
    """Damping, LiSSA scale/depth and CG iterations from the spectrum of :math:`H`.

    Parameters
    ----------
    source
        A :class:`~infl.diagnostics.Spectrum` (its ``damping`` is subtracted to recover
        :math:`H`), or the operator :math:`H` itself, in which case
        :func:`~infl.diagnostics.hessian_spectrum` is run on it (dense for small ``p``, else
        Lanczos: about 60 HVPs).
    damping
        The :math:`\\lambda` you intend to use; default: ``suggested_damping``.
    tol
        Target relative residual (LiSSA's and CG's ``rtol``).
    scale_margin
        Advised :math:`\\sigma = \\text{scale\\_margin}\\cdot\\mu_{\\max}`; must be > 0.5 for
        convergence, and >= 1 is recommended (monotone iterates and slack for an
        underestimated :math:`\\mu_{\\max}`).
    damping_rtol
        How far above ``min_damping`` the suggestion goes, relative to :math:`\\lambda_{\\max}(H)`.
    k, seed
        Passed to :func:`hessian_spectrum` when ``source`` is an operator.

    Returns
    -------
    SolverAdvice

    Examples
    --------
    >>> import torch
    >>> from infl.operators import DenseOperator
    >>> H = DenseOperator(torch.diag(torch.tensor([-0.5, 1.0, 10.0], dtype=torch.float64)))
    >>> a = advise(H, tol=1e-6)
    >>> a.min_damping, a.suggested_damping, round(a.scale, 4), a.depth
    (0.5, 0.51, 12.612, 17418)
    """
    if not (0 < tol < 1):
        raise InputError(f"tol must be in (0, 1), got {tol}")
    if not (math.isfinite(scale_margin) and scale_margin > 0.5):
        raise InputError(
            f"scale_margin must exceed 0.5 (LiSSA diverges for scale < lambda_max/2), got "
            f"{scale_margin}"
        )
    if not (math.isfinite(damping_rtol) and damping_rtol >= 0):
        raise InputError(f"damping_rtol must be a finite number >= 0, got {damping_rtol}")
    if damping is not None and not (math.isfinite(damping) and damping >= 0):
        raise InputError(f"damping must be a finite number >= 0, got {damping}")
    if isinstance(source, Spectrum):
        spectrum = source
    elif isinstance(source, LinearOperator):
        spectrum = hessian_spectrum(source, k=k, seed=seed)
    else:
        raise InputError(
            f"advise needs a Spectrum or a LinearOperator, got {type(source).__name__}"
        )
    return advice_from_extremes(
        spectrum.lambda_max - spectrum.damping,
        spectrum.lambda_min - spectrum.damping,
        damping=damping,
        tol=tol,
        scale_margin=scale_margin,
        damping_rtol=damping_rtol,
        exact=spectrum.full,
    )


__all__ = [
    "DAMPING_RTOL",
    "SCALE_MARGIN",
    "SolverAdvice",
    "advice_from_extremes",
    "advise",
    "lissa_contraction",
    "lissa_depth",
]
