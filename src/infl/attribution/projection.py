"""TRAK-style attribution from randomly projected gradients (Park et al. 2023, one model)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from infl.attribution._common import setup, test_grads, train_grads
from infl.chunking import ChunkSize, check_chunk_size
from infl.errors import InputError, NotPositiveDefiniteError
from infl.objective import Objective, PerExampleFn

ProjectionKind = Literal["gaussian", "rademacher"]

BLOCK_COLUMNS = 2048
"""Columns of :math:`P` drawn per seeded block: block ``b`` holds columns
``b*BLOCK_COLUMNS .. (b+1)*BLOCK_COLUMNS - 1`` and comes from its own generator, seeded by
``(seed, b)``, so :math:`P` is the same matrix whether it is kept or regenerated."""


def _block_seed(seed: int, block: int) -> int:
    return int(np.random.SeedSequence([seed, block]).generate_state(1)[0])


def projection_blocks(
    dim: int,
    num_params: int,
    *,
    seed: int,
    kind: ProjectionKind = "gaussian",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[slice, torch.Tensor]]:
    """The projection :math:`P` (``[k, p]``) as ``(column slice, P[:, slice])`` blocks.

    Entries are i.i.d. :math:`\\mathcal N(0, 1/k)` (``"gaussian"``) or :math:`\\pm 1/\\sqrt k`
    with equal probability (``"rademacher"``), so :math:`\\mathbb E[P^TP] = I_p` and
    :math:`\\mathbb E\\|Pv\\|^2 = \\|v\\|^2` (Johnson–Lindenstrauss). The blocks depend only on
    ``seed``, ``dim``, ``num_params``, ``kind`` and ``dtype``; each is ``[k, ≤ BLOCK_COLUMNS]``.
    """
    for b, start in enumerate(range(0, num_params, BLOCK_COLUMNS)):
        stop = min(start + BLOCK_COLUMNS, num_params)
        gen = torch.Generator().manual_seed(_block_seed(seed, b))
        if kind == "gaussian":
            block = torch.randn(dim, stop - start, generator=gen, dtype=dtype)
        else:
            bits = torch.randint(0, 2, (dim, stop - start), generator=gen)
            block = (2 * bits - 1).to(dtype)
        yield slice(start, stop), (block / math.sqrt(dim)).to(device)


class _Projector:
    """Applies :math:`P` to rows ``[b, p] -> [b, k]``, keeping :math:`P` when it fits."""

    def __init__(
        self,
        dim: int,
        num_params: int,
        seed: int,
        kind: ProjectionKind,
        dtype: torch.dtype,
        device: torch.device,
        budget_bytes: int,
    ) -> None:
        self.args = (dim, num_params)
        self.kw: dict[str, Any] = {"seed": seed, "kind": kind, "dtype": dtype, "device": device}
        itemsize = torch.finfo(dtype).bits // 8
        self.full: torch.Tensor | None = None
        if dim * num_params * itemsize <= budget_bytes:
            self.full = torch.cat([blk for _, blk in projection_blocks(*self.args, **self.kw)], 1)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        if self.full is not None:
            return rows @ self.full.T
        out = torch.zeros(rows.shape[0], self.args[0], dtype=rows.dtype, device=rows.device)
        for cols, blk in projection_blocks(*self.args, **self.kw):
            out += rows[:, cols] @ blk.T
        return out


def random_projection(
    model: nn.Module,
    objective: Objective,
    train: Any,
    test: Any,
    *,
    dim: int,
    damping: float,
    seed: int = 0,
    kind: ProjectionKind = "gaussian",
    measurement: PerExampleFn | None = None,
    chunk_size: ChunkSize = "auto",
    projection_bytes: int = 1 << 28,
) -> torch.Tensor:
    """TRAK-style attribution: influence in a random ``dim``-dimensional gradient sketch.

    With a seeded random projection :math:`P` (``[k, p]``, :math:`k` = ``dim``; see
    :func:`projection_blocks`), projected training gradients :math:`\\phi_i = P g_i`
    (:math:`\\Phi = [\\phi_1 .. \\phi_n]^T`, ``[n, k]``) and projected test gradients
    :math:`\\phi_j^{test} = P\\nabla f(z_j)`:

    .. math::

        s_{ji} = -\\,\\phi_j^{test\\,T}
        \\Big(\\frac{\\Phi^T\\Phi}{n} + \\lambda I_k\\Big)^{-1}\\phi_i .

    Normalisation and meaning: :math:`\\Phi^T\\Phi/n = P F P^T` with
    :math:`F = \\frac1n\\sum_i g_i g_i^T`, the (uncentred) empirical Fisher of the training
    gradients :math:`g_i = \\nabla\\ell(z_i) + \\lambda_{wd}\\theta`. So :math:`s` is the
    calculator's influence :math:`-\\nabla f^T (C + \\lambda I)^{-1} g_i` with the curvature
    :math:`C = F` replaced by its sketch, and in the same units: for :math:`k \\ge p` (and
    :math:`P` of full column rank) :math:`P^T(PFP^T + \\lambda I)^{-1}P = (F + \\lambda
    (P^TP)^{-1})^{-1}`, which tends to :math:`(F + \\lambda I)^{-1}` as :math:`k \\to \\infty`
    (:math:`P^TP \\to I`), and is exact for any such :math:`P` at :math:`\\lambda = 0`. For a
    loss whose per-example output Hessian is the outer product of its output gradient in
    expectation (cross-entropy under the model's own labels) :math:`F` approximates the
    Fisher and hence the Gauss-Newton matrix; at a minimum with few mislabeled points the
    empirical Fisher is the cruder of the two. Park et al. (TRAK, 2023) use
    :math:`\\Phi^T\\Phi` without :math:`1/n`, no damping and an extra output-weighting term,
    and average over an ensemble of models; this is the single-model estimator in infl's
    units (``-scores / n`` is a predicted removal effect).

    Sign: the same as :meth:`infl.InfluenceCalculator.influence`. **Negative = helpful**
    (up-weighting :math:`z_i` lowers :math:`f(z_j)`), positive = harmful.

    Parameters
    ----------
    model, objective, train, test, measurement, chunk_size
        As in :func:`~infl.attribution.grad_dot`.
    dim
        :math:`k \\ge 1`, the sketch dimension. Larger :math:`k` is closer to the unprojected
        estimator (error roughly :math:`\\propto 1/\\sqrt k`); :math:`k \\ll p` is the point.
    damping
        :math:`\\lambda \\ge 0` added to the ``k x k`` Gram matrix. With :math:`k > n` the
        Gram has rank at most :math:`n`, so it needs :math:`\\lambda > 0`; with
        :math:`k > p` its rank is at most :math:`p`, so :math:`\\lambda = 0` works only for
        :math:`k \\le \\min(n, p)`.
    seed
        Seeds :math:`P` (same seed, same matrix, however the data is chunked).
    kind
        ``"gaussian"`` (:math:`\\mathcal N(0, 1/k)` entries) or ``"rademacher"``
        (:math:`\\pm 1/\\sqrt k`).
    projection_bytes
        Keep :math:`P` in memory when its ``k * p`` entries take at most this many bytes
        (default 256 MiB); otherwise regenerate it block by block from the seed for every
        chunk of gradients (slower, memory ``k * BLOCK_COLUMNS``).

    Returns
    -------
    Tensor ``[m, n]``
        Test-major scores in the model's dtype.

    Raises
    ------
    InputError
        ``dim`` not a positive integer, ``damping`` negative or not finite, unknown ``kind``.
    NotPositiveDefiniteError
        The Gram matrix is singular (``damping=0`` with fewer than ``k`` independent
        projected gradients): raise ``damping``.

    Notes
    -----
    Cost: one streamed pass over the training gradients (each chunk ``[b, p]`` projected to
    ``[b, k]``: :math:`O(nkp)` flops; ``[n, p]`` is never formed), one test pass, an
    :math:`O(nk^2)` Gram matrix and a ``k x k`` Cholesky factorisation (for :math:`k > n` the
    ``n x n`` dual :math:`\\Phi\\Phi^T/n + \\lambda I_n`, the same scores); memory
    :math:`O(nk + kp)` (or :math:`O(nk)` with :math:`P` regenerated). No HVP. Use it when
    :math:`p` is too large for a curvature solver and :math:`n` is large: the ``[n, k]``
    sketch can be reused for many test batches.
    """
    check_chunk_size(chunk_size)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise InputError(f"dim must be a positive integer (the sketch dimension k), got {dim!r}")
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
        raise InputError(f"damping must be a finite number >= 0, got {damping!r}")
    if kind not in ("gaussian", "rademacher"):
        raise InputError(f"kind must be 'gaussian' or 'rademacher', got {kind!r}")
    wrapper, train_data, test_data, fn = setup(model, objective, train, test, measurement)
    project = _Projector(
        dim,
        wrapper.num_params,
        seed,
        kind,
        wrapper.dtype,
        wrapper.device,
        projection_bytes,
    )
    n = len(train_data)
    phi = torch.empty(n, dim, dtype=wrapper.dtype, device=wrapper.device)
    for start, g in train_grads(wrapper, train_data, chunk_size):
        phi[start : start + g.shape[0]] = project(g)
    phi_test = project(test_grads(wrapper, fn, test_data, chunk_size))
    if dim > n and damping == 0:
        raise NotPositiveDefiniteError(
            f"the {dim}x{dim} projected Gram matrix Phi^T Phi / n has rank at most n={n} < "
            f"dim={dim}, so it is singular at damping=0; raise damping above 0 or use dim <= n"
        )
    eye = torch.eye(min(dim, n), dtype=phi.dtype, device=phi.device)
    # the k x k Gram, or for k > n its n x n dual (push-through identity):
    # (Phi^T Phi / n + lam I_k)^{-1} Phi^T = Phi^T (Phi Phi^T / n + lam I_n)^{-1}
    gram = (phi.T @ phi if dim <= n else phi @ phi.T) / n + damping * eye
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        raise NotPositiveDefiniteError(
            f"the {dim}x{dim} projected Gram matrix Phi^T Phi / n + {damping} I is singular "
            f"(n={n} training gradients, dim={dim}); raise damping above 0 (e.g. 1e-3 times "
            "the mean squared gradient norm) or lower dim"
        )
    if dim <= n:
        return -(torch.cholesky_solve(phi_test.T, chol).T @ phi.T)
    return -torch.cholesky_solve(phi @ phi_test.T, chol).T
