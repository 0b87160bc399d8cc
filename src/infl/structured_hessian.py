"""The dense Hessian from the Gauss-Newton matrix and the HVP columns of a few layers.

The Hessian of the mean loss splits into the Gauss-Newton matrix and a residual term:

.. math::

    H = G + R,\\qquad
    G = \\frac1n \\sum_i J_i^T H_{out,i} J_i + \\Lambda,\\qquad
    R = \\frac1n \\sum_i \\sum_c \\frac{\\partial \\ell_i}{\\partial f_{ic}}
        \\nabla^2_\\theta f_{ic},

with :math:`f_{ic}` the model's outputs. :math:`G` costs ``K`` backward passes per example
for ``K`` outputs (:func:`infl.second_order.dense_ggn`), where assembling :math:`H` from
products costs ``p`` Hessian-vector products. :math:`R` carries the model's own second
derivatives, and in most networks many of its blocks vanish: a layer that is linear in its
own parameters, followed by piecewise-linear activations (ReLU, max-pooling), has a zero
diagonal block (:math:`\\partial^2 f / \\partial W_l^2 = 0`); only pairs of layers couple.

:func:`assemble_hessian` finds that pattern and uses it:

1. The parameters are grouped by the module that owns them.
2. One probe per group ``a``, a random vector :math:`v_a` on that group's coordinates, gives
   :math:`R v_a = H v_a - G v_a` (one HVP and one Gauss-Newton product each). Block
   :math:`R_{ba}` is taken as zero when :math:`\\|(R v_a)_b\\| \\le \\tau \\|H v_a\\|` with
   :math:`\\tau = 10^3\\varepsilon`: a non-zero block maps a random vector to zero with
   probability zero, so this certifies the block, up to round-off.
3. The columns of :math:`H` are computed by HVPs for a set ``S`` of groups that touches every
   non-zero block of :math:`R` (each group with a non-zero diagonal block, and one group of each
   coupled pair): the minimum-weight vertex cover of the coupling graph. The rest of the matrix
   is :math:`G`: :math:`H_{S^c S^c} = G_{S^c S^c}`, since :math:`R` vanishes there; only that
   block of :math:`G` is formed.
4. A last random vector over all parameters checks the assembled matrix against one HVP
   (relative error at most :math:`\\tau`); if the check fails, the matrix is assembled from
   ``p`` products as before.

On the digits CNN (``p = 2,514``: conv 120, conv 1,744, linear 650; ReLU and max-pooling)
``S`` is the two small layers: 770 HVP columns and four probes instead of 2,514 products
(``benchmarks/bench_dense_hessian.py``). The result equals the product assembly to round-off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from infl.errors import InputError
from infl.objective import output_hessian_loss
from infl.progress import progress_iter

if TYPE_CHECKING:
    from infl.operators import HessianOperator

__all__ = [
    "STRUCTURED_MIN_PARAMS",
    "DenseAssembly",
    "assemble_hessian",
    "coupling_cover",
    "parameter_groups",
]

STRUCTURED_MIN_PARAMS = 1000
"""Below this many parameters the Hessian is assembled from ``p`` products: there a product
costs about as much as its Python dispatch, and the batched product assembly is already
cheaper than the Gauss-Newton matrix and probes."""

_MIN_SAVING = 0.25
"""The structured route is kept only when it saves at least this share of the ``p`` products."""

_TOLERANCE_EPS = 1e3
"""``tau`` in units of the dtype's machine epsilon (2.2e-13 in float64)."""

_EXACT_COVER_MAX_GROUPS = 16
"""Up to this many groups the cover is the exact minimum; beyond, a greedy one."""


@dataclass(frozen=True)
class DenseAssembly:
    """How :func:`assemble_hessian` built a dense Hessian.

    Attributes
    ----------
    method
        ``"products"`` (``p`` Hessian-vector products) or ``"gauss-newton"`` (the Gauss-Newton
        matrix plus the HVP columns of ``column_groups``).
    products
        Hessian-vector products made, probes and check included.
    groups
        The parameter groups (owning modules) and their sizes.
    column_groups
        The groups whose columns were computed by HVPs (all of them for ``"products"``).
    check_error
        The final check's relative error (``None`` when no check ran).
    reason
        Why ``"products"`` was used (empty for ``"gauss-newton"``).
    coupled
        The pairs of groups whose block of the residual term the probes found non-zero.
    """

    method: str
    products: int
    groups: tuple[tuple[str, int], ...] = ()
    column_groups: tuple[str, ...] = ()
    check_error: float | None = None
    reason: str = ""
    coupled: tuple[tuple[str, str], ...] = ()


