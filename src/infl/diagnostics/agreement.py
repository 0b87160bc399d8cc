"""Do two inverse-HVP solvers agree? Convergence traces and agreement on the same right-hand sides.

Influence scores are :math:`s_{ji} = -g_{\\text{test},j}^T A^{-1} g_i`; two solvers that return
different :math:`x_j \\approx A^{-1} g_{\\text{test},j}` give different scores. This module
measures the difference where it starts (cosine similarity and relative error of the
:math:`x_j`) and where it matters (Spearman rank correlation of the resulting scores over the
training set), and records the per-step shape of the iterative solvers (a CG residual that
stalls, a LiSSA iterate whose norm grows without bound).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from infl.errors import InputError
from infl.operators import LinearOperator
from infl.solvers.base import Solver, SolveResult, as_rhs


@dataclass(frozen=True)
class Agreement:
    """How well inverse-HVPs ``value`` match ``reference``, row by row.

    Attributes
    ----------
    cosine
        ``[k]``: :math:`x_j^T r_j / (\\|x_j\\| \\|r_j\\|)` (1 = same direction).
    relative_error
        ``[k]``: :math:`\\|x_j - r_j\\| / \\|r_j\\|`.
    spearman
        ``[k]`` or ``None``: Spearman rank correlation, over the ``n`` training examples, of the
        scores :math:`-x_j^T g_i` and :math:`-r_j^T g_i` (``None`` without training gradients;
        ``nan`` for a constant score row).
    """

    cosine: torch.Tensor
    relative_error: torch.Tensor
    spearman: torch.Tensor | None = None

    @property
    def min_cosine(self) -> float:
        """The worst cosine similarity over the right-hand sides."""
        return float(self.cosine.min())

    @property
    def max_relative_error(self) -> float:
        """The worst relative error over the right-hand sides."""
        return float(self.relative_error.max())

    @property
    def mean_spearman(self) -> float:
        """Mean Spearman correlation of the score rows (``nan`` if not computed)."""
        if self.spearman is None:
            return math.nan
        return float(torch.nanmean(self.spearman))


def spearman_rows(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Spearman rank correlation of each row of ``a`` with the same row of ``b`` (``[m, n]``).

    Computed with :func:`scipy.stats.spearmanr` (average ranks for ties); a constant row gives
    ``nan``. Returns ``[m]`` float64.
    """
    x = np.atleast_2d(np.asarray(torch.as_tensor(a).detach().cpu(), dtype=np.float64))
    y = np.atleast_2d(np.asarray(torch.as_tensor(b).detach().cpu(), dtype=np.float64))
    if x.shape != y.shape:
        raise InputError(f"score matrices differ in shape: {x.shape} vs {y.shape}")
    out = np.empty(x.shape[0])
    for j in range(x.shape[0]):
        if np.ptp(x[j]) == 0 or np.ptp(y[j]) == 0:
            out[j] = np.nan
        else:
            out[j] = float(stats.spearmanr(x[j], y[j]).statistic)
    return torch.from_numpy(out)


