"""Low-rank inverse-HVPs from the top eigenpairs of the Hessian (Schioppa et al., 2022)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from infl.errors import InflWarning, InputError, NotPositiveDefiniteError
from infl.operators import LinearOperator
from infl.solvers.base import (
    FittedSolver,
    Solver,
    SolveResult,
    as_rhs,
    check_damping,
    check_positive,
    relative_residuals,
    state_tensor,
)
from infl.spectral.advice import DAMPING_RTOL
from infl.spectral.damping import AutoDamping, auto_damping_exact, auto_damping_from_ritz
from infl.spectral.lanczos import lanczos

Keep = Literal["positive", "magnitude"]


@dataclass(frozen=True)
class Arnoldi(Solver):
    """:math:`(H+\\lambda I)^{-1} b \\approx U^T \\operatorname{diag}(1/(\\mu+\\lambda)) U b`
    from the top ``rank`` eigenpairs of :math:`H`.

    "Scaling up influence functions" (Schioppa, Zablotskaia, Vilar & Sokolov, AAAI 2022):
    run a Krylov method on the *undamped* :math:`H` for :math:`m` = ``krylov_dim`` steps, keep
    the ``rank`` = :math:`r` leading Ritz pairs :math:`(\\mu_i, u_i)` and invert
    :math:`H + \\lambda I` on their span only. :math:`H` is symmetric, so the Arnoldi process is
    Lanczos; infl's one implementation (:func:`infl.spectral.lanczos.lanczos`, full
    reorthogonalisation) supplies the pairs. With ``U`` the ``[r, p]`` matrix of the
    :math:`u_i` as rows,

    .. math::

        x = U^T \\operatorname{diag}\\Big(\\frac{1}{\\mu_i+\\lambda}\\Big) U b
            \\;+\\; [\\text{complement}]\\; \\frac{(I - U^T U) b}{\\lambda}.

    The complement term treats :math:`H` as zero outside the span (exact when :math:`H` has
    rank :math:`\\le r`); without it the part of :math:`b` outside the span is dropped, which is
    Schioppa et al.'s estimator and what lets :class:`~infl.InfluenceCalculator` score with
    ``[n, r]`` projected gradients.

    Parameters
    ----------
    rank
        :math:`r \\ge 1`, eigenpairs kept (at most ``p``; checked at ``fit``).
    krylov_dim
        :math:`m \\ge r`, Lanczos steps = HVPs (default ``max(2r, r + 20)``, capped at ``p``).
        Larger :math:`m` makes the top :math:`r` Ritz pairs more accurate.
    damping
        :math:`\\lambda \\ge 0`, applied at solve time: :meth:`FittedArnoldi.with_damping`
        reuses the eigenpairs (no HVP). Or ``"auto"``: read off the smallest and largest Ritz
        values of the fit's own Lanczos run (no extra HVP) by the rule of
        :mod:`infl.spectral.damping`, :math:`\\lambda = -(1+c)(\\theta_{\\min} - r_{\\min}) +
        10^{-3}|\\theta_{\\max}|` (0 when :math:`H` looks safely positive definite; at least
        :math:`10^{-3}|\\theta_{\\max}|` with ``complement=True``). The run targets the top of
        the spectrum, so :math:`\\theta_{\\min}` is a rough upper bound on :math:`\\lambda_{\\min}`.
    keep
        ``"positive"`` (default): the :math:`r` largest *positive* Ritz values; negative ones
        never take a slot and ``info["num_negative_dropped"]`` counts those that the
        ``"magnitude"`` rule would have kept. ``"magnitude"``: the :math:`r` largest
        :math:`|\\mu_i|`, negative ones included (Schioppa et al.'s choice; the result is then
        an indefinite operator when :math:`\\mu_i + \\lambda < 0`).
    complement
        Add :math:`(I - U^TU)b/\\lambda` (needs :math:`\\lambda > 0`). This makes the inverse
        positive definite, as a CG preconditioner needs, but it is no longer low-rank. When
        the eigenvalues left out are small next to :math:`\\lambda` it is far more accurate
        for the same HVPs (digits MLP, :math:`\\lambda = 0.1`, ``rank = krylov_dim = 30``:
        Pearson 0.977 with the exact scores against 0.893 without); when they are not, the
        ranking still improves but the values overshoot (docs/solvers.md, "Arnoldi").
    seed
        Seeds Lanczos's start vector (same seed, same eigenpairs).
    check_residuals
        Make every ``solve`` measure :math:`\\|(H+\\lambda I)x_j - b_j\\| / \\|b_j\\|` (``k`` HVPs
        per solve). Off by default: ``residual_norms`` is then NaN (not measured).

    Notes
    -----
    Cost of ``fit``: :math:`m` HVPs (one vector each), :math:`O(m^2 p)` flops of
    reorthogonalisation, memory :math:`O(m p)` during the fit and :math:`r p` after it. Each
    ``solve`` of ``k`` right-hand sides is :math:`O(k r p)` and no HVP. ``info`` reports the rank
    kept, the range of kept eigenvalues, negatives dropped, Lanczos iterations, HVPs and the
    Ritz residuals :math:`\\|H u_i - \\mu_i u_i\\|` (each :math:`\\mu_i` is within its residual
    of an eigenvalue of :math:`H`).

    Small models: the fit announces its :math:`m` products to the operator
    (:meth:`~infl.operators.LinearOperator.expect_products`). An operator over training data
    with ``dense="auto"`` answers them from its ``[p, p]`` matrix when that is already
    assembled or assembling it (``p`` products in batched blocks) costs fewer passes over the
    data (:meth:`~infl.operators.TrainingDataOperator.dense_pays`; on Iris, ``p = 43``, for
    :math:`m \\ge 3`): the same Ritz pairs to round-off, without the per-product overhead. When
    moreover :math:`m \\ge p` the Lanczos run
    would exhaust the space, and the pairs come from ``torch.linalg.eigh`` of that matrix
    instead (all exact). ``info["dense_matrix"]`` and ``info["eigensolver"]`` (``"lanczos"``
    or ``"eigh"``) say which ran; ``info["num_hvps"]`` counts the products that took a pass
    over the data (the assembly's ``p`` included), ``lanczos_iterations`` is 0 for ``"eigh"``.

    How it fails: directions of :math:`b` outside the top-:math:`r` span are lost (or, with
    ``complement``, scaled by :math:`1/\\lambda`); when the spectrum decays slowly or
    :math:`\\lambda` is small relative to the discarded eigenvalues, the error stays large
    whatever :math:`m`. Compare against ``ConjugateGradient`` on a few test points.

    Examples
    --------
    >>> import torch
    >>> from infl.operators import DenseOperator
    >>> A = DenseOperator(torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)))
    >>> fitted = Arnoldi(rank=2, damping=1.0).fit(A)
    >>> [round(mu, 6) for mu in fitted.info["eigenvalues_kept"]]
    [4.0, 2.0]
    >>> x = fitted.solve(torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64)).value
    >>> [round(v, 6) + 0.0 for v in x[0].tolist()]  # the third direction is not in the span
    [1.0, 1.0, 0.0]
    """

    rank: int
    krylov_dim: int | None = None
    damping: float | Literal["auto"] = 0.0
    keep: Keep = "positive"
    complement: bool = False
    seed: int = 0
    check_residuals: bool = False

    def __post_init__(self) -> None:
        check_damping(self.damping, allow_auto=True)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise InputError(f"rank must be a positive integer, got {self.rank!r}")
        check_positive("rank", self.rank, integer=True)
        if self.krylov_dim is not None:
            if isinstance(self.krylov_dim, bool) or not isinstance(self.krylov_dim, int):
                raise InputError(
                    f"krylov_dim must be an integer >= rank={self.rank} or None, "
                    f"got {self.krylov_dim!r}"
                )
            if self.krylov_dim < self.rank:
                raise InputError(
                    f"krylov_dim={self.krylov_dim} is smaller than rank={self.rank}: Lanczos "
                    f"yields at most krylov_dim eigenpairs. Use krylov_dim >= rank (about 2*rank "
                    f"gives accurate top pairs), or krylov_dim=None for max(2*rank, rank+20)."
                )
        if self.keep not in ("positive", "magnitude"):
            raise InputError(f"keep must be 'positive' or 'magnitude', got {self.keep!r}")
        if self.complement and self.damping == 0:
            raise InputError(
                "complement=True adds (I - U^T U) b / damping, so it needs damping > 0 (got "
                "damping=0). Set damping > 0, or complement=False for the plain low-rank inverse."
            )

    @property
    def low_rank_scoring(self) -> bool:
        return not self.complement

    def fit(self, operator: LinearOperator, *, progress: bool = False) -> FittedArnoldi:
        """Run Lanczos on the undamped ``operator`` and keep the top ``rank`` eigenpairs.

        Cost: ``krylov_dim`` HVPs, or the ``p`` of a dense assembly (see Notes).
        """
        p = operator.size
        if self.rank > p:
            raise InputError(
                f"rank={self.rank} exceeds the number of parameters p={p}. Use rank <= {p} "
                "(rank = p is the exact inverse, which ExactHessian computes more cheaply)."
            )
        m = self.krylov_dim if self.krylov_dim is not None else max(2 * self.rank, self.rank + 20)
        m = min(m, p)
        before = operator.num_matvecs - operator.num_dense_matvecs
        dense = operator.expect_products(m)
        if dense and m >= p:
            # Lanczos would run to exhaustion (all p eigenpairs): take them from eigh directly
            theta, resid, vectors = _dense_eigenpairs(operator.to_dense())
            eigensolver, iterations = "eigh", 0
        else:
            with warnings.catch_warnings():
                # Arnoldi runs all m steps on purpose; interior Ritz values need not converge.
                warnings.simplefilter("ignore", InflWarning)
                res = lanczos(
                    operator, m, which="largest", max_iter=m, tol=1e-14, seed=self.seed,
                    return_vectors=True,
                )  # fmt: skip
            assert res.largest_vectors is not None
            theta, resid, vectors = res.largest, res.largest_residuals, res.largest_vectors
            eigensolver, iterations = "lanczos", res.iterations
        by_magnitude = theta.abs().argsort(descending=True, stable=True)[: self.rank]
        num_negative_dropped = 0
        if self.keep == "magnitude":
            chosen = by_magnitude.sort().values  # descending order of theta
        else:
            positive = (theta > 0).nonzero().reshape(-1)
            chosen = positive[: self.rank]
            num_negative_dropped = int((theta[by_magnitude] < 0).sum())
        if chosen.numel() == 0:
            raise NotPositiveDefiniteError(
                f"Arnoldi found no positive eigenvalue of H among {theta.numel()} Ritz values "
                f"(largest {float(theta[0]):.4g}), so keep='positive' keeps nothing. Use "
                "keep='magnitude', or check the model: H is negative semi-definite here."
            )
        if chosen.numel() < self.rank:
            reasons = []
            if theta.numel() < self.rank:
                reasons.append(
                    f"the Krylov space stopped growing at dimension {iterations} (an "
                    "invariant subspace: the start vector has no component along the rest)"
                )
            if self.keep == "positive" and bool((theta <= 0).any()):
                reasons.append(
                    f"{int((theta <= 0).sum())} of the {theta.numel()} Ritz values are not positive"
                )
            warnings.warn(
                f"Arnoldi kept {chosen.numel()} eigenpairs instead of rank={self.rank}: "
                f"{'; '.join(reasons)}. Increase krylov_dim, or lower rank.",
                InflWarning,
                stacklevel=2,
            )
        eigenvalues = theta[chosen]
        facts = {
            "rank_requested": self.rank,
            "krylov_dim": m,
            "eigensolver": eigensolver,
            "dense_matrix": dense,
            "lanczos_iterations": iterations,
            "num_hvps": operator.num_matvecs - operator.num_dense_matvecs - before,
            "num_negative_ritz": int((theta < 0).sum()),
            "num_negative_dropped": num_negative_dropped,
            "ritz_residual_max": float(resid[chosen].max()),
            "ritz_residual_rel_max": float((resid[chosen] / eigenvalues.abs()).max()),
            "lanczos_max_ritz": float(theta[0]),
            "lanczos_min_ritz": float(theta[-1]),
            "lanczos_min_ritz_residual": float(resid[-1]),
            "lanczos_exhausted": eigensolver == "eigh" or iterations >= p,
        }
        return FittedArnoldi(self, operator, eigenvalues, vectors[chosen].contiguous(), facts)

    def restore(self, operator: LinearOperator, state: dict[str, Any]) -> FittedArnoldi:
        """:class:`FittedArnoldi` from saved eigenpairs and facts (no HVP)."""
        eigenvalues = state_tensor(state, "eigenvalues", operator)
        r = eigenvalues.numel()
        basis = state_tensor(state, "basis", operator, (r, operator.size))
        facts = state.get("facts")
        if not isinstance(facts, dict):
            raise InputError(
                "the saved Arnoldi state has no 'facts' dict: it was written by another "
                "version of infl. Refit the solver and save it again."
            )
        return FittedArnoldi(self, operator, eigenvalues, basis, dict(facts))


class FittedArnoldi(FittedSolver):
    """:class:`Arnoldi` with the top eigenpairs :math:`(\\mu_i, u_i)` of :math:`H` found.

    Attributes
    ----------
    eigenvalues
        ``[r]`` kept Ritz values :math:`\\mu_i` of :math:`H` (float64, descending).
    basis
        ``U``, ``[r, p]`` orthonormal rows :math:`u_i` (the operator's dtype and device).
    weights
        ``[r]`` :math:`1/(\\mu_i + \\lambda)`, in ``basis``'s dtype.
    """

    def __init__(
        self,
        solver: Arnoldi,
        operator: LinearOperator,
        eigenvalues: torch.Tensor,
        basis: torch.Tensor,
        facts: dict[str, Any],
    ) -> None:
        super().__init__(solver, operator, auto_damping=_auto_from_facts(solver, facts))
        self.solver: Arnoldi = solver
        self.eigenvalues = eigenvalues
        self.basis = basis
        self._facts = facts
        damped = eigenvalues + self.damping
        tiny = 1e3 * torch.finfo(basis.dtype).eps * max(float(eigenvalues.abs().max()), 1.0)
        if bool((damped.abs() <= tiny).any()):
            bad = float(eigenvalues[damped.abs().argmin()])
            raise NotPositiveDefiniteError(
                f"Arnoldi kept the eigenvalue {bad:.6g} of H and damping={self.damping:g} "
                f"cancels it (mu + damping = 0), so the low-rank inverse does not exist. Change "
                "damping, or use keep='positive'."
            )
        self.weights = (1.0 / damped).to(device=basis.device, dtype=basis.dtype)

    @property
    def info(self) -> dict[str, Any]:
        return {
            **super().info,
            "rank": int(self.eigenvalues.numel()),
            **self._facts,
            "max_eigenvalue": float(self.eigenvalues.max()),
            "min_eigenvalue": float(self.eigenvalues.min()),
            "eigenvalues_kept": [float(v) for v in self.eigenvalues],
            "keep": self.solver.keep,
            "complement": self.solver.complement,
        }

    def state(self) -> dict[str, Any]:
        """The kept eigenpairs (``[r]`` eigenvalues, ``[r, p]`` basis) and the fit's facts."""
        return {"eigenvalues": self.eigenvalues, "basis": self.basis, "facts": dict(self._facts)}

    def with_damping(self, damping: float) -> FittedArnoldi:
        """Another :math:`\\lambda` from the same eigenpairs: no HVP, :math:`O(r)`."""
        check_damping(damping)
        solver = replace(self.solver, damping=float(damping))  # validates complement vs damping
        return FittedArnoldi(solver, self.base, self.eigenvalues, self.basis, self._facts)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(U, w)`` with :math:`A^{-1} \\approx U^T\\operatorname{diag}(w)U`; ``None`` with
        ``complement=True`` (that inverse is not low-rank)."""
        if self.solver.complement:
            return None
        return self.basis, self.weights

    def apply(self, rhs: torch.Tensor) -> torch.Tensor:
        """The approximate inverse on ``[k, p]`` rows, without any check or residual."""
        coeffs = rhs @ self.basis.T  # [k, r]
        value = (coeffs * self.weights) @ self.basis
        if self.solver.complement:
            value = value + (rhs - coeffs @ self.basis) / self.damping
        return value

    def solve(self, rhs: torch.Tensor, *, progress: bool = False) -> SolveResult:
        b = as_rhs(rhs, self.operator)
        value = self.apply(b)
        if self.solver.check_residuals:
            residuals = relative_residuals(self.operator, value, b)
        else:
            residuals = torch.full((b.shape[0],), math.nan, dtype=b.dtype, device=b.device)
        return SolveResult(
            value=value, converged=True, iterations=0, residual_norms=residuals, info=self.info
        )


def _dense_eigenpairs(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All eigenpairs of a symmetric ``[p, p]`` matrix, as Lanczos returns them: float64
    eigenvalues (descending), residuals :math:`\\|A u_i - \\mu_i u_i\\|` and ``[p, p]`` unit
    eigenvectors as rows (in the matrix's dtype)."""
    values, vectors = torch.linalg.eigh(matrix)
    values, vectors = values.flip(0), vectors.flip(1).T.contiguous()
    resid = torch.linalg.vector_norm(vectors @ matrix - values[:, None] * vectors, dim=1)
    return values.to(torch.float64).cpu(), resid.to(torch.float64).cpu(), vectors


def _auto_from_facts(solver: Arnoldi, facts: dict[str, Any]) -> AutoDamping | None:
    """``damping="auto"`` from the extreme Ritz values of the fit's Lanczos run (no HVP)."""
    if solver.damping != "auto":
        return None
    missing = [k for k in ("lanczos_max_ritz", "lanczos_min_ritz") if k not in facts]
    if missing:
        raise InputError(
            f"Arnoldi(damping='auto') needs the extreme Ritz values of its fit, and the fit's "
            f"facts lack {missing} (a state saved by an older infl). Refit the solver."
        )
    top, bottom = float(facts["lanczos_max_ritz"]), float(facts["lanczos_min_ritz"])
    if facts.get("lanczos_exhausted", False):
        auto = auto_damping_exact(top, bottom)
    else:
        residual = float(facts.get("lanczos_min_ritz_residual", 0.0))
        auto = auto_damping_from_ritz(top, bottom, residual, int(facts["lanczos_iterations"]))
    if solver.complement:
        auto = auto.at_least(DAMPING_RTOL * abs(top))
    return auto
