"""Solver hyperparameters read off the extreme eigenvalues: the maths, with no solver or
diagnostic attached (both import it).

With :math:`A = H + \\lambda I` and its extreme eigenvalues :math:`\\mu_{\\min} \\le \\mu_{\\max}`:

* **Damping.** :math:`A` is positive definite iff :math:`\\lambda > -\\lambda_{\\min}(H)`, so the
  smallest damping that works is :math:`\\max(0, -\\lambda_{\\min}(H))` (strictly above it).
* **LiSSA scale.** The recursion :math:`x \\leftarrow b + x - A x/\\sigma` multiplies the error in
  eigendirection :math:`i` by :math:`1 - \\mu_i/\\sigma`; it converges iff every
  :math:`\\mu_i \\in (0, 2\\sigma)`, i.e. :math:`\\sigma > \\mu_{\\max}/2`. The advice is
  :math:`\\sigma = 1.2\\,\\mu_{\\max}` (at least :math:`\\mu_{\\max}`: all factors then lie in
  :math:`[0, 1)`, so the iterates grow monotonically and never oscillate).
* **LiSSA depth.** After :math:`T` steps both the relative residual and the relative error are at
  most :math:`\\rho^{T}` with :math:`\\rho = \\max(|1-\\mu_{\\min}/\\sigma|,
  |1-\\mu_{\\max}/\\sigma|)`, so :math:`T = \\lceil \\ln(1/\\text{tol}) / \\ln(1/\\rho) \\rceil
  \\approx (\\sigma/\\mu_{\\min}) \\ln(1/\\text{tol})`.
* **CG iterations.** :math:`\\lceil \\tfrac12\\sqrt{\\kappa}\\,\\ln(2/\\text{tol}) \\rceil` with
  :math:`\\kappa = \\mu_{\\max}/\\mu_{\\min}` (the classical bound; CG is usually faster).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALE_MARGIN = 1.2
"""The one LiSSA scale margin: the advised (and ``scale="auto"``) :math:`\\sigma` is this
multiple of :math:`\\mu_{\\max}`; at least 1 keeps every factor :math:`1-\\mu_i/\\sigma` in
:math:`[0, 1)` and leaves slack for a Lanczos :math:`\\mu_{\\max}` that is a lower bound."""

DAMPING_RTOL = 1e-3
"""Suggested damping adds this fraction of :math:`\\lambda_{\\max}(H)` above the minimum."""


@dataclass(frozen=True)
class SolverAdvice:
    """Hyperparameters for the inverse-HVP solvers, derived from the spectrum of :math:`H`.

    Attributes
    ----------
    hessian_max, hessian_min
        :math:`\\lambda_{\\max}(H)`, :math:`\\lambda_{\\min}(H)` (undamped).
    min_damping
        :math:`\\max(0, -\\lambda_{\\min}(H))`: :math:`H + \\lambda I` is positive definite
        for every :math:`\\lambda` strictly above it.
    suggested_damping
        ``min_damping + damping_rtol * |lambda_max(H)|`` when :math:`H` is not safely positive
        definite, else 0.
    damping
        The :math:`\\lambda` the rest of the advice is for (the one asked about, or
        ``suggested_damping``).
    mu_max, mu_min
        Extreme eigenvalues of :math:`A = H + \\lambda I`.
    positive_definite
        :math:`\\mu_{\\min} > 0`.
    condition_number
        :math:`\\kappa = \\mu_{\\max}/\\mu_{\\min}` (``inf`` if not positive definite).
    scale_lower_bound
        :math:`\\mu_{\\max}/2`: LiSSA diverges for any scale below it.
    scale
        Advised LiSSA scale :math:`\\sigma` = ``scale_margin * mu_max``.
    contraction
        :math:`\\rho`, the per-step error factor of LiSSA at ``scale`` (``>= 1``: no convergence).
    tol
        The target relative residual / error.
    depth
        LiSSA steps :math:`T` for :math:`\\rho^T \\le` ``tol`` (``None`` if it cannot converge).
    cg_iterations
        Upper bound on CG iterations for ``tol`` (``None`` if not positive definite).
    exact
        Whether the eigenvalues were exact (full dense spectrum); Lanczos estimates make
        ``hessian_max`` a lower bound and ``hessian_min`` an upper bound.
    """

    hessian_max: float
    hessian_min: float
    min_damping: float
    suggested_damping: float
    damping: float
    mu_max: float
    mu_min: float
    positive_definite: bool
    condition_number: float
    scale_lower_bound: float
    scale: float
    contraction: float
    tol: float
    depth: int | None
    cg_iterations: int | None
    exact: bool

    def summary(self) -> str:
        """The advice as a few sentences (quoted by the solvers' error messages)."""
        parts = [
            f"lambda_max(H) ~= {self.hessian_max:.4g}, lambda_min(H) ~= {self.hessian_min:.4g}"
            + ("" if self.exact else " (Lanczos estimates)")
            + "."
        ]
        if self.min_damping > 0:
            parts.append(
                f"H is indefinite: use damping > {self.min_damping:.4g} (for example "
                f"{self.suggested_damping:.3g})."
            )
        if self.positive_definite:
            parts.append(
                f"With damping={self.damping:g}: condition number ~ {self.condition_number:.3g}; "
                f"LiSSA converges for scale > {self.scale_lower_bound:.4g}, advised scale="
                f"{self.scale:.4g} with depth >= {self.depth} for tol={self.tol:g}; CG needs at "
                f"most ~{self.cg_iterations} iterations."
            )
        else:
            parts.append(
                f"With damping={self.damping:g}, H + damping*I has eigenvalue "
                f"{self.mu_min:.4g} <= 0: no LiSSA scale or depth converges and CG may fail."
            )
        return " ".join(parts)


def lissa_depth(mu_min: float, mu_max: float, scale: float, tol: float) -> int | None:
    """Steps :math:`T` with :math:`\\rho^T \\le \\text{tol}`, :math:`\\rho` the LiSSA contraction.

    :math:`\\rho = \\max(|1 - \\mu_{\\min}/\\sigma|, |1 - \\mu_{\\max}/\\sigma|)`; returns
    ``None`` when :math:`\\rho \\ge 1` (no depth converges).
    """
    rho = lissa_contraction(mu_min, mu_max, scale)
    if not rho < 1:
        return None
    if rho == 0:
        return 1
    return max(1, math.ceil(math.log(1 / tol) / -math.log(rho)))


def lissa_contraction(mu_min: float, mu_max: float, scale: float) -> float:
    """:math:`\\rho = \\max(|1 - \\mu_{\\min}/\\sigma|, |1 - \\mu_{\\max}/\\sigma|)`."""
    return max(abs(1 - mu_min / scale), abs(1 - mu_max / scale))


def advice_from_extremes(
    hessian_max: float,
    hessian_min: float,
    *,
    damping: float | None = None,
    tol: float = 1e-3,
    scale_margin: float = SCALE_MARGIN,
    damping_rtol: float = DAMPING_RTOL,
    exact: bool = False,
) -> SolverAdvice:
    """:func:`infl.diagnostics.advise` from the extreme eigenvalues of :math:`H` (undamped).

    Costs nothing; the solvers call it with quick Lanczos estimates in their messages.
    """
    h_max, h_min = float(hessian_max), float(hessian_min)
    min_damping = max(0.0, -h_min)
    floor = damping_rtol * abs(h_max)
    suggested = 0.0 if h_min > floor else min_damping + floor
    lam = suggested if damping is None else float(damping)
    mu_max, mu_min = h_max + lam, h_min + lam
    pd = mu_min > 0
    scale = scale_margin * mu_max if mu_max > 0 else math.nan
    depth = lissa_depth(mu_min, mu_max, scale, tol) if pd else None
    kappa = mu_max / mu_min if pd else math.inf
    cg_iters = max(1, math.ceil(0.5 * math.sqrt(kappa) * math.log(2 / tol))) if pd else None
    return SolverAdvice(
        hessian_max=h_max,
        hessian_min=h_min,
        min_damping=min_damping,
        suggested_damping=suggested,
        damping=lam,
        mu_max=mu_max,
        mu_min=mu_min,
        positive_definite=pd,
        condition_number=kappa,
        scale_lower_bound=mu_max / 2,
        scale=scale,
        contraction=lissa_contraction(mu_min, mu_max, scale) if mu_max > 0 else math.inf,
        tol=tol,
        depth=depth,
        cg_iterations=cg_iters,
        exact=exact,
    )


def zero_threshold(
    values: torch.Tensor, dtype: torch.dtype, size: int, zero_rtol: float | None = None
) -> float:
    """The magnitude below which an eigenvalue of a ``size x size`` operator counts as zero.

    :math:`\\tau = r\\cdot\\max_i|\\mu_i|` with :math:`r` = ``zero_rtol``, by default
    :math:`10\\sqrt p\\,\\varepsilon` (:math:`\\varepsilon` the machine epsilon of
    ``dtype``, the dtype the operator was computed in): the round-off of an eigendecomposition
    of a ``p x p`` matrix, so that exact zeros that round-off puts below 0 (for example
    -3.7e-13 on a positive semi-definite problem in float64) are not counted as negative.
    Shared by :class:`~infl.diagnostics.Spectrum` and :class:`~infl.solvers.ExactHessian`.

    Examples
    --------
    >>> import torch
    >>> mu = torch.tensor([-3.7e-13, 1e-3, 2.0], dtype=torch.float64)
    >>> bool(mu[0] < -zero_threshold(mu, torch.float64, 100))
    False
    """
    if zero_rtol is None:
        zero_rtol = 10 * math.sqrt(size) * torch.finfo(dtype).eps
    scale = float(values.abs().max()) if values.numel() else 0.0
    return zero_rtol * scale


__all__ = [
    "DAMPING_RTOL",
    "SCALE_MARGIN",
    "SolverAdvice",
    "advice_from_extremes",
    "lissa_contraction",
    "lissa_depth",
    "zero_threshold",
]