def parameter_groups(names: list[str], numels: list[int]) -> list[tuple[str, torch.Tensor]]:
    """``(module, flat indices)`` for each module owning parameters, in parameter order.

    A parameter ``"a.b.weight"`` belongs to module ``"a.b"``; one without a dot to ``""``.
    """
    groups: dict[str, list[torch.Tensor]] = {}
    start = 0
    for name, size in zip(names, numels, strict=True):
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        groups.setdefault(owner, []).append(torch.arange(start, start + size))
        start += size
    return [(owner, torch.cat(parts)) for owner, parts in groups.items()]


def coupling_cover(weights: list[int], forced: set[int], edges: set[tuple[int, int]]) -> set[int]:
    """A minimum-weight set of vertices containing ``forced`` and one end of every edge.

    The complement of a maximum-weight independent set among the other vertices: exact by
    branching up to :data:`_EXACT_COVER_MAX_GROUPS` vertices, greedy (heaviest first) above.
    """
    count = len(weights)
    neighbours: list[set[int]] = [set() for _ in range(count)]
    for a, b in edges:
        if a != b:
            neighbours[a].add(b)
            neighbours[b].add(a)
    free = frozenset(v for v in range(count) if v not in forced)
    if count <= _EXACT_COVER_MAX_GROUPS:
        kept = _heaviest_independent(free, neighbours, weights)
    else:
        kept = set()
        for v in sorted(free, key=lambda u: -weights[u]):
            if not neighbours[v] & kept:
                kept.add(v)
    return set(range(count)) - kept


def _heaviest_independent(
    vertices: frozenset[int], neighbours: list[set[int]], weights: list[int]
) -> set[int]:
    """A maximum-weight independent set of the graph induced on ``vertices`` (branching)."""
    degree = {v: len(neighbours[v] & vertices) for v in vertices}
    if not vertices or max(degree.values()) == 0:
        return set(vertices)
    v = max(vertices, key=lambda u: degree[u])
    without = _heaviest_independent(vertices - {v}, neighbours, weights)
    with_v = {v} | _heaviest_independent(vertices - {v} - neighbours[v], neighbours, weights)
    return with_v if sum(weights[u] for u in with_v) > sum(weights[u] for u in without) else without


