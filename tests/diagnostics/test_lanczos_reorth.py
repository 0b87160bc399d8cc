"""Lanczos's reorthogonalisation: a second pass only under cancellation (DGKS), same accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from infl.diagnostics import lanczos
from infl.errors import InflWarning
from infl.operators import DenseOperator
from infl.spectral.lanczos import _reorthogonalise
from problems import planted

F64 = torch.float64


def orthonormality_error(vectors: torch.Tensor) -> float:
    gram = vectors @ vectors.T
    return float((gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max())


def test_long_run_keeps_an_orthonormal_basis_with_mostly_one_pass():
    # 12 decades of spectrum and a tight cluster at the top: many converged Ritz values, the
    # situation in which Lanczos without full reorthogonalisation produces ghost copies
    ev = torch.cat(
        [
            torch.logspace(-12, 0, 240, dtype=F64),
            1.0 + 1e-9 * torch.arange(10, dtype=F64),
        ]
    )
    op = planted(ev, seed=3)
    m = 150
    with pytest.warns(InflWarning, match="max_iter"):  # all m steps on purpose, as Arnoldi does
        res = lanczos(op, k=m, which="largest", max_iter=m, tol=1e-300, return_vectors=True)
    assert res.iterations == m
    assert m <= res.reorth_passes < 2 * m  # the single pass is the common case
    vectors = res.largest_vectors
    assert vectors is not None
    assert orthonormality_error(vectors) < 1e-12
    # every Ritz pair is a true eigenpair to within its own residual (no ghost copies)
    dense = op.matrix
    for theta, y, bound in zip(res.largest, vectors, res.largest_residuals, strict=True):
        assert float((dense @ y - theta * y).norm()) <= float(bound) + 1e-12
    # the cluster converged, each eigenvalue once (a ghost copy would repeat one and push the
    # next Ritz value, 1e-2 below the cluster, out of the top 11)
    top = ev.sort().values.flip(0)
    torch.testing.assert_close(res.largest[:11], top[:11], rtol=1e-9, atol=0)


def test_a_second_pass_runs_exactly_when_the_first_cancels_most_of_the_vector():
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(500, 40, generator=gen, dtype=F64))
    basis = basis.T.contiguous()  # [40, 500], orthonormal rows
    outside = torch.randn(500, generator=gen, dtype=F64)
    outside -= (basis @ outside) @ basis
    outside /= outside.norm()
    inside = torch.randn(40, generator=gen, dtype=F64) @ basis
    inside /= inside.norm()
    for weight, passes in ((1e-3, 2), (0.9, 1)):
        w = (1 - weight) * inside + weight * outside
        norm, made = _reorthogonalise(w, basis)
        assert made == passes
        assert float((basis @ w).abs().max()) < 1e-15 * 40
        assert math.isclose(norm, weight, rel_tol=1e-10)


def test_exhausted_krylov_space_stays_exact():
    # 6 distinct eigenvalues: the Krylov space is invariant after 6 steps
    distinct = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=F64)
    ev = distinct.repeat_interleave(20)
    op = planted(ev, seed=1)
    res = lanczos(op, k=3, which="both", max_iter=60, tol=1e-12, return_vectors=True)
    assert res.iterations == 6
    torch.testing.assert_close(res.largest, distinct[:3], rtol=1e-12, atol=0)
    torch.testing.assert_close(res.smallest, distinct.flip(0)[:3], rtol=1e-12, atol=0)
    assert res.largest_vectors is not None
    assert res.smallest_vectors is not None
    both = torch.cat([res.largest_vectors, res.smallest_vectors])
    assert orthonormality_error(both) < 1e-12


def test_float32_basis_stays_orthonormal_to_float32_precision():
    top = torch.tensor([5.0, 4.0, 3.0], dtype=F64)
    ev = torch.cat([torch.linspace(0.0, 1.0, 290, dtype=F64), top])
    op = planted(ev, seed=2)
    op32 = DenseOperator(op.matrix.float())
    m = 80
    with pytest.warns(InflWarning, match="max_iter"):
        res = lanczos(op32, k=m, which="largest", max_iter=m, tol=1e-300, return_vectors=True)
    assert res.largest_vectors is not None
    assert orthonormality_error(res.largest_vectors) < 1e-5
    torch.testing.assert_close(res.largest[:3], top, rtol=1e-5, atol=0)
