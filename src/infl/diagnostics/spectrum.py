"""Eigenvalues of the (damped) Hessian: Lanczos for large ``p``, the full spectrum for small ``p``.

The curvature of the training objective decides whether an influence estimate can be trusted:
the top eigenvalue :math:`\\lambda_{\\max}` bounds the step a Neumann series (LiSSA) may take,
negative eigenvalues make :math:`H` indefinite (so :math:`H^{-1}` is not a minimiser's response),
and the condition number :math:`\\kappa = \\lambda_{\\max}/\\lambda_{\\min}` sets how many
iterations CG and LiSSA need. Everything here works on any :class:`~infl.operators.LinearOperator`
and reports the eigenvalues of that operator, damping included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from infl.errors import InputError, NonFiniteError
from infl.operators import LinearOperator
from infl.spectral.advice import zero_threshold
from infl.spectral.lanczos import LanczosResult, Which, estimate_extreme_eigenvalues, lanczos

Method = Literal["auto", "dense", "lanczos", "eigsh"]

DENSE_MAX_PARAMS = 2000
"""``method="auto"`` builds the dense matrix (``p`` HVPs, exact) up to this many parameters."""


def eigsh_extremes(
    operator: LinearOperator,
    k: int = 6,
    *,
    which: Which = "both",
    tol: float = 1e-8,
    max_iter: int | None = None,
    seed: int = 0,
) -> LanczosResult:
    """The same extreme eigenvalues as :func:`lanczos`, by ``scipy.sparse.linalg.eigsh``.

    Wraps the operator's ``matvec`` in a :class:`scipy.sparse.linalg.LinearOperator` (a CPU
    round trip through NumPy per product) and runs ARPACK's implicitly restarted Lanczos.
    ``which="both"`` asks for ``2k`` eigenvalues from both ends (``which="BE"``).
    Kept as a cross-check and for the benchmark (``benchmarks/bench_lanczos.py``); residuals
    are not reported by ARPACK and are returned as zeros.

    Notes
    -----
    Cost: as many operator applications as ARPACK needs (reported in
    ``LanczosResult.iterations``); memory ``ncv * p`` with ``ncv = max(2K+1, 20)``.
    """
    from scipy.sparse.linalg import LinearOperator as ScipyOperator
    from scipy.sparse.linalg import eigsh

    p = operator.size
    count = 2 * k if which == "both" else k
    if k < 1 or count >= p:
        raise InputError(f"eigsh needs 1 <= k and the number of eigenvalues < p={p}, got k={k}")
    np_dtype = np.float64 if operator.dtype == torch.float64 else np.float32
    calls = 0

    def matvec(x: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np_dtype).reshape(-1))
        return operator.matvec(v).detach().cpu().numpy()

    sp_op = ScipyOperator((p, p), matvec=matvec, dtype=np_dtype)
    rng = np.random.default_rng(seed)
    v0 = rng.standard_normal(p).astype(np_dtype)
    code = {"largest": "LA", "smallest": "SA", "both": "BE"}[which]
    vals = eigsh(sp_op, k=count, which=code, tol=tol, maxiter=max_iter, v0=v0,
                 return_eigenvectors=False)  # fmt: skip
    theta = torch.from_numpy(np.sort(np.asarray(vals, dtype=np.float64)))
    empty = torch.zeros(0, dtype=torch.float64)
    top = theta[-k:].flip(0) if which != "smallest" else empty
    bottom = theta[:k] if which != "largest" else empty
    return LanczosResult(
        largest=top,
        smallest=bottom,
        largest_residuals=torch.zeros_like(top),
        smallest_residuals=torch.zeros_like(bottom),
        iterations=calls,
        converged=True,
    )


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues of :math:`A = H + \\lambda I` (``damping`` = :math:`\\lambda`), and summaries.

    Attributes
    ----------
    eigenvalues
        Ascending float64. All ``p`` eigenvalues when ``full``; otherwise the ``k`` smallest
        followed by the ``k`` largest Ritz values (without duplicates).
    largest
        The largest eigenvalues found, descending.
    smallest
        The smallest eigenvalues found, ascending.
    size
        ``p``.
    full
        Whether ``eigenvalues`` is the whole spectrum (dense method).
    damping
        :math:`\\lambda` already included in the eigenvalues; the Hessian's own eigenvalues are
        ``eigenvalues - damping``.
    method
        ``"dense"``, ``"lanczos"`` or ``"eigsh"``.
    num_matvecs
        Operator applications (HVPs) spent.
    converged
        ``False`` if the iterative method stopped before its tolerance.
    zero_threshold
        Eigenvalues with :math:`|\\mu| \\le` this are counted as zero, not negative: round-off
        puts exact zeros (for example, of dead ReLU units) on either side of 0.
    """

    eigenvalues: torch.Tensor
    largest: torch.Tensor
    smallest: torch.Tensor
    size: int
    full: bool
    damping: float
    method: str
    num_matvecs: int
    converged: bool
    zero_threshold: float

    @property
    def lambda_max(self) -> float:
        """:math:`\\mu_{\\max}`, the largest eigenvalue of :math:`A` (lower bound if not full)."""
        return float(self.eigenvalues[-1])

    @property
    def lambda_min(self) -> float:
        """:math:`\\mu_{\\min}`, the smallest eigenvalue of :math:`A` (upper bound if not full)."""
        return float(self.eigenvalues[0])

    @property
    def num_negative(self) -> int:
        """Eigenvalues :math:`< -\\text{zero\\_threshold}`; a lower bound when not ``full``."""
        return int((self.eigenvalues < -self.zero_threshold).sum())

    @property
    def num_near_zero(self) -> int:
        """Eigenvalues with :math:`|\\mu| \\le \\text{zero\\_threshold}` (found ones only)."""
        return int((self.eigenvalues.abs() <= self.zero_threshold).sum())

    @property
    def negative_mass(self) -> float:
        """:math:`\\sum_{\\mu_i < 0} |\\mu_i|` over the negative eigenvalues found."""
        neg = self.eigenvalues[self.eigenvalues < -self.zero_threshold]
        return float(neg.abs().sum())

    @property
    def negative_mass_fraction(self) -> float:
        """:math:`\\sum_{\\mu_i<0}|\\mu_i| / \\sum_i |\\mu_i|` (``nan`` unless ``full``)."""
        if not self.full:
            return math.nan
        total = float(self.eigenvalues.abs().sum())
        return self.negative_mass / total if total > 0 else 0.0

    @property
    def condition_number(self) -> float:
        """:math:`\\kappa = \\mu_{\\max}/\\mu_{\\min}` if :math:`\\mu_{\\min} > 0`, else ``inf``.

        From Lanczos it is an underestimate (both extremes are approached from inside).
        """
        lo = self.lambda_min
        return self.lambda_max / lo if lo > self.zero_threshold else math.inf

    @property
    def hessian_eigenvalues(self) -> torch.Tensor:
        """The eigenvalues of :math:`H` itself: ``eigenvalues - damping``."""
        return self.eigenvalues - self.damping

    def summary(self) -> str:
        """A one-paragraph description."""
        kind = "all" if self.full else f"{self.eigenvalues.numel()} extreme"
        neg = f"{self.num_negative}" if self.full else f">= {self.num_negative}"
        frac = (
            f" ({100 * self.negative_mass_fraction:.2g}% of the total |eigenvalue| mass)"
            if self.full
            else ""
        )
        return (
            f"Spectrum of H + {self.damping:g}*I (p={self.size}, {kind} eigenvalues by "
            f"{self.method}, {self.num_matvecs} HVPs): lambda_max = {self.lambda_max:.6g}, "
            f"lambda_min = {self.lambda_min:.6g}, negative eigenvalues: {neg}, negative mass "
            f"{self.negative_mass:.4g}{frac}, condition number ~ {self.condition_number:.4g}."
        )


