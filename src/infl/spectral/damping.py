"""``damping="auto"``: the damping :math:`\\lambda` read off the extreme eigenvalues of :math:`H`.

:math:`H + \\lambda I` is positive definite iff :math:`\\lambda > -\\lambda_{\\min}(H)`. A
solver with ``damping="auto"`` estimates :math:`\\lambda_{\\min}(H)` and
:math:`\\lambda_{\\max}(H)` when it is fitted and takes
:func:`~infl.spectral.advice.advice_from_extremes`'s ``suggested_damping`` of a
*pessimistic* :math:`\\lambda_{\\min}`:

.. math::

    \\hat\\lambda_{\\min} = \\theta_{\\min} - r_{\\min},\\qquad
    \\tilde\\lambda_{\\min} = \\begin{cases} (1 + c)\\,\\hat\\lambda_{\\min} &
    \\hat\\lambda_{\\min} < 0\\\\ \\hat\\lambda_{\\min} & \\text{otherwise}\\end{cases},\\qquad
    \\lambda = \\begin{cases} -\\tilde\\lambda_{\\min} + \\epsilon\\,|\\theta_{\\max}| &
    \\tilde\\lambda_{\\min} \\le \\epsilon\\,|\\theta_{\\max}| \\\\
    0 & \\text{otherwise}\\end{cases}

with :math:`\\theta_{\\min}, \\theta_{\\max}` the extreme Ritz values, :math:`r_{\\min}` the Ritz
residual of :math:`\\theta_{\\min}` (the distance within which an eigenvalue lies),
:math:`c` = :data:`AUTO_DAMPING_MARGIN` (0.5) and :math:`\\epsilon` =
:data:`~infl.spectral.advice.DAMPING_RTOL` (:math:`10^{-3}`). Why the margin: Lanczos's
:math:`\\theta_{\\min}` is an *upper* bound on the true :math:`\\lambda_{\\min}(H)` (Ritz values
lie inside the spectrum), so :math:`-\\theta_{\\min}` can only under-estimate the damping
needed; the residual covers a Ritz value that has not converged, the factor :math:`1+c` an
eigenvalue further out that the short run has not reached. With the exact spectrum
(:class:`~infl.solvers.ExactHessian`, or Lanczos run over the whole space) :math:`r = 0` and
:math:`c = 0`: :math:`\\lambda = -\\lambda_{\\min}(H) + \\epsilon|\\lambda_{\\max}|` exactly.
Neither is a proof for a Lanczos estimate: ``ConjugateGradient(damping="auto")`` also raises
:math:`\\lambda` from the Rayleigh quotient it meets when it finds negative curvature.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from infl.errors import InflWarning, InputError
from infl.operators import LinearOperator
from infl.spectral.advice import DAMPING_RTOL, advice_from_extremes
from infl.spectral.lanczos import lanczos

AUTO_DAMPING_MARGIN = 0.5
""":math:`c`: a Lanczos estimate of a negative :math:`\\lambda_{\\min}` is pushed out by this
fraction of itself before the damping is read off it (0 for the exact spectrum)."""

AUTO_DAMPING_LANCZOS_STEPS = 60
"""At most this many HVPs (one vector each) for the ``damping="auto"`` Lanczos run."""

AUTO_DAMPING_RETRIES = 4
"""``ConjugateGradient(damping="auto")`` raises the damping at most this many times."""

RULE_LANCZOS = (
    "damping = -(1+c)*(theta_min - r_min) + eps*|theta_max| when that is not safely positive "
    "(theta = Lanczos Ritz values, an upper bound on lambda_min(H); r_min its Ritz residual; "
    "c = margin; eps = damping_rtol), else 0"
)
RULE_EXACT = (
    "damping = -lambda_min(H) + eps*|lambda_max(H)| (exact spectrum) when H is not safely "
    "positive definite (lambda_min(H) <= eps*|lambda_max(H)|), else 0"
)


@dataclass(frozen=True)
class AutoDamping:
    """The outcome of ``damping="auto"``: the :math:`\\lambda` chosen and what it was read off.

    Attributes
    ----------
    damping
        :math:`\\lambda`, the resolved damping (the latest attempt's, after any raise).
    hessian_max, hessian_min
        :math:`\\theta_{\\max}, \\theta_{\\min}` (Lanczos Ritz values, or exact eigenvalues of
        :math:`H`, undamped).
    min_residual
        :math:`r_{\\min}`, the Ritz residual of :math:`\\theta_{\\min}` (0 when exact).
    margin
        :math:`c` (0 when exact).
    damping_rtol
        :math:`\\epsilon`.
    exact
        Whether the eigenvalues were exact.
    lanczos_iterations
        HVPs spent on the estimate (0 when the spectrum came with the fit).
    attempts
        Earlier dampings that proved too small, each a dict with ``damping`` and what showed it
        (``rayleigh``: :math:`p^T(H+\\lambda I)p/p^Tp \\le 0`, ``iteration``).
    """

    damping: float
    hessian_max: float
    hessian_min: float
    min_residual: float = 0.0
    margin: float = AUTO_DAMPING_MARGIN
    damping_rtol: float = DAMPING_RTOL
    exact: bool = False
    lanczos_iterations: int = 0
    attempts: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    @property
    def rule(self) -> str:
        """The rule, in words (stored in ``info["damping_rule"]``)."""
        return RULE_EXACT if self.exact else RULE_LANCZOS

    def facts(self) -> dict[str, Any]:
        """The keys a fitted solver adds to its ``info``."""
        return {
            "damping": self.damping,
            "damping_auto": True,
            "damping_rule": self.rule,
            "damping_margin": self.margin,
            "damping_rtol": self.damping_rtol,
            "damping_eigenvalues_exact": self.exact,
            "damping_max_eigenvalue": self.hessian_max,
            "damping_min_eigenvalue": self.hessian_min,
            "damping_min_residual": self.min_residual,
            "damping_lanczos_iterations": self.lanczos_iterations,
            "damping_attempts": [dict(a) for a in self.attempts],
        }

    def raised(self, rayleigh: float, iteration: int) -> AutoDamping:
        """The next :math:`\\lambda` after a solve met
        :math:`\\rho = p^T(H+\\lambda I)p / p^Tp \\le 0`.

        :math:`\\lambda_{\\min}(H) \\le \\rho - \\lambda`, so the same rule is applied to
        :math:`\\min(\\theta_{\\min} - r_{\\min}, \\rho - \\lambda)`, and the result is at least
        :math:`2\\lambda` (so that the damping grows geometrically even when :math:`\\rho`
        is barely negative). Costs nothing.
        """
        bound = min(self.hessian_min - self.min_residual, rayleigh - self.damping)
        candidate = damping_from_extremes(
            self.hessian_max, bound, margin=self.margin, damping_rtol=self.damping_rtol
        )
        floor = self.damping_rtol * abs(self.hessian_max)
        new = max(candidate, 2 * self.damping, floor)
        record = {"damping": self.damping, "rayleigh": float(rayleigh), "iteration": iteration}
        return AutoDamping(
            damping=new,
            hessian_max=self.hessian_max,
            hessian_min=min(self.hessian_min, rayleigh - self.damping),
            min_residual=self.min_residual,
            margin=self.margin,
            damping_rtol=self.damping_rtol,
            exact=self.exact,
            lanczos_iterations=self.lanczos_iterations,
            attempts=(*self.attempts, record),
        )

    def at_least(self, minimum: float) -> AutoDamping:
        """The same record with :math:`\\lambda \\ge` ``minimum`` (a solver that needs
        :math:`\\lambda > 0`, e.g. an Arnoldi complement, passes
        :math:`\\epsilon|\\theta_{\\max}|`)."""
        if self.damping >= minimum:
            return self
        return AutoDamping(
            damping=minimum,
            hessian_max=self.hessian_max,
            hessian_min=self.hessian_min,
            min_residual=self.min_residual,
            margin=self.margin,
            damping_rtol=self.damping_rtol,
            exact=self.exact,
            lanczos_iterations=self.lanczos_iterations,
            attempts=self.attempts,
        )


def damping_from_extremes(
    hessian_max: float,
    hessian_min: float,
    *,
    margin: float = AUTO_DAMPING_MARGIN,
    damping_rtol: float = DAMPING_RTOL,
) -> float:
    """:math:`\\lambda` from :math:`\\lambda_{\\max}(H)` and a pessimistic :math:`\\lambda_{\\min}`.

    ``advice_from_extremes(hessian_max, m, damping_rtol=damping_rtol).suggested_damping`` with
    :math:`m = (1 + c)\\,` ``hessian_min`` when it is negative (``hessian_min`` otherwise).

    Examples
    --------
    >>> damping_from_extremes(10.0, -0.5, margin=0.0)  # exact: -lambda_min + 1e-3 * 10
    0.51
    >>> damping_from_extremes(10.0, -0.5)  # Lanczos: pushed out by c = 0.5
    0.76
    >>> damping_from_extremes(10.0, 1.0)  # safely positive definite: no damping
    0.0
    """
    if not (math.isfinite(margin) and margin >= 0):
        raise InputError(f"margin must be a finite number >= 0, got {margin}")
    pessimistic = (1 + margin) * hessian_min if hessian_min < 0 else hessian_min
    advice = advice_from_extremes(hessian_max, pessimistic, damping_rtol=damping_rtol)
    return float(advice.suggested_damping)


def auto_damping_exact(hessian_max: float, hessian_min: float) -> AutoDamping:
    """``damping="auto"`` from the exact extreme eigenvalues of :math:`H` (no margin)."""
    lam = damping_from_extremes(hessian_max, hessian_min, margin=0.0)
    return AutoDamping(
        damping=lam,
        hessian_max=float(hessian_max),
        hessian_min=float(hessian_min),
        margin=0.0,
        exact=True,
    )


def auto_damping_from_ritz(
    hessian_max: float, hessian_min: float, min_residual: float, iterations: int
) -> AutoDamping:
    """``damping="auto"`` from Lanczos Ritz values of :math:`H` (margin and residual applied)."""
    lam = damping_from_extremes(hessian_max, hessian_min - min_residual)
    return AutoDamping(
        damping=lam,
        hessian_max=float(hessian_max),
        hessian_min=float(hessian_min),
        min_residual=float(min_residual),
        lanczos_iterations=iterations,
    )


def auto_damping(
    operator: LinearOperator, *, max_iter: int = AUTO_DAMPING_LANCZOS_STEPS, seed: int = 0
) -> AutoDamping:
    """Resolve ``damping="auto"`` on the undamped :math:`H` by one Lanczos run.

    Parameters
    ----------
    operator
        :math:`H` (undamped), ``p x p``.
    max_iter
        At most this many Lanczos steps (HVPs of one vector), capped at ``p``.
    seed
        Lanczos start vector seed.

    Returns
    -------
    AutoDamping
        ``damping`` by the rule of this module; ``exact`` when Lanczos exhausted the space.

    Notes
    -----
    Cost: at most ``max_iter`` HVPs (on the 85k-parameter digits MLP, 60 HVPs of one vector
    are a few seconds; see docs/solvers.md), memory ``max_iter * p`` for the basis.

    Examples
    --------
    >>> import torch
    >>> from infl.operators import DenseOperator
    >>> H = DenseOperator(torch.diag(torch.tensor([-0.5, 1.0, 10.0], dtype=torch.float64)))
    >>> round(auto_damping(H).damping, 10)  # p = 3: Lanczos is exact, so no margin is needed
    0.51
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InflWarning)
        res = lanczos(operator, 1, which="both", max_iter=max_iter, tol=1e-6, seed=seed)
    top, bottom = float(res.largest[0]), float(res.smallest[0])
    if res.iterations >= operator.size:  # the whole space: the Ritz values are the eigenvalues
        out = auto_damping_exact(top, bottom)
        return AutoDamping(
            damping=out.damping,
            hessian_max=top,
            hessian_min=bottom,
            margin=0.0,
            exact=True,
            lanczos_iterations=res.iterations,
        )
    return auto_damping_from_ritz(top, bottom, float(res.smallest_residuals[0]), res.iterations)


__all__ = [
    "AUTO_DAMPING_LANCZOS_STEPS",
    "AUTO_DAMPING_MARGIN",
    "AUTO_DAMPING_RETRIES",
    "AutoDamping",
    "auto_damping",
    "auto_damping_exact",
    "auto_damping_from_ritz",
    "damping_from_extremes",
]
