"""Conjugate gradient on many right-hand sides at once, optionally preconditioned."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from infl.errors import InflWarning, InputError, NonFiniteError, NotPositiveDefiniteError
from infl.operators import LinearOperator
from infl.solvers.arnoldi import Arnoldi
from infl.solvers.base import (
    FittedSolver,
    Solver,
    SolveResult,
    as_rhs,
    check_damping,
    check_positive,
)
from infl.solvers.lissa import LiSSA


@dataclass(frozen=True)
class ConjugateGradient(Solver):
    """Conjugate gradient for :math:`(H + \\lambda I) x_j = b_j`, all ``k`` systems together.

    The ``k`` recursions run side by side, each with its own step sizes, so that one operator
    ``matmat`` (one pass over the data) serves every right-hand side; a system leaves the batch
    once it has converged.

    With a ``preconditioner`` :math:`M^{-1} \\approx (H+\\lambda I)^{-1}` this is preconditioned
    CG (PCG): with :math:`x_0 = 0`, :math:`r_0 = b`, :math:`z_0 = M^{-1} r_0`, :math:`d_0 = z_0`,

    .. math::

        \\alpha_t = \\frac{r_t^T z_t}{d_t^T A d_t},\\quad x_{t+1} = x_t + \\alpha_t d_t,\\quad
        r_{t+1} = r_t - \\alpha_t A d_t,\\quad z_{t+1} = M^{-1} r_{t+1},\\quad
        d_{t+1} = z_{t+1} + \\frac{r_{t+1}^T z_{t+1}}{r_t^T z_t} d_t,

    (plain CG is :math:`M = I`). It converges like CG on :math:`M^{-1}A`: when :math:`M^{-1}`
    inverts the top of the spectrum, the effective condition number drops from
    :math:`(\\mu_{\\max}+\\lambda)/(\\mu_{\\min}+\\lambda)` to roughly
    :math:`(\\mu_{r+1}+\\lambda)/(\\mu_{\\min}+\\lambda)`.

    Parameters
    ----------
    damping
        :math:`\\lambda \\ge 0`.
    rtol, atol
        Stop system ``j`` when :math:`\\|r_j\\| \\le \\max(\\text{rtol}\\|b_j\\|, \\text{atol})`
        (the true residual :math:`b_j - A x_j`, with or without a preconditioner).
    max_iter
        At most this many iterations (each one ``matmat`` of the still-active systems).
    preconditioner
        ``None`` (plain CG) or an *unfitted* approximate solver, e.g. ``Arnoldi(rank=20)``.
        ``fit`` fits it on the same operator at this solver's ``damping`` (its own ``damping``
        field is overridden) and applies :math:`M^{-1} r` = ``fitted.solve(r).value``. PCG needs
        :math:`M^{-1}` symmetric positive definite: an ``Arnoldi`` preconditioner is therefore
        always used with ``complement=True`` (set automatically),
        :math:`M^{-1} = U^T\\operatorname{diag}(1/(\\mu_i+\\lambda))U + (I-U^TU)/\\lambda`, which
        needs ``damping > 0``. Iterative solvers (CG, LiSSA) are refused: they are not fixed
        linear maps.

    Notes
    -----
    CG needs :math:`H + \\lambda I` positive definite. A search direction with
    :math:`p^T(H+\\lambda I)p \\le 0` proves it is not, and raises
    :class:`~infl.errors.NotPositiveDefiniteError` (so does :math:`r^T M^{-1} r \\le 0`, an
    indefinite preconditioner). Reaching ``max_iter`` without meeting the tolerance gives
    ``converged=False`` and an :class:`~infl.errors.InflWarning`.
    Cost: at most ``max_iter`` operator applications of ``k`` vectors, plus the
    preconditioner's fit (Arnoldi: ``krylov_dim`` HVPs, once) and one :math:`M^{-1}` per
    iteration (Arnoldi: :math:`O(k r p)`, no HVP); memory ``O(k p)`` plus the preconditioner's
    (Arnoldi: ``r p``). ``info`` names the preconditioner and its facts (``preconditioner_*``);
    ``SolveResult.info["iterations"]`` repeats the iteration count.

    Examples
    --------
    >>> import torch
    >>> from infl.operators import DenseOperator
    >>> A = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
    >>> r = ConjugateGradient().solve(A, torch.tensor([3.0, 4.0]))
    >>> r.converged, r.value.round(decimals=6)
    (True, tensor([[1., 1.]], dtype=torch.float64))
    >>> from infl.solvers.arnoldi import Arnoldi
    >>> pcg = ConjugateGradient(damping=0.5, preconditioner=Arnoldi(rank=1))
    >>> pcg.fit(A).info["preconditioner"]
    'Arnoldi'
    """

    damping: float = 0.0
    rtol: float = 1e-6
    atol: float = 0.0
    max_iter: int = 100
    preconditioner: Solver | None = None

    def __post_init__(self) -> None:
        check_damping(self.damping)
        check_positive("max_iter", self.max_iter, integer=True)
        if self.rtol < 0 or self.atol < 0 or (self.rtol == 0 and self.atol == 0):
            raise InputError(
                f"need rtol >= 0 and atol >= 0 with at least one positive, got "
                f"rtol={self.rtol}, atol={self.atol}"
            )
        pre = self.preconditioner
        if pre is None:
            return
        if not isinstance(pre, Solver):
            raise InputError(
                f"preconditioner must be an unfitted infl solver such as Arnoldi(rank=20) (or "
                f"None), got {type(pre).__name__}; ConjugateGradient fits it itself on the same "
                "operator at the same damping."
            )
        if isinstance(pre, (ConjugateGradient, LiSSA)):
            raise InputError(
                f"preconditioner={type(pre).__name__}(...) is iterative, not a fixed linear map, "
                "so PCG would not be conjugate; use an approximate direct solver such as "
                "Arnoldi(rank=20)."
            )
        if isinstance(pre, Arnoldi) and self.damping == 0:
            raise InputError(
                "an Arnoldi preconditioner needs damping > 0: PCG uses it with the complement "
                "(I - U^T U)/damping so that it is positive definite. Set damping > 0 on "
                "ConjugateGradient, or use preconditioner=None."
            )

    def fit(self, operator: LinearOperator, *, progress: bool = False) -> FittedCG:
        """Bind to ``operator``; with a preconditioner, fit it (its fit's cost, once)."""
        if self.preconditioner is None:
            return FittedCG(self, operator)
        changes: dict[str, Any] = {"damping": self.damping}
        if isinstance(self.preconditioner, Arnoldi):
            changes.update(complement=True, check_residuals=False)
        pre_solver: Any = self.preconditioner  # a frozen dataclass, as every Solver is
        fitted = dataclasses.replace(pre_solver, **changes).fit(operator, progress=progress)
        if fitted.low_rank() is not None:
            raise InputError(
                f"preconditioner {type(self.preconditioner).__name__} fitted to a low-rank "
                "(singular) inverse; PCG needs a positive definite one. Use a solver that "
                "inverts the whole space."
            )
        return FittedCG(self, operator, fitted)


class FittedCG(FittedSolver):
    """:class:`ConjugateGradient` bound to an operator (and its fitted preconditioner, if any).

    Without a preconditioner fitting costs nothing; :meth:`with_damping` re-damps the
    preconditioner through its own ``with_damping`` (Arnoldi: no HVP).
    """

    def __init__(
        self,
        solver: ConjugateGradient,
        operator: LinearOperator,
        preconditioner: FittedSolver | None = None,
    ) -> None:
        super().__init__(solver, operator)
        self.solver: ConjugateGradient = solver
        self.preconditioner = preconditioner

    @property
    def info(self) -> dict[str, Any]:
        out = super().info
        pre = self.preconditioner
        out["preconditioner"] = None if pre is None else type(pre.solver).__name__
        if pre is not None:
            for key, value in pre.info.items():
                if key not in ("solver", "damping"):
                    out[f"preconditioner_{key}"] = value
        return out

    def with_damping(self, damping: float) -> FittedCG:
        """The same solver at another :math:`\\lambda`; the preconditioner is re-damped by its
        own ``with_damping`` (no refit where it allows that)."""
        check_damping(damping)
        solver = dataclasses.replace(self.solver, damping=float(damping))
        pre = None if self.preconditioner is None else self.preconditioner.with_damping(damping)
        return FittedCG(solver, self.base, pre)

    def _precondition(self, r: torch.Tensor) -> torch.Tensor:
        if self.preconditioner is None:
            return r.clone()
        return self.preconditioner.solve(r).value

    def _check_rz(self, rz: torch.Tensor, rows: torch.Tensor, iteration: int) -> None:
        bad = rz <= 0
        if self.preconditioner is not None and bool(bad.any()):
            j = int(rows[bad.nonzero()[0]])
            raise NotPositiveDefiniteError(
                f"PCG: the preconditioner {type(self.preconditioner.solver).__name__} is not "
                f"positive definite (r^T M^-1 r = {float(rz[bad][0]):.4g} <= 0 for right-hand "
                f"side {j} at iteration {iteration}). Use keep='positive' for Arnoldi, a larger "
                "damping, or preconditioner=None."
            )

    def solve(self, rhs: torch.Tensor, *, progress: bool = False) -> SolveResult:
        cfg = self.solver
        b = as_rhs(rhs, self.operator)
        k = b.shape[0]
        bnorm = torch.linalg.vector_norm(b, dim=1)
        threshold = torch.clamp(cfg.rtol * bnorm, min=cfg.atol)
        safe_bnorm = bnorm.clamp_min(torch.finfo(b.dtype).tiny)
        x = torch.zeros_like(b)
        r = b.clone()
        rr = (r * r).sum(dim=1)  # squared residual norms
        active = torch.sqrt(rr) > threshold
        z = torch.zeros_like(b)
        rz = rr.clone()  # r^T M^-1 r (= r^T r without a preconditioner)
        start = active.nonzero().reshape(-1)
        if start.numel():
            z[start] = self._precondition(r[start])
            rz[start] = (r[start] * z[start]).sum(dim=1)
            self._check_rz(rz[start], start, 0)
        d = z.clone()
        history = [torch.sqrt(rr) / safe_bnorm]
        iterations = 0
        name = "CG" if self.preconditioner is None else "PCG"
        bar = tqdm(total=cfg.max_iter, desc=name, disable=not progress, leave=False)
        while bool(active.any()) and iterations < cfg.max_iter:
            idx = active.nonzero().reshape(-1)
            ad = self.operator.matmat(d[idx])
            curvature = (d[idx] * ad).sum(dim=1)
            if not torch.isfinite(ad).all():
                raise NonFiniteError(
                    f"{name}: the operator product is not finite at iteration {iterations + 1}"
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
            alpha = rz[idx] / curvature
            x[idx] += alpha[:, None] * d[idx]
            r[idx] -= alpha[:, None] * ad
            rr[idx] = (r[idx] * r[idx]).sum(dim=1)
            active[idx] = torch.sqrt(rr[idx]) > threshold[idx]
            iterations += 1
            still = idx[active[idx]]
            if still.numel():
                z_new = self._precondition(r[still])
                rz_new = (r[still] * z_new).sum(dim=1)
                self._check_rz(rz_new, still, iterations)
                beta = rz_new / rz[still]
                d[still] = z_new + beta[:, None] * d[still]
                rz[still] = rz_new
            history.append(torch.sqrt(rr) / safe_bnorm)
            bar.update(1)
        bar.close()
        residuals = torch.sqrt(rr) / safe_bnorm
        converged = not bool(active.any())
        if not converged:
            warnings.warn(
                f"{name} stopped at max_iter={cfg.max_iter} with relative residual up to "
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
            info={**self.info, "iterations": iterations},
        )
