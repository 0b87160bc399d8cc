"""LiSSA: the truncated Neumann-series inverse-HVP of Agarwal et al. (2017) / Koh & Liang (2017)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from infl.errors import (
    InflError,
    InflWarning,
    InputError,
    NonFiniteError,
    NotPositiveDefiniteError,
    SolverDivergedError,
)
from infl.operators import LinearOperator
from infl.solvers.base import (
    FittedSolver,
    Solver,
    SolveResult,
    as_rhs,
    check_damping,
    check_positive,
    relative_residuals,
)
from infl.spectral import (
    SCALE_MARGIN,
    SolverAdvice,
    advice_from_extremes,
    estimate_extreme_eigenvalues,
    lissa_depth,
)

AUTO_SCALE_LANCZOS_STEPS = 30
"""At most this many HVPs for the ``scale="auto"`` estimate of :math:`\\mu_{\\max}`."""

DIVERGENCE_FACTOR = 100.0
"""An increment larger than this multiple of ``||b||`` counts as divergence: in a convergent
full-batch run the increments never exceed ``||b||``."""


@dataclass(frozen=True)
class LiSSA(Solver):
    """Stochastic Neumann-series estimate of :math:`(H + \\lambda I)^{-1} b`.

    With :math:`A = H + \\lambda I`, scale :math:`\\sigma` and depth :math:`T`, each of the
    :math:`R` repeats runs

    .. math:: x_0 = b, \\qquad x_{t+1} = b + x_t - \\tilde A_t x_t / \\sigma,

    and returns :math:`x_T/\\sigma`; the repeats are averaged. :math:`\\tilde A_t` is
    :math:`A` on a fresh random minibatch of ``batch_size`` training examples, or the full-data
    :math:`A` when ``batch_size`` is ``None``. The recursion sums the Neumann series
    :math:`\\sigma^{-1}\\sum_{j \\le T} (I - A/\\sigma)^j b = A^{-1} b`, which converges iff all
    eigenvalues of :math:`A` lie in :math:`(0, 2\\sigma)`; the error falls like
    :math:`(1 - \\mu_{\\min}/\\sigma)^T`.

    Parameters
    ----------
    damping
        :math:`\\lambda \\ge 0`. Koh & Liang's code writes the recursion as
        :math:`x \\leftarrow b + (1 - d)x - Hx/\\sigma`; their :math:`d` is
        :math:`\\lambda/\\sigma` here, so that ``damping`` means :math:`H + \\lambda I` for every
        infl solver.
    scale
        :math:`\\sigma`, or ``"auto"``: :data:`infl.spectral.SCALE_MARGIN` (1.2) times a
        Lanczos estimate of the largest eigenvalue :math:`\\mu_{\\max}` of :math:`A` (costs up
        to 30 extra HVPs; see :func:`infl.diagnostics.advise`, which also gives the depth for a
        tolerance).
    depth
        :math:`T`, recursion steps per repeat.
    repeats
        :math:`R`, independent repeats averaged (useful only with ``batch_size``).
    batch_size
        Training examples per stochastic HVP; ``None`` uses the full data (deterministic).
    seed
        Seeds the minibatch draws.
    rtol
        Tolerance on the relative residual :math:`\\|A x - b\\|/\\|b\\|` for ``converged``; in
        full-data mode the recursion also stops early once every system meets it (its residual
        is exactly the latest increment, so the check is free).

    Raises
    ------
    SolverDivergedError
        When an iterate becomes non-finite or its increment exceeds 100 ``||b||``; the message
        names the step and a scale that would converge.

    Examples
    --------
    >>> import torch
    >>> from infl.operators import DenseOperator
    >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64)))
    >>> r = LiSSA(scale=3.0, depth=200).solve(A, torch.tensor([1.0, 1.0]))
    >>> r.value.round(decimals=4)
    tensor([[1.0000, 0.5000]], dtype=torch.float64)
    """

    damping: float = 0.0
    scale: float | Literal["auto"] = "auto"
    depth: int = 1000
    repeats: int = 1
    batch_size: int | None = None
    seed: int = 0
    rtol: float = 1e-3

    def __post_init__(self) -> None:
        check_damping(self.damping)
        if self.scale != "auto":
            if isinstance(self.scale, str):
                raise InputError(f"scale must be a positive number or 'auto', got {self.scale!r}")
            check_positive("scale", self.scale)
        check_positive("depth", self.depth, integer=True)
        check_positive("repeats", self.repeats, integer=True)
        if self.batch_size is not None:
            check_positive("batch_size", self.batch_size, integer=True)
        check_positive("rtol", self.rtol)

    @classmethod
    def advised(cls, advice: SolverAdvice, **overrides: Any) -> LiSSA:
        """LiSSA with the ``damping``, ``scale`` and ``depth`` of ``advice`` (``rtol = tol``).

        Any other field (``batch_size``, ``seed``, ...) may be given in ``overrides``.

        Raises
        ------
        InputError
            If no depth converges (``H + damping*I`` is not positive definite).
        """
        if advice.depth is None:
            raise InputError(
                f"no LiSSA depth converges: H + {advice.damping:g}*I has smallest eigenvalue "
                f"{advice.mu_min:.4g}. Use damping > {advice.min_damping:.4g} (for example "
                f"{advice.suggested_damping:.3g})."
            )
        kwargs: dict[str, Any] = {
            "damping": advice.damping,
            "scale": advice.scale,
            "depth": advice.depth,
            "rtol": advice.tol,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    def fit(self, operator: LinearOperator, *, progress: bool = False) -> FittedLiSSA:
        if self.batch_size is not None and not operator.supports_subsample:
            operator.subsample(self.batch_size, torch.Generator())  # raises, naming the fix
        if self.scale != "auto":
            return FittedLiSSA(self, operator, float(self.scale))
        top, bottom = estimate_extreme_eigenvalues(
            operator, max_iter=AUTO_SCALE_LANCZOS_STEPS, seed=self.seed
        )
        return FittedLiSSA(self, operator, None, hessian_extremes=(top, bottom))


class FittedLiSSA(FittedSolver):
    """:class:`LiSSA` bound to an operator, with its scale fixed.

    With ``scale="auto"`` it keeps the Lanczos estimates of :math:`H`'s extreme eigenvalues, so
    :meth:`with_damping` shifts them instead of running Lanczos again.
    """

    def __init__(
        self,
        solver: LiSSA,
        operator: LinearOperator,
        scale: float | None,
        *,
        hessian_extremes: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(solver, operator)
        self.solver: LiSSA = solver
        self.hessian_extremes = hessian_extremes
        if scale is None:
            if hessian_extremes is None:
                raise InputError("FittedLiSSA needs a scale or the Hessian's extreme eigenvalues")
            top, bottom = (v + solver.damping for v in hessian_extremes)
            if top == 0.0 and bottom == 0.0:
                raise InputError("scale='auto': the operator is zero, nothing to invert")
            if top <= 0.0:
                raise NotPositiveDefiniteError(
                    f"scale='auto': H + damping*I has no positive eigenvalue (largest ~= "
                    f"{top:.4g}, smallest ~= {bottom:.4g}) with damping={solver.damping:g}, "
                    f"so no LiSSA scale converges. Use damping > {solver.damping - bottom:.4g}."
                )
            scale = SCALE_MARGIN * top
        self.scale = scale

    @property
    def info(self) -> dict[str, Any]:
        facts = {**super().info, "scale": self.scale, "scale_auto": self.solver.scale == "auto"}
        if self.hessian_extremes is not None:
            facts["lanczos_max_eigenvalue"], facts["lanczos_min_eigenvalue"] = self.hessian_extremes
        return facts

    def with_damping(self, damping: float) -> FittedLiSSA:
        """Another :math:`\\lambda`; an automatic scale moves with it, with no new Lanczos run."""
        check_damping(damping)
        solver = replace(self.solver, damping=float(damping))
        if self.solver.scale == "auto":
            return FittedLiSSA(solver, self.base, None, hessian_extremes=self.hessian_extremes)
        return FittedLiSSA(solver, self.base, self.scale)

    def _step_operator(self, generator: torch.Generator) -> LinearOperator:
        if self.solver.batch_size is None:
            return self.operator
        return self.operator.subsample(self.solver.batch_size, generator)

    def _advice(self) -> SolverAdvice | None:
        """Spectrum-based advice for this operator (about 50 HVPs), or None if unavailable."""
        try:
            top, bottom = estimate_extreme_eigenvalues(
                self.operator, max_iter=50, seed=self.solver.seed
            )
        except InflError:
            return None
        lam = self.solver.damping
        return advice_from_extremes(top - lam, bottom - lam, damping=lam, tol=self.solver.rtol)

    def _diverged(self, step: int, repeat: int, increment: float) -> SolverDivergedError:
        what = (
            "a non-finite iterate"
            if not math.isfinite(increment)
            else (f"an increment of norm {increment:.3g} x ||b||")
        )
        head = (
            f"LiSSA diverged at step {step} of repeat {repeat} ({what}) with scale={self.scale:.4g}"
        )
        advice = self._advice()
        if advice is None:
            return SolverDivergedError(
                f"{head}: the recursion converges only when every eigenvalue of H + damping*I "
                "lies in (0, 2*scale). Increase scale above the top eigenvalue (or use "
                "scale='auto'); if it still diverges, increase damping."
            )
        top, bottom = advice.mu_max, advice.mu_min
        if top > 0 and self.scale <= top / 2:
            cause = (
                f"scale is below lambda_max(H + damping*I)/2 ~= {top / 2:.4g} (the recursion "
                "converges only when every eigenvalue lies in (0, 2*scale)): increase `scale` "
                f"above the top eigenvalue ~= {top:.4g}: use scale >= {advice.scale:.4g} (or "
                "scale='auto')."
            )
        elif bottom <= 0:
            cause = (
                f"H + damping*I has an eigenvalue ~= {bottom:.4g} <= 0 (Lanczos), so no scale "
                f"converges: increase damping above {advice.min_damping:.4g} (for example "
                f"damping={advice.suggested_damping:.3g})."
            )
        else:
            cause = (
                "the recursion converges only when every eigenvalue of H + damping*I lies in "
                f"(0, 2*scale); Lanczos estimates [{bottom:.4g}, {top:.4g}]. Use scale >= "
                f"{advice.scale:.4g} (or scale='auto'); if it still diverges, a negative "
                "eigenvalue was missed: increase damping."
            )
        return SolverDivergedError(f"{head}: {cause} Advice: {advice.summary()}")

    def _depth_text(self) -> str:
        """The depth this scale needs for rtol, from Lanczos estimates; "" if unavailable."""
        advice = self._advice()
        if advice is None:
            return ""
        if not advice.positive_definite:
            return (
                f"Lanczos finds an eigenvalue of H + damping*I ~= {advice.mu_min:.4g} <= 0: use "
                f"damping > {advice.min_damping:.4g} (e.g. {advice.suggested_damping:.3g})."
            )
        need = lissa_depth(advice.mu_min, advice.mu_max, self.scale, self.solver.rtol)
        if need is None:
            return f"Advice: {advice.summary()}"
        return (
            f"With scale={self.scale:.4g} and Lanczos estimates lambda in "
            f"[{advice.mu_min:.4g}, {advice.mu_max:.4g}], full-batch LiSSA needs depth >= "
            f"{need} for rtol={self.solver.rtol:g} (an underestimate if lambda_min is smaller)."
        )

    def solve(self, rhs: torch.Tensor, *, progress: bool = False) -> SolveResult:
        cfg = self.solver
        b = as_rhs(rhs, self.operator)
        bnorm = torch.linalg.vector_norm(b, dim=1).clamp_min(torch.finfo(b.dtype).tiny)
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        total = torch.zeros_like(b)
        history: list[torch.Tensor] = []
        steps = 0
        deterministic = cfg.batch_size is None
        bar = tqdm(total=cfg.depth * cfg.repeats, desc="LiSSA", disable=not progress, leave=False)
        for repeat in range(cfg.repeats):
            x = b.clone()
            for step in range(1, cfg.depth + 1):
                ax = self._step_operator(generator).matmat(x)
                increment = b - ax / self.scale
                x = x + increment
                rel = torch.linalg.vector_norm(increment, dim=1) / bnorm
                history.append(rel)
                steps += 1
                bar.update(1)
                worst = float(rel.max())
                if not math.isfinite(worst) or worst > DIVERGENCE_FACTOR:
                    bar.close()
                    raise self._diverged(step, repeat, worst)
                if deterministic and worst <= cfg.rtol:
                    break
            total += x / self.scale
        bar.close()
        value = total / cfg.repeats
        if not torch.isfinite(value).all():
            raise NonFiniteError("LiSSA produced a non-finite estimate")
        residuals = relative_residuals(self.operator, value, b)
        converged = bool((residuals <= cfg.rtol).all())
        if not converged:
            warnings.warn(
                f"LiSSA finished depth={cfg.depth} with relative residual up to "
                f"{float(residuals.max()):.3g} > rtol={cfg.rtol:g}. The error shrinks like "
                f"(1 - lambda_min/scale)^depth: increase depth, add damping, or (for stochastic "
                f"runs) increase batch_size or repeats. {self._depth_text()}".rstrip(),
                InflWarning,
                stacklevel=2,
            )
        return SolveResult(
            value=value,
            converged=converged,
            iterations=steps,
            residual_norms=residuals,
            trace=torch.stack(history),
            info=self.info,
        )
