"""Extreme eigenvalues of a symmetric operator: Lanczos with full reorthogonalisation.

The one Lanczos implementation in infl. The solvers use it (``LiSSA(scale="auto")``, damping
advice in error messages, ``damping="auto"``), :mod:`infl.diagnostics` builds spectra on it,
and low-rank solvers take its Ritz vectors. It depends only on the operator interface.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from infl.errors import InflWarning, InputError, NonFiniteError
from infl.operators import LinearOperator

Which = Literal["largest", "smallest", "both"]

REORTH_ETA = 2**-0.5
"""A reorthogonalisation pass that leaves less than this fraction of the vector's norm is
repeated (the DGKS criterion): heavy cancellation is when one classical Gram-Schmidt pass loses
orthogonality. In a Lanczos step the new vector is already orthogonal to the basis up to
round-off, so one pass nearly always suffices and the basis is read half as often."""


@dataclass(frozen=True)
class LanczosResult:
    """Ritz values of a symmetric operator from a Lanczos run.

    Attributes
    ----------
    largest
        ``[k]`` (or empty), the ``k`` largest Ritz values, descending (float64).
    smallest
        ``[k]`` (or empty), the ``k`` smallest Ritz values, ascending (float64).
    largest_residuals, smallest_residuals
        Residual bounds :math:`\\beta_m |s_{m,i}| = \\|A y_i - \\theta_i y_i\\|` of those Ritz
        pairs: each Ritz value is within this distance of an eigenvalue of :math:`A`.
    iterations
        :math:`m`, the dimension of the Krylov subspace (= operator applications).
    converged
        Whether every requested Ritz value met the tolerance.
    reorth_passes
        Reorthogonalisation passes over the basis made in all (between ``iterations`` and
        twice that; see :data:`REORTH_ETA`); 0 from an eigensolver other than :func:`lanczos`.
    largest_vectors, smallest_vectors
        ``[k, p]`` unit Ritz vectors :math:`y_i = Q_m s_i`, row ``i`` paired with
        ``largest[i]`` / ``smallest[i]`` (in the operator's dtype and device), orthonormal to
        working precision; ``None`` unless ``return_vectors=True`` (or that end was not
        requested).
    """

    largest: torch.Tensor
    smallest: torch.Tensor
    largest_residuals: torch.Tensor
    smallest_residuals: torch.Tensor
    iterations: int
    converged: bool
    reorth_passes: int = 0
    largest_vectors: torch.Tensor | None = None
    smallest_vectors: torch.Tensor | None = None


def lanczos(
    operator: LinearOperator,
    k: int = 6,
    *,
    which: Which = "both",
    max_iter: int | None = None,
    tol: float = 1e-8,
    seed: int = 0,
    return_vectors: bool = False,
) -> LanczosResult:
    """Extreme eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

    Builds an orthonormal basis :math:`Q_m = [q_1, \\dots, q_m]` of the Krylov space
    :math:`\\mathcal K_m(A, q_1)` and the tridiagonal :math:`T_m = Q_m^T A Q_m`, with

    .. math:: \\beta_j q_{j+1} = A q_j - \\alpha_j q_j - \\beta_{j-1} q_{j-1},

    reorthogonalising every new vector against all of :math:`Q_m` (so that no ghost copies of
    converged eigenvalues appear): one classical Gram-Schmidt pass, and a second one when the
    first removed more than :data:`REORTH_ETA` of the vector's norm (Daniel, Gragg, Kaufman &
    Stewart 1976; "twice is enough"). The eigenvalues :math:`\\theta_i` of :math:`T_m` (Ritz
    values) lie inside :math:`[\\lambda_{\\min}(A), \\lambda_{\\max}(A)]` and converge to the
    extreme eigenvalues first; the residual :math:`\\beta_m |s_{m,i}|` (last component of the
    eigenvector of :math:`T_m`) bounds each one's error.

    Parameters
    ----------
    operator
        :math:`A`, symmetric ``p x p`` (any infl operator; damping included if it is damped).
    k
        How many eigenvalues to find at each requested end of the spectrum.
    which
        ``"largest"`` (most positive), ``"smallest"`` (most negative) or ``"both"``.
    max_iter
        :math:`m_{\\max}`, the largest Krylov dimension (default ``min(p, max(80, 8k))``).
    tol
        Stop when every requested Ritz value has residual
        :math:`\\le \\text{tol}\\cdot\\max_i|\\theta_i|`.
    seed
        Seeds the random start vector :math:`q_1` (a CPU ``torch.Generator``; same seed, same
        result, on every device and on every rank of a ``torch.distributed`` job, whose ranks
        then build the same Krylov basis from the same all-reduced products).
    return_vectors
        Also return the Ritz vectors :math:`y_i = Q_m s_i` of the returned Ritz values (for
        low-rank solvers such as :class:`~infl.solvers.arnoldi.Arnoldi`). The Lanczos run is
        the same either way; this adds :math:`O(m k p)` flops and ``k p`` numbers.

    Returns
    -------
    LanczosResult
        Ritz values in float64; ``converged=False`` (and an
        :class:`~infl.errors.InflWarning`) if ``max_iter`` was reached first.

    Notes
    -----
    Cost: :math:`m` operator applications (HVPs), :math:`m \\cdot p` numbers of memory for the
    basis and :math:`O(m^2 p)` flops of reorthogonalisation (each pass reads the basis twice: it
    is memory-bound, and measurable next to cheap products; ``reorth_passes`` counts the
    passes). The start vector is drawn in float64 on the CPU, so the result does not depend on
    the operator's device.

    Examples
    --------
    >>> import torch
    >>> from infl.operators import DenseOperator
    >>> A = DenseOperator(torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64)))
    >>> r = lanczos(A, k=2, max_iter=100)
    >>> r.largest.round(decimals=6), r.smallest.round(decimals=6)
    (tensor([100.,  99.], dtype=torch.float64), tensor([1., 2.], dtype=torch.float64))
    """
    p = operator.size
    if k < 1 or k > p:
        raise InputError(f"k must be between 1 and p={p}, got {k}")
    if which not in ("largest", "smallest", "both"):
        raise InputError(f"which must be 'largest', 'smallest' or 'both', got {which!r}")
    if max_iter is None:
        max_iter = min(p, max(80, 8 * k))
    if max_iter < 1:
        raise InputError(f"max_iter must be a positive integer, got {max_iter}")
    max_iter = min(max_iter, p)
    if not (math.isfinite(tol) and tol > 0):
        raise InputError(f"tol must be a positive finite number, got {tol}")

    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.randn(p, generator=gen, dtype=torch.float64)
    start = start / start.norm()
    basis = torch.zeros(max_iter, p, dtype=operator.dtype, device=operator.device)
    basis[0] = start.to(device=operator.device, dtype=operator.dtype)
    alphas: list[float] = []
    betas: list[float] = []
    eps = torch.finfo(operator.dtype).eps
    theta = torch.zeros(0, dtype=torch.float64)
    vecs = torch.zeros(0, 0, dtype=torch.float64)
    resid = torch.zeros(0, dtype=torch.float64)
    converged = False
    m = 0
    closed_rows = 0.0  # max row sum of T_m over the rows whose both off-diagonals are known
    reorth_passes = 0
    for j in range(max_iter):
        q = basis[j]
        w = operator.matvec(q)
        alpha = float(q @ w)
        w = w - alpha * q
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        beta, passes = _reorthogonalise(w, basis[: j + 1])
        reorth_passes += passes
        if not (math.isfinite(alpha) and math.isfinite(beta)):  # a NaN/inf in A q reaches both
            raise NonFiniteError(f"Lanczos: the operator product is not finite at step {j + 1}")
        alphas.append(alpha)
        m = j + 1
        if m >= min(k, p) or m == max_iter:
            theta, vecs, resid = _ritz(alphas, betas, beta)
            scale = float(theta.abs().max())
        else:
            # Nothing to test yet (fewer than k Ritz values): skip the O(m^3) eigensolve and
            # bound max|theta| <= ||T_m||_inf (Gershgorin) for the breakdown test below; the
            # last row's sum is |alpha_j| + |beta_{j-1}|, the earlier ones are closed.
            scale = max(closed_rows, abs(alpha) + (abs(betas[-1]) if betas else 0.0))
        exhausted = beta <= 10 * eps * max(scale, 1e-300)
        if exhausted and theta.numel() != m:
            theta, vecs, resid = _ritz(alphas, betas, beta)
        if m >= min(k, p):
            wanted = _wanted(resid, k, which)
            if bool((wanted <= tol * max(scale, 1e-300)).all()) or exhausted or m == p:
                converged = True
                break
        if exhausted:
            # An invariant subspace: the Krylov space cannot grow. Its Ritz values are exact.
            converged = m >= k
            break
        closed_rows = max(closed_rows, abs(alpha) + (abs(betas[-1]) if betas else 0.0) + beta)
        betas.append(beta)
        if j + 1 < max_iter:
            basis[j + 1] = w / beta
    if not converged:
        warnings.warn(
            f"Lanczos stopped at max_iter={max_iter} before the {k} {which} Ritz values met "
            f"tol={tol:g} (worst residual {float(_wanted(resid, k, which).max()):.3g}); the "
            "values returned are bounds from inside the spectrum. Increase max_iter.",
            InflWarning,
            stacklevel=2,
        )
    kk = min(k, theta.numel())
    want_top = which in ("largest", "both")
    want_bottom = which in ("smallest", "both")
    empty = torch.zeros(0, dtype=torch.float64)
    top_vectors = bottom_vectors = None
    if return_vectors:
        # y_i = Q_m s_i: combine the basis with the eigenvectors of T_m (no operator products)
        coeffs = vecs.to(device=operator.device, dtype=operator.dtype)
        if want_top:
            top_vectors = coeffs[:, -kk:].flip(1).T @ basis[:m]
        if want_bottom:
            bottom_vectors = coeffs[:, :kk].T @ basis[:m]
    return LanczosResult(
        largest=theta[-kk:].flip(0) if want_top else empty,
        smallest=theta[:kk] if want_bottom else empty,
        largest_residuals=resid[-kk:].flip(0) if want_top else empty,
        smallest_residuals=resid[:kk] if want_bottom else empty,
        iterations=m,
        converged=converged,
        reorth_passes=reorth_passes,
        largest_vectors=top_vectors,
        smallest_vectors=bottom_vectors,
    )


def _reorthogonalise(w: torch.Tensor, basis: torch.Tensor) -> tuple[float, int]:
    """Make ``w`` orthogonal to the rows of ``basis`` in place; ``(||w||, passes made)``.

    One classical Gram-Schmidt pass; a second only when the first cancelled most of ``w``
    (``||w'|| < REORTH_ETA ||w||``), the case where one pass leaves an error above round-off.
    """
    before = torch.linalg.vector_norm(w)
    w.sub_((basis @ w) @ basis)
    after = torch.linalg.vector_norm(w)
    if bool(after < REORTH_ETA * before):
        w.sub_((basis @ w) @ basis)
        return float(torch.linalg.vector_norm(w)), 2
    return float(after), 1


def _ritz(
    alphas: list[float], betas: list[float], beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenpairs :math:`(\\theta_i, s_i)` of :math:`T_m`, residuals :math:`\\beta_m|s_{m,i}|`."""
    tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.tensor(betas, dtype=torch.float64)
        tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
    theta, vecs = torch.linalg.eigh(tri)
    return theta, vecs, beta * vecs[-1].abs()


def _wanted(resid: torch.Tensor, k: int, which: Which) -> torch.Tensor:
    kk = min(k, resid.numel())
    if which == "largest":
        return resid[-kk:]
    if which == "smallest":
        return resid[:kk]
    return torch.cat([resid[:kk], resid[-kk:]])


def estimate_extreme_eigenvalues(
    operator: LinearOperator, *, max_iter: int = 30, tol: float = 1e-4, seed: int = 0
) -> tuple[float, float]:
    """Quick estimates of :math:`(\\mu_{\\max}, \\mu_{\\min})` from one short Lanczos run.

    Used by ``LiSSA(scale="auto")`` and the solvers' messages. :math:`\\mu_{\\max}` is a lower
    bound and :math:`\\mu_{\\min}` an upper bound (Ritz values lie inside the spectrum); the top
    one is typically accurate to ``tol`` after 10-30 HVPs. Cost: at most ``max_iter`` HVPs.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InflWarning)
        res = lanczos(operator, 1, which="both", max_iter=max_iter, tol=tol, seed=seed)
    return float(res.largest[0]), float(res.smallest[0])


__all__ = ["LanczosResult", "Which", "estimate_extreme_eigenvalues", "lanczos"]
