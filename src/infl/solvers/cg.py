"""Conjugate gradient on many right-hand sides at once, optionally preconditioned."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from infl.errors import InflWarning, InputError, NonFiniteError, NotPositiveDefiniteError
from infl.finite import all_finite
from infl.mixed_precision import full_precision_operator, product_dtype
from infl.operators import LinearOperator
from infl.solvers.arnoldi import Arnoldi
from infl.solvers.base import (
    SPEC_OMIT_DEFAULT,
    FittedSolver,
    Solver,
    SolveResult,
    as_rhs,
    check_damping,
    check_positive,
    solver_from_spec,
    solver_spec,
)
from infl.solvers.block_cg import (
    active_rows,
    add_rows,
    iterate_block,
    squared_norms,
    update_norms,
)
from infl.solvers.cg_floor import RoundoffFloor
from infl.solvers.cg_refine import solve_refined
from infl.solvers.lissa import LiSSA
from infl.spectral.advice import DAMPING_RTOL
from infl.spectral.damping import AUTO_DAMPING_RETRIES, AutoDamping, auto_damping


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
        :math:`\\lambda \\ge 0`, or ``"auto"``: at ``fit``, one Lanczos run on :math:`H`
        (at most :data:`~infl.spectral.AUTO_DAMPING_LANCZOS_STEPS` = 60 HVPs) estimates
        :math:`\\theta_{\\min} \\ge \\lambda_{\\min}(H)` and :math:`\\theta_{\\max}`, and
        :math:`\\lambda = -(1+c)(\\theta_{\\min} - r_{\\min}) + 10^{-3}|\\theta_{\\max}|`
        (:math:`c = 0.5`, :math:`r_{\\min}` the Ritz residual; 0 when :math:`H` is safely positive
        definite) — the rule of :mod:`infl.spectral.damping`. Because :math:`\\theta_{\\min}` is
        only an upper bound on :math:`\\lambda_{\\min}(H)`, a solve can still meet negative
        curvature: ``"auto"`` then raises :math:`\\lambda` (see Notes) instead of failing.
        ``info`` records the resolved ``damping``, ``damping_auto=True``, the estimates, the
        margin, the rule and every attempt (``damping_attempts``).
    rtol, atol
        Stop system ``j`` when :math:`\\|r_j\\| \\le \\max(\\text{rtol}\\|b_j\\|, \\text{atol})`
        (the true residual :math:`b_j - A x_j`, with or without a preconditioner). CG updates
        the residual recursively; below :math:`\\sqrt{\\varepsilon}` of the product dtype
        (:math:`1.5\\times 10^{-8}` in float64, :math:`3.5\\times 10^{-4}` in float32), where
        the two can part by :math:`O(\\varepsilon\\kappa)`, one more product measures the
        true one at the end. A system whose true residual misses the tolerance is reported as
        not converged, with its true residual and a warning (``info["true_residual_checked"]``).
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
    block
        ``False`` (default): the ``k`` independent recursions above. ``True``: breakdown-free
        block (P)CG (Ji & Li, BIT 2017), in which the ``k`` systems share one block Krylov space
        that grows by up to ``k`` dimensions per iteration. With the residuals as columns
        :math:`R = B`, :math:`Z = M^{-1}R`, :math:`P = \\operatorname{orth}(Z)`, each iteration is

        .. math::

            Q = AP,\\quad \\alpha = (P^TQ)^{-1}P^TR,\\quad X \\mathrel{+}= P\\alpha,\\quad
            R \\mathrel{-}= Q\\alpha,\\quad Z = M^{-1}R,\\quad
            P = \\operatorname{orth}\\bigl(Z - P(P^TQ)^{-1}Q^TZ\\bigr),

        where :math:`\\operatorname{orth}` is an orthonormal basis (thin SVD) that drops the
        directions whose singular value is below
        :data:`~infl.solvers.block_cg.BLOCK_DEFLATION_RTOL` (``1e-8`` in
        float64, ``1e-5`` in float32) times the largest, after scaling each system's column by
        its tolerance. That deflation is what removes plain block CG's breakdown (its block
        loses rank when right-hand sides are dependent or some converge first); the block also
        never grows back (block Krylov increments only shrink). A system that meets its
        tolerance leaves :math:`R` (and ``x_j`` stays fixed), so the block has at most as many
        directions as systems still active. Cost per iteration: one ``matmat`` of
        :math:`s \\le k` vectors, one :math:`M^{-1}` of the active residuals, and
        :math:`O(pk^2)` dense work (the SVD, :math:`P^TQ`, :math:`P^TR`); memory
        :math:`O(pk)` (:math:`X, R, Z, P, Q`). It helps with many right-hand sides and a
        spread spectrum: on a 200-dimensional SPD matrix with :math:`\\kappa = 10^3` and
        ``k = 8`` random right-hand sides it took 45 iterations where the independent
        recursions took 276 (``rtol=1e-10``). ``residual_norms`` and ``trace`` are the
        recursive residuals, as without ``block``. :math:`P^TQ` is the Rayleigh-Ritz matrix of
        :math:`A` on the block, so a smallest eigenvalue :math:`\\le 0` is negative curvature
        (its eigenvector in :math:`P` is the direction reported; ``damping="auto"`` works as
        below). In mixed precision (``curvature_dtype``) each inner solve of the refinement is a
        block CG solve.

    Notes
    -----
    CG needs :math:`H + \\lambda I` positive definite. A search direction with
    :math:`p^T(H+\\lambda I)p \\le 0` proves it is not, and raises
    :class:`~infl.errors.NotPositiveDefiniteError` (so does :math:`r^T M^{-1} r \\le 0`, an
    indefinite preconditioner). Reaching ``max_iter`` without meeting the tolerance gives
    ``converged=False`` and an :class:`~infl.errors.InflWarning`.

    With ``damping="auto"``, negative curvature :math:`\\rho = p^T(H+\\lambda I)p/p^Tp \\le 0`
    instead raises the damping and restarts the solve, at most
    :data:`~infl.spectral.AUTO_DAMPING_RETRIES` (4) times: :math:`\\lambda_{\\min}(H) \\le
    \\rho - \\lambda`, so the new :math:`\\lambda` is the same rule applied to
    :math:`\\min(\\theta_{\\min} - r_{\\min}, \\rho - \\lambda)`, and at least :math:`2\\lambda`
    (:meth:`AutoDamping.raised <infl.spectral.AutoDamping.raised>`). Each raise warns
    (:class:`~infl.errors.InflWarning`), is recorded in ``info["damping_attempts"]`` and
    *stays*: the fitted solver (and a calculator holding it) solves every later right-hand side
    at the raised :math:`\\lambda`, so all scores share one damping. If the retries run out the
    error names the damping to pass explicitly.
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

    damping: float | Literal["auto"] = 0.0
    rtol: float = 1e-6
    atol: float = 0.0
    max_iter: int = 100
    preconditioner: Solver | None = None
    block: bool = dataclasses.field(default=False, metadata={SPEC_OMIT_DEFAULT: True})

    def __post_init__(self) -> None:
        check_damping(self.damping, allow_auto=True)
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
        """Bind to ``operator``; with a preconditioner, fit it (its fit's cost, once).

        With ``damping="auto"``, first resolve :math:`\\lambda` (one Lanczos run, at most 60
        HVPs); a preconditioner that needs :math:`\\lambda > 0` (Arnoldi) gets at least
        :math:`10^{-3}|\\theta_{\\max}|`.
        """
        operator.expect_products(self.max_iter)  # small p: assemble the matrix once (dense="auto")
        auto = auto_damping(operator) if self.damping == "auto" else None
        if self.preconditioner is None:
            return FittedCG(self, operator, auto_damping=auto)
        if auto is not None and isinstance(self.preconditioner, Arnoldi):
            auto = auto.at_least(DAMPING_RTOL * abs(auto.hessian_max))
        lam = auto.damping if auto is not None else float(self.damping)
        changes: dict[str, Any] = {"damping": lam}
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
        return FittedCG(self, operator, fitted, auto_damping=auto)

    def restore(self, operator: LinearOperator, state: dict[str, Any]) -> FittedCG:
        """:class:`FittedCG` from a saved state: nothing, or the preconditioner's (no HVP).

        It announces its products as :meth:`fit` does, so that the restored solver answers
        them the same way (on a small model, from the dense matrix, assembled again: for a
        plain MLP in closed form, with no HVP) and its scores equal the saved fit's."""
        operator.expect_products(self.max_iter)
        saved = state.get("preconditioner")
        if (saved is None) != (self.preconditioner is None):
            raise InputError(
                f"the saved ConjugateGradient state {'has no' if saved is None else 'has a'} "
                f"preconditioner and this solver {'has one' if saved is None else 'has none'}: "
                "it was saved with other settings. Refit the solver and save it again."
            )
        if saved is None:
            return FittedCG(self, operator)
        if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
            raise InputError(
                "the saved PCG preconditioner state is not a {solver, state} dict: it was "
                "written by another version of infl. Refit the solver and save it again."
            )
        pre = solver_from_spec(saved.get("solver")).restore(operator, saved["state"])
        return FittedCG(self, operator, pre)


class _NegativeCurvature(Exception):
    """A direction with :math:`p^T A p \\le 0` (internal: turned into an error or a retry)."""

    def __init__(
        self, iteration: int, rhs_index: int, rayleigh: float, direction: torch.Tensor | None = None
    ) -> None:
        super().__init__(iteration, rhs_index, rayleigh)
        self.iteration = iteration
        self.rhs_index = rhs_index
        self.rayleigh = rayleigh
        self.direction = direction  # the direction p (``[p]``), for a check in full precision


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
        *,
        auto_damping: AutoDamping | None = None,
    ) -> None:
        super().__init__(solver, operator, auto_damping=auto_damping)
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

    def state(self) -> dict[str, Any]:
        """Nothing for plain CG; the fitted preconditioner's solver and state for PCG."""
        pre = self.preconditioner
        if pre is None:
            return {"preconditioner": None}
        return {"preconditioner": {"solver": solver_spec(pre.solver), "state": pre.state()}}

    def with_damping(self, damping: float) -> FittedCG:
        """The same solver at another :math:`\\lambda`; the preconditioner is re-damped by its
        own ``with_damping`` (no refit where it allows that)."""
        check_damping(damping)
        solver = dataclasses.replace(self.solver, damping=float(damping))
        pre = None if self.preconditioner is None else self.preconditioner.with_damping(damping)
        return FittedCG(solver, self.base, pre)

    def _raise_damping(self, event: _NegativeCurvature) -> None:
        """``damping="auto"``: move to the next :math:`\\lambda` (in place, with a warning)."""
        assert self.auto_damping is not None
        old = self.damping
        self.auto_damping = self.auto_damping.raised(event.rayleigh, event.iteration)
        self.operator = self.base.damped(self.damping)
        if self.preconditioner is not None:
            self.preconditioner = self.preconditioner.with_damping(self.damping)
        warnings.warn(
            f"CG (damping='auto') met negative curvature at iteration {event.iteration} with "
            f"damping={old:.4g} (Rayleigh quotient {event.rayleigh:.4g} of H + damping*I): the "
            f"Lanczos estimate of lambda_min(H) was too optimistic. Raised damping to "
            f"{self.damping:.4g} (attempt {len(self.auto_damping.attempts)} of "
            f"{AUTO_DAMPING_RETRIES}); every later solve uses it. info['damping_attempts'] "
            "lists the attempts.",
            InflWarning,
            stacklevel=3,
        )

    def _negative_curvature_error(self, event: _NegativeCurvature) -> NotPositiveDefiniteError:
        rayleigh, lam = event.rayleigh, self.damping
        head = (
            f"CG found negative curvature at iteration {event.iteration} (right-hand side "
            f"{event.rhs_index}): a direction p with p^T (H + damping*I) p / p^T p = "
            f"{rayleigh:.4g} <= 0, so with damping={lam:.4g} H + damping*I is not positive "
            "definite. This Rayleigh quotient is only an UPPER bound on lambda_min(H + damping*I) "
            "(CG saw one direction, not the smallest eigenvector), so damping + |rayleigh| = "
            f"{lam + abs(rayleigh):.4g} is only a LOWER bound on the damping needed; the damping "
            "needed may be much larger."
        )
        if self.auto_damping is not None:
            tried = ", ".join(f"{a['damping']:.4g}" for a in self.auto_damping.attempts)
            nxt = self.auto_damping.raised(rayleigh, event.iteration).damping
            return NotPositiveDefiniteError(
                f"{head} damping='auto' already raised the damping {AUTO_DAMPING_RETRIES} times "
                f"(tried {tried}, {lam:.4g}). Next step: run calc.advise() (or "
                "infl.diagnostics.advise(operator)) with a longer Lanczos run, e.g. "
                "infl.diagnostics.hessian_spectrum(operator, k=20, max_iter=300), and pass "
                f"damping > -lambda_min explicitly (at least {nxt:.4g}); or use "
                "ExactHessian(pseudo_inverse=True) on a small model."
            )
        return NotPositiveDefiniteError(
            f"{head} To get the real one: run calc.advise() (or "
            "infl.diagnostics.advise(operator)), whose Lanczos estimate of lambda_min(H) gives "
            "min_damping and suggested_damping, or construct the solver with damping='auto', "
            "which estimates lambda_min(H) at fit time and raises the damping on negative "
            "curvature. On a small model ExactHessian(pseudo_inverse=True) needs no damping."
        )

    @property
    def _name(self) -> str:
        """``CG``, ``PCG``, ``block CG`` or ``block PCG`` (for progress bars and messages)."""
        name = "CG" if self.preconditioner is None else "PCG"
        return f"block {name}" if self.solver.block else name

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
        b = as_rhs(rhs, self.operator)
        while True:
            try:
                full = full_precision_operator(self.operator)
                if full is None or self.operator.answers_dense:  # exact products already
                    return self._solve(b, progress)
                return solve_refined(self, b, full, progress)
            except _NegativeCurvature as event:
                auto = self.auto_damping
                if auto is None or len(auto.attempts) >= AUTO_DAMPING_RETRIES:
                    raise self._negative_curvature_error(event) from None
                self._raise_damping(event)

    def _thresholds(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(max(rtol ||b_j||, atol), ||b_j||`` kept above 0)`` per right-hand side."""
        bnorm = torch.linalg.vector_norm(b, dim=1)
        threshold = torch.clamp(self.solver.rtol * bnorm, min=self.solver.atol)
        return threshold, bnorm.clamp_min(torch.finfo(b.dtype).tiny)

    def _solve(self, b: torch.Tensor, progress: bool) -> SolveResult:
        cfg = self.solver
        k = b.shape[0]
        threshold, safe_bnorm = self._thresholds(b)
        name = self._name
        below = self._below_recursive_accuracy(threshold / safe_bnorm)
        floor = RoundoffFloor(self.operator, b, threshold) if below else None
        with tqdm(total=cfg.max_iter, desc=name, disable=not progress, leave=False) as bar:
            x, rr, iterations, norms = self._iterate(
                self.operator, b, threshold, cfg.max_iter, bar, floor=floor
            )
        history = [norm / safe_bnorm for norm in norms]
        claimed = torch.sqrt(rr) <= threshold
        stalled = torch.zeros_like(claimed)
        if floor is not None:  # the recursive residual may have left the true one
            stalled = floor.stalled
            claimed |= stalled  # stalled: reached what it can
            if bool((claimed & ~floor.verified).any()):  # one more product, then all are true
                rows = (~floor.verified).nonzero().reshape(-1)
                rr[rows] = floor.true_norms(x, rows).square()
        info = {**self.info, "iterations": iterations}
        info["true_residual_checked"] = below and bool(claimed.any())
        info["roundoff_floor_stops"] = int(stalled.sum())
        residuals = torch.sqrt(rr) / safe_bnorm
        active = torch.sqrt(rr) > threshold
        unattained = claimed & active
        converged = not bool(active.any())
        if bool(unattained.any()):
            dtype = product_dtype(self.operator)
            self._warn_unattained(name, residuals[unattained], int(unattained.sum()), k, dtype)
        if bool((active & ~claimed).any()):
            self._warn_not_converged(name, residuals, int((active & ~claimed).sum()), k)
        return SolveResult(
            value=x,
            converged=converged,
            iterations=iterations,
            residual_norms=residuals,
            trace=torch.stack(history),
            info=info,
        )

    def _below_recursive_accuracy(self, relative: torch.Tensor) -> bool:
        """Whether some system's relative tolerance is below :math:`\\sqrt{\\varepsilon}` of the
        product dtype, where CG's recursively updated residual can drift from the true one
        (by :math:`O(\\varepsilon \\kappa)`): the true residual is then measured where the
        recursive one passes the round-off floor (:mod:`infl.solvers.cg_floor`) and at the
        end, as the tolerance promises."""
        eps = float(torch.finfo(product_dtype(self.operator)).eps)
        return bool((relative < eps**0.5).any())

    def _warn_unattained(
        self, name: str, residuals: torch.Tensor, count: int, k: int, dtype: torch.dtype
    ) -> None:
        worst = float(residuals.max())
        warnings.warn(
            f"{name}: {count} of {k} right-hand sides cannot reach rtol={self.solver.rtol:g} "
            f"with {str(dtype).removeprefix('torch.')} products: the residual CG updates goes on "
            f"falling, but the true relative residual ||b - A x|| / ||b|| stays at up to "
            f"{worst:.3g} (CG stops a system once the two have parted). Those systems are "
            f"reported as not converged, with their true residuals. Use rtol >= {worst:.0e}, "
            "or a float64 model.",
            InflWarning,
            stacklevel=4,
        )

    def _iterate(
        self,
        operator: LinearOperator,
        b: torch.Tensor,
        threshold: torch.Tensor,
        max_iter: int,
        bar: Any,
        rows: torch.Tensor | None = None,
        first: int = 0,
        floor: RoundoffFloor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int, list[torch.Tensor]]:
        """(P)CG on ``operator`` from :math:`x_0 = 0` until each :math:`\\|r_j\\| \\le`
        ``threshold[j]`` or ``max_iter`` iterations: ``(x, r^T r, iterations, [||r||] per
        iteration)``; the residual is the recursive one, except for systems that ``floor``
        stopped (their true one). ``rows`` (the rows of ``b`` in the caller's right-hand
        sides) and ``first`` (iterations before this call) only name things in errors."""
        if self.solver.block:
            return iterate_block(self, operator, b, threshold, max_iter, bar, rows, first, floor)
        x = torch.zeros_like(b)
        r = b.clone()
        rr = squared_norms(r)
        norm = torch.sqrt(rr)
        active = norm > threshold
        z = torch.zeros_like(b)
        rz = rr.clone()  # r^T M^-1 r (= r^T r without a preconditioner)
        idx = active.nonzero().reshape(-1)
        ids = rows if rows is not None else torch.arange(b.shape[0], device=b.device)
        if idx.numel():
            z[idx] = self._precondition(r[idx])
            rz[idx] = (r[idx] * z[idx]).sum(dim=1)
            self._check_rz(rz[idx], ids[idx], first)
        d = z.clone()
        norms = [norm]
        iterations = 0
        name = self._name
        k = b.shape[0]
        while idx.numel() and iterations < max_iter:
            sel = active_rows(idx, k)  # a view while every system is active
            directions = d[sel]
            ad = operator.matmat(directions)
            if not all_finite(ad):
                raise NonFiniteError(
                    f"{name}: the operator product is not finite at iteration "
                    f"{first + iterations + 1}"
                )
            curvature = torch.linalg.vecdot(directions, ad)
            if float(curvature.min()) <= 0:
                bad = int((curvature <= 0).nonzero()[0])
                j = int(idx[bad])
                rayleigh = float(curvature[bad] / (d[j] * d[j]).sum())
                raise _NegativeCurvature(
                    first + iterations + 1, int(ids[j]), rayleigh, d[j].clone()
                )
            alpha = rz[sel] / curvature
            step = alpha.unsqueeze(1)
            add_rows(x, sel, directions, scale=step)
            add_rows(r, sel, ad, scale=step, alpha=-1.0)
            rr, norm, active = update_norms(r, rr, active, threshold, sel, idx)
            iterations += 1
            if floor is not None:
                floor.add(sel, alpha.abs() * torch.linalg.vector_norm(ad, dim=1))
                if floor.review(x, rr, active, norm):
                    norm = torch.sqrt(rr)
            idx = active.nonzero().reshape(-1)  # a subset of the last: none comes back
            if idx.numel():
                kept = active_rows(idx, k)
                residuals = r[kept]
                if self.preconditioner is None:
                    z_new, rz_new = residuals, rr[kept]
                else:
                    z_new = self._precondition(residuals)
                    rz_new = torch.linalg.vecdot(residuals, z_new)
                    self._check_rz(rz_new, ids[idx], first + iterations)
                beta = (rz_new / rz[kept]).unsqueeze(1)
                if isinstance(kept, slice):
                    d.mul_(beta).add_(z_new)
                    rz.copy_(rz_new)
                else:
                    d[idx] = torch.addcmul(z_new, beta, d[idx])
                    rz[idx] = rz_new
            norms.append(norm)
            bar.update(1)
        return x, rr, iterations, norms

    def _warn_not_converged(
        self, name: str, residuals: torch.Tensor, left: int, k: int, stacklevel: int = 4
    ) -> None:
        cfg = self.solver
        warnings.warn(
            f"{name} stopped at max_iter={cfg.max_iter} with relative residual up to "
            f"{float(residuals.max()):.3g} on {left} of {k} right-hand sides "
            f"(rtol={cfg.rtol:g}). Increase max_iter, or add damping to improve the "
            "conditioning of H + damping*I. CG needs at most ~sqrt(kappa)/2 * ln(2/rtol) "
            "iterations, kappa the condition number of H + damping*I: "
            "infl.diagnostics.advise(operator, damping=...) estimates both.",
            InflWarning,
            stacklevel=stacklevel,
        )