def compare_inverse_hvps(
    value: torch.Tensor, reference: torch.Tensor, *, train_grads: torch.Tensor | None = None
) -> Agreement:
    """Cosine similarity, relative error and score Spearman of ``value`` against ``reference``.

    Parameters
    ----------
    value, reference
        ``[k, p]`` inverse-HVPs from two solvers (``reference`` is the one trusted more).
    train_grads
        ``[n, p]`` training gradients :math:`g_i`; if given, the scores
        :math:`-x_j^T g_i` of both are ranked and compared (Spearman, per row).
    """
    if value.shape != reference.shape or value.dim() != 2:
        raise InputError(
            f"need two [k, p] tensors of the same shape, got {tuple(value.shape)} and "
            f"{tuple(reference.shape)}"
        )
    x = value.detach().to(torch.float64)
    r = reference.detach().to(device=x.device, dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    xn = torch.linalg.vector_norm(x, dim=1)
    rn = torch.linalg.vector_norm(r, dim=1)
    cosine = (x * r).sum(dim=1) / (xn * rn).clamp_min(tiny)
    rel = torch.linalg.vector_norm(x - r, dim=1) / rn.clamp_min(tiny)
    rho = None
    if train_grads is not None:
        if train_grads.dim() != 2 or train_grads.shape[1] != x.shape[1]:
            raise InputError(
                f"train_grads must be [n, p={x.shape[1]}], got {tuple(train_grads.shape)}"
            )
        g = train_grads.detach().to(device=x.device, dtype=torch.float64)
        rho = spearman_rows(-x @ g.T, -r @ g.T)
    return Agreement(cosine=cosine.cpu(), relative_error=rel.cpu(), spearman=rho)


@dataclass(frozen=True)
class SolverAgreement:
    """Several solvers run on the same right-hand sides, each compared with a reference.

    Attributes
    ----------
    results
        Each solver's :class:`~infl.solvers.SolveResult`, by name (traces included).
    reference
        The name of the reference solver.
    comparisons
        :class:`Agreement` of each other solver with the reference, by name.
    dampings
        Each solver's :math:`\\lambda` (solvers with different damping solve different systems).
    """

    results: dict[str, SolveResult]
    reference: str
    comparisons: dict[str, Agreement]
    dampings: dict[str, float]

    def table(self) -> str:
        """A plain-text table: one line per solver."""
        head = (
            f"{'solver':<16}{'damping':>10}{'iters':>8}{'resid':>11}{'cos(ref)':>10}"
            f"{'rel.err':>11}{'spearman':>10}"
        )
        lines = [head]
        for name, res in self.results.items():
            line = (
                f"{name:<16}{self.dampings[name]:>10.3g}{res.iterations:>8d}"
                f"{float(res.residual_norms.max()):>11.3g}"
            )
            if name == self.reference:
                line += f"{'(reference)':>31}"
            else:
                c = self.comparisons[name]
                line += (
                    f"{c.min_cosine:>10.6f}{c.max_relative_error:>11.3g}{c.mean_spearman:>10.4f}"
                )
            lines.append(line)
        return "\n".join(lines)


def solver_agreement(
    operator: LinearOperator,
    rhs: torch.Tensor,
    solvers: Mapping[str, Solver],
    *,
    reference: str | None = None,
    train_grads: torch.Tensor | None = None,
) -> SolverAgreement:
    """Run each solver on the same right-hand sides and compare it with a reference solver.

    Parameters
    ----------
    operator
        :math:`H` (each solver adds its own damping).
    rhs
        ``[k, p]`` right-hand sides, typically test gradients.
    solvers
        Name → solver, e.g. ``{"exact": ExactHessian(damping=0.01), "lissa": LiSSA(...)}``.
    reference
        Which one the others are compared with (default: the first).
    train_grads
        ``[n, p]``; if given, Spearman correlations of the scores are reported too.

    Returns
    -------
    SolverAgreement

    Notes
    -----
    Cost: the sum of the solvers' costs; solver exceptions (divergence, indefiniteness)
    propagate, since they are the answer to "can this estimate be trusted".
    """
    if not solvers:
        raise InputError("solver_agreement needs at least one solver")
    names = list(solvers)
    ref = names[0] if reference is None else reference
    if ref not in solvers:
        raise InputError(f"reference {ref!r} is not one of the solvers {names}")
    b = as_rhs(rhs, operator)
    results = {name: solver.solve(operator, b) for name, solver in solvers.items()}
    comparisons = {
        name: compare_inverse_hvps(res.value, results[ref].value, train_grads=train_grads)
        for name, res in results.items()
        if name != ref
    }
    dampings = {name: float(s.damping) for name, s in solvers.items()}
    return SolverAgreement(
        results=results, reference=ref, comparisons=comparisons, dampings=dampings
    )


@dataclass(frozen=True)
class LissaTrace:
    """The step-by-step shape of a full-batch LiSSA recursion (never raises on divergence).

    Attributes
    ----------
    estimate_norms
        ``[steps + 1, k]``: :math:`\\|x_t\\|/\\sigma`, the norm of the current estimate of
        :math:`A^{-1}b` (row 0 is the start :math:`b/\\sigma`). It levels off at
        :math:`\\|A^{-1}b\\|` when the recursion converges and grows geometrically when it
        diverges.
    residuals
        ``[steps + 1, k]``: :math:`\\|b - A x_t/\\sigma\\| / \\|b\\|` (the relative residual of
        the estimate; equal to LiSSA's relative increment at step :math:`t+1`).
    scale
        :math:`\\sigma`.
    diverged
        Whether the run was stopped because the residual exceeded ``blowup`` or became
        non-finite.
    """

    estimate_norms: np.ndarray
    residuals: np.ndarray
    scale: float
    diverged: bool

    @property
    def steps(self) -> int:
        """Recursion steps taken."""
        return int(self.residuals.shape[0]) - 1


def lissa_trace(
    operator: LinearOperator,
    rhs: torch.Tensor,
    *,
    scale: float,
    depth: int,
    damping: float = 0.0,
    blowup: float = 1e12,
) -> LissaTrace:
    """Run the LiSSA recursion :math:`x_{t+1} = b + x_t - A x_t/\\sigma` and record its shape.

    Same recursion as :class:`~infl.solvers.LiSSA` in full-batch mode, but it records the
    estimate norm and residual at every step and stops (rather than raising) once the
    residual exceeds ``blowup`` times :math:`\\|b\\|`, so a divergent run can be plotted.

    Parameters
    ----------
    operator
        :math:`H`; :math:`A = H + \\lambda I`.
    rhs
        ``[k, p]`` or ``[p]``.
    scale
        :math:`\\sigma > 0`.
    depth
        :math:`T`, the number of steps.
    damping
        :math:`\\lambda \\ge 0`.
    blowup
        Stop when a relative residual exceeds this (or is not finite).

    Notes
    -----
    Cost: ``depth`` operator applications of ``k`` vectors.
    """
    if not (math.isfinite(scale) and scale > 0):
        raise InputError(f"scale must be a positive finite number, got {scale}")
    if depth < 1:
        raise InputError(f"depth must be a positive integer, got {depth}")
    op = operator.damped(damping)
    b = as_rhs(rhs, op)
    bnorm = torch.linalg.vector_norm(b, dim=1).clamp_min(torch.finfo(b.dtype).tiny)
    x = b.clone()
    norms = [torch.linalg.vector_norm(x, dim=1) / scale]
    resid = []
    diverged = False
    for _ in range(depth):
        increment = b - op.matmat(x) / scale
        rel = torch.linalg.vector_norm(increment, dim=1) / bnorm
        resid.append(rel)
        worst = float(rel.max())
        if not math.isfinite(worst) or worst > blowup:
            diverged = True
            break
        x = x + increment
        norms.append(torch.linalg.vector_norm(x, dim=1) / scale)
    if not diverged:
        resid.append(torch.linalg.vector_norm(b - op.matmat(x) / scale, dim=1) / bnorm)
    return LissaTrace(
        estimate_norms=torch.stack(norms).double().cpu().numpy(),
        residuals=torch.stack(resid).double().cpu().numpy(),
        scale=float(scale),
        diverged=diverged,
    )


def residual_trace(result: SolveResult) -> np.ndarray:
    """A solver's per-iteration trace as a float64 array ``[iterations, k]``.

    CG: relative residual :math:`\\|r_t\\|/\\|b\\|` (row 0 is the start, 1). LiSSA: relative
    increment, which in full-batch mode equals the relative residual of the previous estimate.
    Direct solvers have an empty trace.
    """
    return result.trace.detach().double().cpu().numpy()


__all__ = [
    "Agreement",
    "LissaTrace",
    "SolverAgreement",
    "compare_inverse_hvps",
    "lissa_trace",
    "residual_trace",
    "solver_agreement",
    "spearman_rows",
]