def hessian_spectrum(
    operator: LinearOperator,
    k: int = 10,
    *,
    damping: float = 0.0,
    method: Method = "auto",
    dense_max_params: int = DENSE_MAX_PARAMS,
    max_iter: int | None = None,
    tol: float = 1e-8,
    seed: int = 0,
    zero_rtol: float | None = None,
) -> Spectrum:
    """Extreme eigenvalues (or all of them) of :math:`A = H + \\lambda I`.

    Parameters
    ----------
    operator
        :math:`H`, symmetric ``p x p`` (a :class:`~infl.operators.HessianOperator`, a
        :class:`~infl.operators.DenseOperator`, ...).
    k
        Eigenvalues to find at each end (Lanczos / eigsh).
    damping
        :math:`\\lambda \\ge 0`, added as ``operator.damped(damping)``; the result reports the
        eigenvalues of :math:`H + \\lambda I` and remembers :math:`\\lambda`.
    method
        ``"dense"``: ``to_dense()`` then ``torch.linalg.eigvalsh`` in float64 (``p`` HVPs,
        :math:`p^2` memory, exact). ``"lanczos"``: :func:`lanczos` (torch-native, matrix-free).
        ``"eigsh"``: :func:`eigsh_extremes` (SciPy ARPACK). ``"auto"``: dense for
        ``p <= dense_max_params``, else Lanczos (on CPU it is faster than eigsh for the same
        tolerance, see ``benchmarks/bench_lanczos.py``).
    max_iter, tol, seed
        Passed to the iterative methods.
    zero_rtol
        Eigenvalues with :math:`|\\mu| \\le \\text{zero\\_rtol}\\cdot\\max|\\mu|` count as zero
        (default :math:`10\\sqrt p\\,\\varepsilon` of the operator's dtype).

    Returns
    -------
    Spectrum

    Examples
    --------
    >>> import torch
    >>> from infl.operators import DenseOperator
    >>> H = DenseOperator(torch.diag(torch.tensor([-1.0, 0.5, 2.0, 4.0], dtype=torch.float64)))
    >>> s = hessian_spectrum(H, damping=0.1)
    >>> s.lambda_max, s.num_negative, s.method
    (4.1, 1, 'dense')
    """
    if not (math.isfinite(damping) and damping >= 0):
        raise InputError(f"damping must be a finite number >= 0, got {damping}")
    if method not in ("auto", "dense", "lanczos", "eigsh"):
        raise InputError(f"method must be 'auto', 'dense', 'lanczos' or 'eigsh', got {method!r}")
    op = operator.damped(damping)
    before = op.num_matvecs
    chosen = method
    if method == "auto":
        chosen = "dense" if op.size <= dense_max_params else "lanczos"
    if chosen == "dense":
        dense = op.to_dense().to(dtype=torch.float64)
        if not torch.isfinite(dense).all():
            raise NonFiniteError("the dense Hessian contains NaN or infinite values")
        values = torch.linalg.eigvalsh(dense.cpu())
        top = values[-k:].flip(0)
        bottom = values[:k]
        converged = True
        full = True
    else:
        runner = lanczos if chosen == "lanczos" else eigsh_extremes
        res = runner(op, min(k, op.size), which="both", max_iter=max_iter, tol=tol, seed=seed)
        top, bottom = res.largest, res.smallest
        values = torch.unique(torch.cat([bottom, top]))  # sorted ascending, deduplicated
        converged = res.converged
        full = values.numel() == op.size
    return Spectrum(
        eigenvalues=values,
        largest=top,
        smallest=bottom,
        size=op.size,
        full=full,
        damping=float(damping),
        method=chosen,
        num_matvecs=op.num_matvecs - before,
        converged=converged,
        zero_threshold=zero_threshold(values, operator.dtype, op.size, zero_rtol),
    )


__all__ = [
    "DENSE_MAX_PARAMS",
    "LanczosResult",
    "Spectrum",
    "eigsh_extremes",
    "estimate_extreme_eigenvalues",
    "hessian_spectrum",
    "lanczos",
    "zero_threshold",
]
