"""CG with mixed-precision iterative refinement, behind ``ConjugateGradient`` when the
operator's products are of a lower precision than the model (``curvature_dtype``).

:func:`solve_refined` runs it for a :class:`~infl.solvers.cg.FittedCG`, which supplies the
inner (P)CG iteration, the checks and the warnings.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from infl.errors import InflWarning
from infl.mixed_precision import product_dtype
from infl.operators import LinearOperator
from infl.solvers.base import SolveResult

if TYPE_CHECKING:
    from infl.solvers.cg import FittedCG

REFINE_RTOL = 1e-4
"""Mixed-precision CG: each outer step's inner CG (on the low-precision products) stops when
its residual is this fraction of the outer residual (or half the tolerance)."""


def solve_refined(
    fitted: FittedCG, b: torch.Tensor, full: LinearOperator, progress: bool
) -> SolveResult:
    """CG with mixed-precision iterative refinement (``fitted.operator``'s products are of a
    lower precision; ``full`` is the same operator in the model's dtype).

    Outer step ``s``: the true residual :math:`r_s = b - A x_s` (one ``full`` product),
    then (P)CG on the low-precision products solves :math:`\\tilde A d = r_s` until
    :math:`\\|\\tilde r\\| \\le \\max(\\eta\\|r_s\\|, \\tau/2)` (:math:`\\eta` =
    :data:`REFINE_RTOL`, :math:`\\tau` the threshold) and :math:`x_{s+1} = x_s + d`. Each
    step divides the residual by about :math:`1/\\max(\\eta, \\kappa\\varepsilon_{32})`;
    a step that does not halve it (:math:`\\kappa\\varepsilon_{32} \\gtrsim 1/2`) switches
    the inner solves to ``full`` (a warning; ``info["refinement_fallback"]``). When
    ``max_iter`` runs out with every inner residual above :math:`\\sqrt{\\varepsilon}`
    of the low precision (far from converged, as on a small budget), the last step reports
    those recursive residuals instead of paying one more ``full`` product for the true
    ones (``info["true_residual_checked"] = False``), as plain CG does.
    """
    threshold, safe_bnorm = fitted._thresholds(b)
    name = fitted._name
    with tqdm(
        total=fitted.solver.max_iter, desc=f"{name} mixed", disable=not progress, leave=False
    ) as bar:
        return _refine(fitted, b, full, bar, threshold, safe_bnorm)


def _refine(
    fitted: FittedCG,
    b: torch.Tensor,
    full: LinearOperator,
    bar: Any,
    threshold: torch.Tensor,
    safe_bnorm: torch.Tensor,
) -> SolveResult:
    from infl.solvers.cg import _NegativeCurvature  # cg imports this module

    cfg = fitted.solver
    k = b.shape[0]
    name = fitted._name
    x = torch.zeros_like(b)
    r = b.clone()
    res = torch.linalg.vector_norm(r, dim=1)  # the true residual norms (x = 0)
    active = res > threshold
    current = res / safe_bnorm
    history = [current]
    inner = outer = full_products = 0
    fallback = estimated = False
    while bool(active.any()) and inner < cfg.max_iter:
        idx = active.nonzero().reshape(-1)
        target = torch.maximum(REFINE_RTOL * res[idx], threshold[idx] / 2)
        op = full if fallback else fitted.operator
        budget = cfg.max_iter - inner
        try:
            d, rr, its, norms = fitted._iterate(op, r[idx], target, budget, bar, idx, inner)
        except _NegativeCurvature as event:
            if fallback or event.direction is None:
                raise
            # negative in low precision: real (raise), or round-off (go on in full)
            v = event.direction.reshape(1, -1)
            curvature = float((v * full.matmat(v)).sum())
            full_products += 1
            if curvature <= 0:
                rayleigh = curvature / float((v * v).sum())
                raise _NegativeCurvature(event.iteration, event.rhs_index, rayleigh) from None
            inner, fallback = event.iteration, True
            _warn_fallback(full.dtype, None)
            continue
        inner += its
        outer += 1
        r_before = r[idx]
        x[idx] += d
        if inner >= cfg.max_iter and _recursive_is_true(rr, safe_bnorm[idx], op):
            new, estimated = torch.sqrt(rr), True  # the budget is spent: no last product
        else:
            r[idx] = b[idx] - full.matmat(x[idx])
            full_products += idx.numel()
            new = torch.linalg.vector_norm(r[idx], dim=1)
            worse = new > res[idx]
            if bool(worse.any()):  # the correction made these worse: keep x as it was
                back = idx[worse]
                x[back] -= d[worse]
                r[back] = r_before[worse]
                new[worse] = res[back]
        for norm in norms[1:]:
            current = current.clone()
            current[idx] = norm / safe_bnorm[idx]
            history.append(current)
        current = current.clone()
        current[idx] = new / safe_bnorm[idx]
        history[-1] = current
        if not fallback and its < budget and bool((new > res[idx] / 2).any()):
            fallback = True
            _warn_fallback(full.dtype, float((new / res[idx]).max()))
        res[idx] = new
        active[idx] = new > threshold[idx]
    residuals = res / safe_bnorm
    converged = not bool(active.any())
    if not converged:
        fitted._warn_not_converged(name, residuals, int(active.sum()), k, stacklevel=5)
    info = {
        **fitted.info,
        "iterations": inner,
        "product_dtype": str(product_dtype(fitted.operator)).removeprefix("torch."),
        "refinement_steps": outer,
        "inner_iterations": inner,
        "full_precision_matvecs": full_products,
        "refinement_fallback": fallback,
        "true_residual_checked": not estimated,
    }
    return SolveResult(
        value=x,
        converged=converged,
        iterations=inner,
        residual_norms=residuals,
        trace=torch.stack(history),
        info=info,
    )


def _recursive_is_true(rr: torch.Tensor, bnorm: torch.Tensor, operator: LinearOperator) -> bool:
    """Whether the last inner solve's recursive residuals stand for the true ones: all
    above :math:`\\sqrt{\\varepsilon}\\,\\|b\\|` of its products' dtype, where the
    two part by :math:`O(\\varepsilon\\kappa)` at most (the rule of plain CG). A solve that
    ran out of iterations there is reported from them, without one more full product."""
    eps = float(torch.finfo(product_dtype(operator)).eps)
    return bool((torch.sqrt(rr) > eps**0.5 * bnorm).all())


def _warn_fallback(dtype: torch.dtype, ratio: float | None) -> None:
    found = (
        f"the low-precision products showed negative curvature that the {dtype} products do not"
        if ratio is None
        else f"a refinement step left the {dtype} residual at {ratio:.3g} times its value "
        "(more than 1/2)"
    )
    warnings.warn(
        f"CG with low-precision products: {found}, so H + damping*I is too ill-conditioned "
        f"for the low-precision products (condition number x round-off ~ 1). The remaining "
        f"iterations use {dtype} products; the answer still meets rtol/atol. Add damping, "
        "or use curvature_dtype=None.",
        InflWarning,
        stacklevel=5,
    )
