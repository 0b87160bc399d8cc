"""Conjugate gradient on many right-hand sides at once."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from infl.errors import InflWarning, InputError, NonFiniteError, NotPositiveDefiniteError
from infl.operators import LinearOperator
from infl.solvers.base import (
    FittedSolver,
    Solver,
    SolveResult,
    as_rhs,
    check_damping,
    check_positive,
)


@dataclass(frozen=True)
class ConjugateGradient(Solver):
    """Conjugate gradient for :math:`(H + \\lambda I) x_j = b_j`, all ``k`` systems together.

    The ``k`` recursions run side by side, each with its own step sizes, so that one operator
    ``matmat`` (one pass over the data) serves every right-hand side; a system leaves the batch
    once it has converged.

    Parameters
    ----------
    damping
        :math:`\\lambda \\ge 0`.
    rtol, atol
        Stop system ``j`` when :math:`\\|r_j\\| \\le \\max(\\text{rtol}\\|b_j\\|, \\text{atol})`.
    max_iter
        At most this many iterations (each one ``matmat`` of the still-active systems).

    Notes
    -----
    CG needs :math:`H + \\lambda I` positive definite. A search direction with
    :math:`p^T(H+\\lambda I)p \\le 0` proves it is not, and raises
    :class:`~infl.errors.NotPositiveDefiniteError`. Reaching ``max_iter`` without meeting the
    tolerance gives ``converged=False`` and an :class:`~infl.errors.InflWarning`.
    Cost: at most ``max_iter`` operator applications of ``k`` vectors; memory ``O(k p)``.

    Examples
    --------
    >>> import torch
    >>> from infl.operators import DenseOperator
    >>> A = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
    >>> r = ConjugateGradient().solve(A, torch.tensor([3.0, 4.0]))
    >>> r.converged, r.value.round(decimals=6)
    (True, tensor([[1., 1.]], dtype=torch.float64))
    """

    damping: float = 0.0
    rtol: float = 1e-6
    atol: float = 0.0
    max_iter: int = 100

    def __post_init__(self) -> None:
        check_damping(self.damping)
        check_positive("max_iter", self.max_iter, integer=True)
        if self.rtol < 0 or self.atol < 0 or (self.rtol == 0 and self.atol == 0):
            raise InputError(
                f"need rtol >= 0 and atol >= 0 with at least one positive, got "
                f"rtol={self.rtol}, atol={self.atol}"
            )

    def fit(self, operator: LinearOperator, *, progress: bool = False) -> FittedCG:
        return FittedCG(self, operator)


class FittedCG(FittedSolver):
    """:class:`ConjugateGradient` bound to an operator (fitting costs nothing; neither does
    :meth:`with_damping`)."""

    def __init__(self, solver: ConjugateGradient, operator: LinearOperator) -> None:
        super().__init__(solver, operator)
        self.solver: ConjugateGradient = solver

    def solve(self, rhs: torch.Tensor, *, progress: bool = False) -> SolveResult:
        cfg = self.solver
        b = as_rhs(rhs, self.operator)
        k = b.shape[0]
        bnorm = torch.linalg.vector_norm(b, dim=1)
        threshold = torch.clamp(cfg.rtol * bnorm, min=cfg.atol)
        safe_bnorm = bnorm.clamp_min(torch.finfo(b.dtype).tiny)
        x = torch.zeros_like(b)
        r = b.clone()
        d = r.clone()
        rs = (r * r).sum(dim=1)
        active = torch.sqrt(rs) > threshold
        history = [torch.sqrt(rs) / safe_bnorm]
        iterations = 0
        bar = tqdm(total=cfg.max_iter, desc="CG", disable=not progress, leave=False)
        while bool(active.any()) and iterations < cfg.max_iter:
            idx = active.nonzero().reshape(-1)
            ad = self.operator.matmat(d[idx])
            curvature = (d[idx] * ad).sum(dim=1)
            if not torch.isfinite(ad).all():
                raise NonFiniteError(
                    f"CG: the operator product is not finite at iteration {iterations + 1}"
                )
            if bool((curvature <= 0).any()):
                bad = int((curvature <= 0).nonzero()[0])
                j = int(idx[bad])
                rayleigh = float(curvature[bad] / (d[j] * d[j]).sum())
                raise NotPositiveDefiniteError(
                    f"CG found negative curvature at iteration {iterations + 1} (right-hand side "
                    f"{j}): a direction p with p^T (H + damping*I) p / p^T p = {rayleigh:.4g}, "
                    f"so with damping={cfg.damping:g} the operator is not positive definite and "
                    f"its smallest eigenvalue is at most {rayleigh:.4g}. Increase damping by more "
                    f"than {-rayleigh:.4g} (infl.diagnostics estimates the most negative "
                    "eigenvalue), or use ExactHessian(pseudo_inverse=True) on a small model."
                )
            alpha = rs[idx] / curvature
            x[idx] += alpha[:, None] * d[idx]
            r[idx] -= alpha[:, None] * ad
            rs_new = (r[idx] * r[idx]).sum(dim=1)
            beta = rs_new / rs[idx]
            d[idx] = r[idx] + beta[:, None] * d[idx]
            rs[idx] = rs_new
            active[idx] = torch.sqrt(rs_new) > threshold[idx]
            history.append(torch.sqrt(rs) / safe_bnorm)
            iterations += 1
            bar.update(1)
        bar.close()
        residuals = torch.sqrt(rs) / safe_bnorm
        converged = not bool(active.any())
        if not converged:
            warnings.warn(
                f"CG stopped at max_iter={cfg.max_iter} with relative residual up to "
                f"{float(residuals.max()):.3g} on {int(active.sum())} of {k} right-hand sides "
                f"(rtol={cfg.rtol:g}). Increase max_iter, or add damping to improve the "
                "conditioning of H + damping*I. CG needs at most ~sqrt(kappa)/2 * ln(2/rtol) "
                "iterations, kappa the condition number of H + damping*I: "
                "infl.diagnostics.advise(operator, damping=...) estimates both.",
                InflWarning,
                stacklevel=2,
            )
        return SolveResult(
            value=x,
            converged=converged,
            iterations=iterations,
            residual_norms=residuals,
            trace=torch.stack(history),
            info=self.info,
        )