def assemble_hessian(
    operator: HessianOperator,
    block_size: int = 256,
    *,
    min_params: int = STRUCTURED_MIN_PARAMS,
    seed: int = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, DenseAssembly]:
    """The dense ``[p, p]`` Hessian of ``operator`` and how it was built (see the module).

    Parameters
    ----------
    operator
        A full-data Hessian operator (weight decay included).
    block_size
        Vectors per product call.
    min_params
        Models with fewer parameters are assembled from ``p`` products.
    seed
        Seeds the probes and the check (the result does not depend on it beyond round-off).
    progress
        Show a bar over the blocks of HVP columns (or of the ``p`` products).

    Returns
    -------
    (matrix, record)
        The symmetric ``[p, p]`` matrix and a :class:`DenseAssembly`.

    Notes
    -----
    Cost: one HVP and one Gauss-Newton product per parameter group, then the Gauss-Newton
    block of the ``q`` parameters outside the cover (``K`` backward passes per example and one
    ``[q, bK]`` by ``[bK, q]`` product per chunk), one HVP per parameter in the cover and one
    check; memory ``p^2 + q^2`` plus one block of columns.
    """
    wrapper = operator.wrapper
    p = operator.size
    groups = parameter_groups(wrapper.names, wrapper.numels)
    sizes = tuple((owner, int(idx.numel())) for owner, idx in groups)
    if p < min_params or len(groups) < 2:
        why = f"p = {p} < {min_params}" if p < min_params else "a single parameter group"
        return _from_products(operator, block_size, progress, sizes, why)
    try:
        output_hessian_loss(wrapper.objective.per_example_loss)
    except InputError as err:
        return _from_products(operator, block_size, progress, sizes, str(err))
    tau = _TOLERANCE_EPS * torch.finfo(operator.dtype).eps
    gen = torch.Generator(device="cpu").manual_seed(seed)
    probes = torch.zeros(len(groups), p, dtype=operator.dtype)
    for row, (_, idx) in enumerate(groups):
        probes[row, idx] = torch.randn(idx.numel(), dtype=operator.dtype, generator=gen)
    probes = probes.to(operator.device)
    before = operator.num_matvecs
    h_probes = operator.matmat(probes)
    # G v by products: the dense Gauss-Newton matrix is built only once it is known to pay
    residual = h_probes - wrapper.ggn_vp(operator.data, probes, operator.chunk_size)
    forced: set[int] = set()
    edges: set[tuple[int, int]] = set()
    for a in range(len(groups)):
        scale = float(torch.linalg.vector_norm(h_probes[a]))
        for b, (_, idx) in enumerate(groups):
            if float(torch.linalg.vector_norm(residual[a, idx])) > tau * scale:
                if a == b:
                    forced.add(a)
                else:
                    edges.add((min(a, b), max(a, b)))
    cover = sorted(coupling_cover([size for _, size in sizes], forced, edges))
    empty = torch.empty(0, dtype=torch.long)
    columns = torch.cat([groups[g][1] for g in cover]) if cover else empty
    coupled = tuple((groups[a][0], groups[b][0]) for a, b in sorted(edges))
    if columns.numel() > (1 - _MIN_SAVING) * p:
        why = f"the residual couples groups covering {columns.numel()} of {p} parameters"
        matrix, record = _from_products(operator, block_size, progress, sizes, why)
        return matrix, replace(record, products=operator.num_matvecs - before, coupled=coupled)
    in_cover = torch.zeros(p, dtype=torch.bool)
    in_cover[columns] = True
    rest = torch.nonzero(~in_cover).reshape(-1).to(operator.device)
    ggn = wrapper.ggn_matrix(operator.data, operator.chunk_size, index=rest)  # only G_rest,rest
    if ggn is None:
        why = "the model's output is not one tensor of at most 256 numbers per example"
        matrix, record = _from_products(operator, block_size, progress, sizes, why)
        return matrix, replace(record, products=operator.num_matvecs - before, coupled=coupled)
    matrix = torch.zeros(p, p, dtype=operator.dtype, device=operator.device)
    matrix[rest.unsqueeze(1), rest.unsqueeze(0)] = ggn
    del ggn
    columns = columns.to(operator.device)
    starts = range(0, columns.numel(), block_size)
    for start in progress_iter(starts, desc="Hessian columns", enabled=progress):
        rows = columns[start : start + block_size]
        basis = torch.zeros(rows.numel(), p, dtype=operator.dtype, device=operator.device)
        basis[torch.arange(rows.numel(), device=operator.device), rows] = 1
        block = operator.matmat(basis)  # [b, p]: rows of H (= its columns)
        matrix[rows, :] = block
        matrix[:, rows] = block.T
    inner = matrix[columns][:, columns]
    matrix[columns.unsqueeze(1), columns.unsqueeze(0)] = (inner + inner.T) / 2
    check = torch.randn(1, p, dtype=operator.dtype, generator=gen).to(operator.device)
    exact = operator.matmat(check)
    error = float(
        torch.linalg.vector_norm(check @ matrix - exact)
        / torch.linalg.vector_norm(exact).clamp_min(torch.finfo(operator.dtype).tiny)
    )
    products = operator.num_matvecs - before
    if not math.isfinite(error) or error > tau:
        why = f"the check against an HVP failed (relative error {error:.2e})"
        matrix, record = _from_products(operator, block_size, progress, sizes, why)
        return matrix, replace(record, products=operator.num_matvecs - before, coupled=coupled)
    record = DenseAssembly(
        method="gauss-newton",
        products=products,
        groups=sizes,
        column_groups=tuple(groups[g][0] for g in cover),
        check_error=error,
        coupled=coupled,
    )
    return matrix, record


def _from_products(
    operator: HessianOperator,
    block_size: int,
    progress: bool,
    sizes: tuple[tuple[str, int], ...],
    reason: str,
) -> tuple[torch.Tensor, DenseAssembly]:
    from infl.operators import LinearOperator

    before = operator.num_matvecs
    matrix = LinearOperator.to_dense(operator, block_size, progress=progress)
    record = DenseAssembly(
        method="products",
        products=operator.num_matvecs - before,
        groups=sizes,
        column_groups=tuple(owner for owner, _ in sizes),
        reason=reason,
    )
    return matrix, record
