"""Direct inverse-HVPs from the dense Hessian's eigendecomposition."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from infl.errors import InputError, NotPositiveDefiniteError
from infl.operators import LinearOperator
from infl.solvers.base import (
    FittedSolver,
    Solver,
    SolveResult,
    as_rhs,
    check_damping,
    state_tensor,
)
from infl.spectral import zero_threshold
from infl.spectral.damping import auto_damping_exact


@dataclass(frozen=True)
class ExactHessian(Solver):
    """:math:`(H + \\lambda I)^{-1} b` from the eigendecomposition :math:`H = Q \\Lambda Q^T`.

    Parameters
    ----------
    damping
        :math:`\\lambda \\ge 0`, added to every eigenvalue, or ``"auto"``: read off the exact
        spectrum the fit computes anyway (no extra HVP), :math:`\\lambda = -\\lambda_{\\min}(H)
        + 10^{-3}|\\lambda_{\\max}(H)|` when :math:`\\lambda_{\\min}(H) \\le
        10^{-3}|\\lambda_{\\max}(H)|`, else 0 (:mod:`infl.spectral.damping`, no margin: the
        eigenvalues are exact). ``info`` records it (``damping_auto``, ``damping_rule``, ...).
    pseudo_inverse
        If ``False`` (default), a damped Hessian with an eigenvalue :math:`\\le 0` is refused
        with the damping that would fix it. If ``True``, invert only eigenvalues with
        :math:`|\\mu| > \\text{rcond} \\cdot \\max|\\mu|` (negative ones included) — the
        Moore-Penrose pseudo-inverse.
    rcond
        Relative cut-off for ``pseudo_inverse``.
    max_params
        Refuse models with more parameters than this: the dense Hessian takes :math:`p^2`
        numbers (10,000 parameters in float64 is 800 MB) and :math:`p` HVPs to build.

    Notes
    -----
    Cost: ``fit`` takes ``p`` Hessian-vector products and an :math:`O(p^3)` eigendecomposition.
    Below ``p = 1000``, a plain ``nn.Sequential`` of ``nn.Linear`` layers and element-wise
    activations with a built-in loss gets its Hessian in closed form instead, with no product
    (:func:`infl.sequential_hessian.sequential_hessian`), and hands the training gradients'
    factors it computed to the calculator
    (:meth:`~infl.solvers.base.FittedSolver.take_train_factors`). A
    Hessian over training data with ``p >= 1000`` parameters in several modules is assembled
    from its Gauss-Newton matrix plus the HVP columns of only the modules its residual term
    couples (:func:`infl.structured_hessian.assemble_hessian`; 774 instead of 2,514 products on
    a digits CNN). Each ``solve`` of ``k`` right-hand sides is :math:`O(k p^2)`. The fitted
    solver reports the spectrum of :math:`H` (smallest, largest, number of negative
    eigenvalues) in ``info``;
    eigenvalues within round-off of zero (:math:`|\\mu| \\le 10\\sqrt p\\,\\varepsilon
    \\max|\\mu|`, the threshold of
    :func:`infl.spectral.zero_threshold`) are counted as
    zero (``num_near_zero``), not negative. Half precision (``float16``, ``bfloat16``) is
    refused: the eigendecomposition needs ``float32`` or ``float64``.

    Examples
    --------
    >>> import torch
    >>> from infl.operators import DenseOperator
    >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64)))
    >>> ExactHessian().solve(A, torch.tensor([1.0, 4.0])).value
    tensor([[1., 1.]], dtype=torch.float64)
    """

    damping: float | Literal["auto"] = 0.0
    pseudo_inverse: bool = False
    rcond: float = 1e-10
    max_params: int = 20_000

    def __post_init__(self) -> None:
        check_damping(self.damping, allow_auto=True)
        if not 0 <= self.rcond < 1:
            raise InputError(f"rcond must be in [0, 1), got {self.rcond}")

    def fit(self, operator: LinearOperator, *, progress: bool = False) -> FittedExact:
        if operator.size > self.max_params:
            raise InputError(
                f"ExactHessian builds the dense p x p Hessian, and p={operator.size} exceeds "
                f"max_params={self.max_params}. Use ConjugateGradient or LiSSA, or raise "
                f"max_params if {operator.size}^2 numbers fit in memory."
            )
        if operator.dtype in (torch.float16, torch.bfloat16):
            raise InputError(
                f"ExactHessian needs the eigendecomposition of the dense Hessian, which PyTorch "
                f"computes in float32 or float64 only, and this operator is {operator.dtype}. "
                "Convert the model with model.double() (or model.float()) before building the "
                "calculator, or use ConjugateGradient, which needs only Hessian-vector products."
            )
        dense = operator.to_dense(progress=progress)
        evals, evecs = torch.linalg.eigh(dense)
        return FittedExact(self, operator, evals, evecs)

    def restore(self, operator: LinearOperator, state: dict[str, Any]) -> FittedExact:
        """:class:`FittedExact` from a saved eigendecomposition (no HVP, no eigensolve)."""
        p = operator.size
        evals = state_tensor(state, "eigenvalues", operator, (p,))
        evecs = state_tensor(state, "eigenvectors", operator, (p, p))
        return FittedExact(self, operator, evals, evecs)


class FittedExact(FittedSolver):
    """:class:`ExactHessian` with the eigendecomposition of :math:`H` done."""

    def __init__(
        self,
        solver: ExactHessian,
        operator: LinearOperator,
        eigenvalues: torch.Tensor,
        eigenvectors: torch.Tensor,
    ) -> None:
        auto = None
        if solver.damping == "auto":
            auto = auto_damping_exact(float(eigenvalues[-1]), float(eigenvalues[0]))
        super().__init__(solver, operator, auto_damping=auto)
        self.solver: ExactHessian = solver
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors
        damped = eigenvalues + self.damping
        smallest_h = float(eigenvalues[0])
        tiny = zero_threshold(eigenvalues, operator.dtype, eigenvalues.numel())
        self._info: dict[str, Any] = {
            "min_eigenvalue": smallest_h,
            "max_eigenvalue": float(eigenvalues[-1]),
            "num_negative": int((eigenvalues < -tiny).sum()),
            "num_near_zero": int((eigenvalues.abs() <= tiny).sum()),
            "zero_threshold": tiny,
            "damped_min_eigenvalue": float(damped[0]),
        }
        if solver.pseudo_inverse:
            cutoff = solver.rcond * float(damped.abs().max())
            keep = damped.abs() > cutoff
            self.inverse_eigenvalues = torch.where(keep, 1.0 / damped, torch.zeros_like(damped))
            self._info["num_inverted"] = int(keep.sum())
        else:
            if float(damped[0]) <= 0:
                fix = max(-smallest_h, 0.0)
                suggestion = fix + max(1e-3 * abs(float(eigenvalues[-1])), 1e-8)
                negative = self._info["num_negative"]
                found = (
                    f"{negative} of {eigenvalues.numel()} negative"
                    if negative
                    else f"none negative: {self._info['num_near_zero']} of "
                    f"{eigenvalues.numel()} are zero up to round-off (|mu| <= {tiny:.2g}), so "
                    "H is singular"
                )
                raise NotPositiveDefiniteError(
                    f"H + damping*I is not positive definite: the smallest eigenvalue of H is "
                    f"{smallest_h:.4g} ({found}), so with damping={self.damping:g} the "
                    "smallest of H + "
                    f"damping*I is {float(damped[0]):.4g}. Use damping > {fix:.4g} (for "
                    f"example {suggestion:.3g}), or ExactHessian(pseudo_inverse=True). "
                    "infl.diagnostics.advise(operator) gives the matching LiSSA/CG settings."
                )
            self.inverse_eigenvalues = 1.0 / damped

    @property
    def info(self) -> dict[str, Any]:
        return {**super().info, **self._info}

    def state(self) -> dict[str, Any]:
        """The eigendecomposition of :math:`H` (``[p]`` eigenvalues, ``[p, p]`` eigenvectors)."""
        return {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors}

    def with_damping(self, damping: float) -> FittedExact:
        """Another :math:`\\lambda` from the same eigendecomposition: no HVP, :math:`O(p)`."""
        check_damping(damping)
        solver = replace(self.solver, damping=float(damping))
        return FittedExact(solver, self.base, self.eigenvalues, self.eigenvectors)

    def solve(self, rhs: torch.Tensor, *, progress: bool = False) -> SolveResult:
        b = as_rhs(rhs, self.operator)
        q = self.eigenvectors
        value = ((b @ q) * self.inverse_eigenvalues) @ q.T
        damped = self.eigenvalues + self.damping
        residual = ((value @ q) * damped) @ q.T - b
        bnorm = torch.linalg.vector_norm(b, dim=1)
        rel = torch.linalg.vector_norm(residual, dim=1) / bnorm.clamp_min(torch.finfo(b.dtype).tiny)
        return SolveResult(
            value=value,
            converged=True,
            iterations=0,
            residual_norms=rel,
            info=self.info,
        )
