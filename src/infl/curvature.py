"""Cheap curvature estimates (power iteration for the eigenvalue of largest magnitude).

:mod:`infl.diagnostics` has the fuller tools: Lanczos for both ends of the spectrum (what
``LiSSA(scale="auto")`` uses), the dense spectrum, and solver advice. This function stays as a
minimal, dependency-free estimate.
"""

from __future__ import annotations

import torch

from infl.errors import InputError
from infl.operators import LinearOperator


def estimate_top_eigenvalue(
    operator: LinearOperator, *, max_iter: int = 50, rtol: float = 1e-3, seed: int = 0
) -> float:
    """The eigenvalue of largest magnitude of a symmetric operator, by power iteration.

    Parameters
    ----------
    operator
        A symmetric ``p x p`` operator.
    max_iter
        At most this many matvecs.
    rtol
        Stop when the Rayleigh quotient changes by less than ``rtol`` relative.
    seed
        Seed of the random start vector.

    Returns
    -------
    float
        The Rayleigh quotient :math:`v^T A v` at the last iterate: close to the eigenvalue of
        largest magnitude, with its sign. Power iteration approaches it from below in magnitude.
    """
    if max_iter < 1:
        raise InputError(f"max_iter must be >= 1, got {max_iter}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(operator.size, generator=gen, dtype=torch.float64)
    v = (v / v.norm()).to(device=operator.device, dtype=operator.dtype)
    estimate = 0.0
    for _ in range(max_iter):
        w = operator.matvec(v)
        new = float(v @ w)
        norm = float(w.norm())
        if norm == 0.0:
            return 0.0
        v = w / norm
        if abs(new - estimate) <= rtol * abs(new):
            return new
        estimate = new
    return estimate
