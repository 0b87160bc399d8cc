"""The calculator's training gradients: the ``[n, p]`` cache, and the scores streamed from them.

Functions of an :class:`~infl.InfluenceCalculator` (this module never imports it): one pass of
training gradients that fills the cache when it fits in ``cache_bytes``, the per-layer scores
of a block-diagonal solver, self-influence, and the scores of a low-rank inverse
:math:`U^T \\operatorname{diag}(w) U` from ``[n, r]`` projections :math:`G U^T` (``[n, p]``
is then never kept).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from infl.data import as_indexed
from infl.errors import InflError, InputError
from infl.factor_cache import FactorCache
from infl.gradient_products import (
    checked,
    gradients_from_factors,
    loss_factors,
    products_from_factors,
)
from infl.progress import progress_iter

if TYPE_CHECKING:
    from infl.calculator import InfluenceCalculator
    from infl.solvers.base import FittedSolver

__all__ = [
    "TrainGradCache",
    "adopt_fit_factors",
    "iter_train_grads",
    "iter_train_moments",
    "iter_train_products",
    "low_rank_influence",
    "low_rank_self_influence",
    "per_layer_influence",
    "projects",
    "self_influence",
    "sharded_self_influence",
    "train_projection",
]


class TrainGradCache:
    """The ``[n, p]`` training gradients once computed, shared by derived calculators.

    For a model of ``nn.Linear`` layers, which never forms ``[n, p]``, it holds them in
    factored form instead (:class:`~infl.factor_cache.FactorCache`). Also holds their
    ``[n, r]`` projections onto low-rank bases (keyed by the basis tensor
    itself, so a ``with_damping`` calculator, whose fitted solver keeps the basis, reuses them),
    and per basis the cost of the passes scored without projecting (:func:`projects`).
    """

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.factors = FactorCache()  # nn.Linear models: the gradients in factored form
        self.projections: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.unprojected: list[tuple[torch.Tensor, int]] = []

    def unprojected_cost(self, basis: torch.Tensor) -> int:
        for key, cost in self.unprojected:
            if key is basis:
                return cost
        return 0

    def add_unprojected_cost(self, basis: torch.Tensor, cost: int) -> None:
        total = self.unprojected_cost(basis) + cost
        kept = [(key, c) for key, c in self.unprojected if key is not basis]
        self.unprojected = [*kept[-3:], (basis, total)]

    def projection(self, basis: torch.Tensor) -> torch.Tensor | None:
        for key, proj in self.projections:
            if key is basis:
                return proj
        return None

    def add_projection(self, basis: torch.Tensor, proj: torch.Tensor) -> None:
        self.projections = [*self.projections[-3:], (basis, proj)]  # the 4 latest bases


def fits_cache(calc: InfluenceCalculator) -> bool:
    """Whether this rank's ``[n, p]`` training gradients fit in ``cache_bytes``."""
    itemsize = torch.finfo(calc.wrapper.dtype).bits // 8
    return len(calc.local_train) * calc.num_params * itemsize <= calc.cache_bytes


def adopt_fit_factors(calc: InfluenceCalculator, fitted: FittedSolver) -> None:
    """Keep the training gradients' factors that ``fitted``'s fit computed
    (:meth:`FittedSolver.take_train_factors
    <infl.solvers.base.FittedSolver.take_train_factors>`) in the calculator's
    :class:`~infl.factor_cache.FactorCache`, when they are of its model, this rank's data and
    its chunking, and fit in ``cache_bytes``; each chunk's targets are checked as a pass over
    the data checks them."""
    found = fitted.take_train_factors()
    kept = calc._grad_cache.factors
    if (
        found is None
        or kept.complete
        or found.wrapper is not calc.wrapper
        or found.data is not calc.local_train
        or found.chunk_size != calc.chunk_size
    ):
        return
    num_chunks = calc.local_train.num_chunks(calc.chunk_size)
    for start, factors in sorted(found.chunks.items()):
        calc.wrapper.check_targets(found.batches[start], offset=start, what=calc.local_train.name)
        kept.add(start, factors, calc.chunk_size, num_chunks, calc.cache_bytes)


def iter_train_grads(calc: InfluenceCalculator, desc: str) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, [b, p] gradients)`` over the training data: from the cache when it is
    filled, else one streamed pass that fills it when ``n p`` values fit in ``cache_bytes``
    (formed from the kept factors, reading no data, when every chunk's are kept).

    Under ``torch.distributed`` the data is this rank's shard (``calc.local_train``): ``start``
    is local and the cache holds the shard's ``[n_r, p]`` rows. While the cache is filled, each
    chunk's gradients are written straight into its rows and the rows are what is yielded:
    read them, never modify them."""
    local_n = len(calc.local_train)
    cached = calc._grad_cache.value
    if cached is not None:
        for start in range(0, local_n, calc.chunk_size):
            yield start, cached[start : start + calc.chunk_size]
        return
    wrapper = calc.wrapper
    cache: torch.Tensor | None = None
    if fits_cache(calc):
        # each chunk's gradients are written straight into their rows: forming them apart
        # and copying wrote every byte twice, the first time into fresh memory
        cache = torch.empty(local_n, calc.num_params, dtype=wrapper.dtype, device=wrapper.device)
    kept = calc._grad_cache.factors
    if checked(wrapper) and kept.get(0, calc.chunk_size) is not None:
        yield from _grads_from_kept_factors(calc, cache)  # every chunk's: no data read
        return
    bar = progress_iter(
        calc.local_train.chunks(calc.chunk_size),
        total=calc.local_train.num_chunks(calc.chunk_size),
        desc=desc,
        enabled=calc.progress,
    )
    for start, batch in bar:
        wrapper.check_targets(batch, offset=start, what=calc.local_train.name)
        rows = None
        if cache is not None:
            rows = cache[start : start + min(calc.chunk_size, local_n - start)]
        yield start, wrapper.train_grads(batch, out=rows)
    calc._grad_cache.value = cache


def _grads_from_kept_factors(
    calc: InfluenceCalculator, cache: torch.Tensor | None
) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`iter_train_grads` when every chunk's factors are kept: each chunk's gradients
    formed from them (into the cache's rows when there is one), reading the data only for a
    chunk whose gradients are not finite (whose formed gradients then name the example)."""
    wrapper, chunk, local_n = calc.wrapper, calc.chunk_size, len(calc.local_train)
    kept = calc._grad_cache.factors
    for start in range(0, local_n, chunk):
        rows = None if cache is None else cache[start : start + min(chunk, local_n - start)]
        found = kept.get(start, chunk)
        assert found is not None
        grads = gradients_from_factors(wrapper, found, rows)
        if grads is None:
            batch = calc.local_train.select(range(start, min(start + chunk, local_n)))
            grads = wrapper.train_grads(batch, out=rows)
        yield start, grads
    calc._grad_cache.value = cache


def iter_train_products(
    calc: InfluenceCalculator,
    vectors: torch.Tensor,
    desc: str,
    *,
    skip: int = 0,
    fill_cache: bool = True,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, vectors @ g[start:start+b].T)``, ``[k, b]`` per chunk, from chunk ``skip`` on.

    From the ``[n, p]`` cache when it is filled. Otherwise, for a model of plain ``nn.Linear``
    layers and few enough vectors (:meth:`ModelWrapper.multiplies_directly
    <infl.model.ModelWrapper.multiplies_directly>`), each chunk's products come from its
    layers' inputs and output gradients and ``[n, p]`` is neither formed nor cached: on the 85k
    digits MLP with ``k = 10`` that pass takes 0.097 s, about a product with the filled cache
    (0.076 s), where forming the gradients takes 0.45 s and ``n p`` values of memory
    (``benchmarks/bench_scoring.py``). Otherwise :func:`iter_train_grads` when it fills the
    cache (``[n, p]`` fits in ``cache_bytes``), else each chunk's products by
    :meth:`ModelWrapper.train_grad_products <infl.model.ModelWrapper.train_grad_products>`
    (for a convolutional model, its gradients formed a few examples at a time and never
    whole). Under ``torch.distributed`` the chunks are this rank's shard.
    """
    cached = calc._grad_cache.value
    direct = calc.wrapper.multiplies_directly(vectors.shape[0])
    if cached is None and skip == 0 and fill_cache and not direct and fits_cache(calc):
        for start, grads in iter_train_grads(calc, desc):
            yield start, vectors @ grads.to(vectors).T
        return
    if cached is not None:
        local_n = len(calc.local_train)
        for start in range(skip * calc.chunk_size, local_n, calc.chunk_size):
            yield start, vectors @ cached[start : start + calc.chunk_size].to(vectors).T
        return
    wrapper = calc.wrapper
    chunk, local_n = calc.chunk_size, len(calc.local_train)
    num_chunks = calc.local_train.num_chunks(chunk)
    kept = calc._grad_cache.factors
    starts = range(skip * chunk, local_n, chunk)
    if checked(wrapper) and kept.get(starts[0] if starts else 0, chunk) is not None:
        for start in starts:  # no data read: every chunk's factors are kept
            found = kept.get(start, chunk)
            assert found is not None
            if direct:
                products = products_from_factors(wrapper, found, vectors)
            else:  # too many vectors to pay: the gradients, formed from the factors
                formed = gradients_from_factors(wrapper, found)
                products = None if formed is None else vectors @ formed.to(vectors).T
            if products is None:  # not finite: the formed gradients name the example
                batch = calc.local_train.select(range(start, min(start + chunk, local_n)))
                products = wrapper.train_grad_products(batch, vectors)
            yield start, products
        return
    bar = progress_iter(
        calc.local_train.chunks(chunk, skip=skip),
        total=num_chunks - skip,
        desc=desc,
        enabled=calc.progress,
    )
    for start, batch in bar:
        wrapper.check_targets(batch, offset=start, what=calc.local_train.name)
        factors = None
        if wrapper.multiplies_directly(vectors.shape[0]):
            factors = loss_factors(wrapper, wrapper.prepare(batch))
            if factors is not None:
                kept.add(start, factors, chunk, num_chunks, calc.cache_bytes)
        yield start, wrapper.train_grad_products(batch, vectors, factors=factors)


def iter_train_moments(
    calc: InfluenceCalculator, desc: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per chunk of this rank's training data, the sum of its training gradients ``[p]`` and of
    their squared norms ``[1]`` (:meth:`ModelWrapper.train_grad_moments
    <infl.model.ModelWrapper.train_grad_moments>`: without forming ``[b, p]`` for
    ``nn.Linear`` models, whose gradients it keeps in factored form for scoring when they fit
    in ``cache_bytes``); the ``[n, p]`` cache is not filled."""
    wrapper = calc.wrapper
    chunk = calc.chunk_size
    num_chunks = calc.local_train.num_chunks(chunk)
    keep = not calc.solver.low_rank_scoring  # a low-rank inverse scores from projections
    bar = progress_iter(
        calc.local_train.chunks(chunk), total=num_chunks, desc=desc, enabled=calc.progress
    )
    for start, batch in bar:
        wrapper.check_targets(batch, offset=start, what=calc.local_train.name)
        batch = wrapper.prepare(batch)
        factors = loss_factors(wrapper, batch) if wrapper.has_linear_shortcut else None
        if factors is not None and keep:
            calc._grad_cache.factors.add(start, factors, chunk, num_chunks, calc.cache_bytes)
        yield wrapper.train_grad_moments(batch, factors=factors)


def per_layer_influence(calc: InfluenceCalculator, test_data: Any) -> dict[str, torch.Tensor]:
    """``{block: [m, n]}`` from the fitted solver's parameter blocks (one training pass)."""
    blocks = calc.fitted_solver().blocks()
    if blocks is None:
        raise InputError(
            f"per_layer=True needs a block-diagonal solver (KFAC or EKFAC), whose inverse "
            f"splits into one block per layer; {type(calc.solver).__name__} couples all "
            "parameters, so its scores have no per-layer split. Use infl.KFAC or infl.EKFAC."
        )
    ihvp = calc.inverse_hvp(test_data).value
    m, n = ihvp.shape[0], len(calc.local_train)  # this rank's columns (all n in one process)
    scores = {name: torch.zeros(m, n, dtype=ihvp.dtype, device=ihvp.device) for name in blocks}
    for start, grads in iter_train_grads(calc, desc="scoring per layer"):
        stop = start + grads.shape[0]
        for name, slices in blocks.items():
            for sl in slices:
                scores[name][:, start:stop] -= ihvp[:, sl] @ grads[:, sl].T
    return {name: calc.group.gather_columns(s, calc.num_train) for name, s in scores.items()}


PASS_COST = 3
"""A pass over the training data that multiplies without forming the gradients, in units of one
vector multiplied by every training gradient (``2 n p`` flops): the forward and backward passes
that give the layers' factors (measured: 1–2 units on the 85k digits MLP)."""


def projects(calc: InfluenceCalculator, basis: torch.Tensor, m: int, passes: int = 1) -> bool:
    """Whether ``m`` test rows are scored against a low-rank inverse :math:`U^T
    \\operatorname{diag}(w) U` (``basis`` = ``U``, ``[r, p]``) through the ``[n, r]``
    projections :math:`G U^T` (``True``), or by ``passes`` passes over the training data that
    multiply the gradients by the rows' ``[m, p]`` inverse-HVPs (``False``; their cost is then
    recorded on the calculator's cache).

    Both give the same scores up to round-off. When a pass must form the per-example gradients,
    forming them costs more than multiplying them by ``r`` vectors, so the projections are
    taken at once: one pass, reused by every later query. When a pass needs no forming (a
    filled ``[n, p]`` cache, or the direct products of ``nn.Linear`` models,
    :meth:`~infl.model.ModelWrapper.multiplies_directly`), projecting costs ``r + c`` units of
    ``2 n p`` flops (``c`` = :data:`PASS_COST`) and multiplying by the inverse-HVPs
    ``m + passes c`` units, every query. Not knowing which queries follow, the rule is then the
    ski-rental one: multiply by the inverse-HVPs while the units so spent on this basis, this
    query included, stay below ``r + c``, then project. That never spends more than about twice
    the cheaper choice made with hindsight, and a single query with ``m < r`` never projects
    (the 85k digits MLP with ``r = 50``, ``m = 10``: a 0.06 s pass instead of 0.42 s,
    ``benchmarks/bench_scoring.py``).
    """
    cache = calc._grad_cache
    if cache.projection(basis) is not None:
        return True
    if cache.value is None and not calc.wrapper.multiplies_directly(m):
        return True
    cost = m + passes * PASS_COST
    if cache.unprojected_cost(basis) + cost < basis.shape[0] + PASS_COST:
        cache.add_unprojected_cost(basis, cost)
        return False
    return True


def low_rank_influence(calc: InfluenceCalculator, test_data: Any) -> torch.Tensor | None:
    """:math:`-(T U^T) \\operatorname{diag}(w) (G U^T)^T` when the fitted solver is a
    low-rank inverse :math:`U^T \\operatorname{diag}(w) U` and :func:`projects` chooses the
    projections (else ``None``: the caller multiplies by the inverse-HVPs)."""
    low = calc.fitted_solver().low_rank()
    if low is None:
        return None
    basis, weights = low
    if not projects(calc, basis, len(as_indexed(test_data, "test data"))):
        return None
    train_proj = train_projection(calc, basis)  # [n, r]
    test_proj = calc.test_grads(test_data).to(basis) @ basis.T  # [m, r]
    return -(test_proj * weights) @ train_proj.T


def train_projection(calc: InfluenceCalculator, basis: torch.Tensor) -> torch.Tensor:
    """:math:`G U^T`, ``[n, r]``: one streamed pass, cached (``[n, p]`` is never kept).

    Under ``torch.distributed`` each rank projects its shard and the ``[n, r]`` rows are
    gathered (and cached) on every rank."""
    cached = calc._grad_cache.projection(basis)
    if cached is not None:
        return cached
    local_n = len(calc.local_train)
    proj = torch.empty(local_n, basis.shape[0], dtype=basis.dtype, device=basis.device)
    # the [n, p] cache is not filled for a projection (a low-rank inverse never needs it)
    products = iter_train_products(calc, basis, "projecting train gradients", fill_cache=False)
    for start, block in products:
        proj[start : start + block.shape[1]] = block.T
    proj = calc.group.gather_shard_rows(proj, calc.num_train)
    calc._grad_cache.add_projection(basis, proj)
    return proj


def low_rank_self_influence(
    calc: InfluenceCalculator,
    low: tuple[torch.Tensor, torch.Tensor],
    batch: Any,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Self-influence of the training examples ``rows`` (``batch``) under a low-rank inverse:
    their cached projections when there are any, else the batch's gradients projected."""
    basis, weights = low
    cached = calc._grad_cache.projection(basis)
    if cached is not None:
        train_proj = cached[rows.to(cached.device)]
    else:
        train_proj = calc.wrapper.train_grads(batch).to(basis) @ basis.T
    measured = calc.wrapper.per_example_grads(calc.measurement, batch).to(basis) @ basis.T
    return -(measured * weights * train_proj).sum(dim=1)


def self_influence(
    calc: InfluenceCalculator, indices: Sequence[int] | torch.Tensor | None
) -> torch.Tensor:
    """The body of :meth:`InfluenceCalculator.self_influence`: ``[k]``, solved (or, for a
    low-rank inverse, projected) ``chunk_size`` training examples at a time."""
    fitted = calc.fitted_solver()
    if indices is None and calc.group.world_size > 1:
        return sharded_self_influence(calc, fitted)
    idx = (
        torch.arange(calc.num_train)
        if indices is None
        else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    )
    out = []
    low = fitted.low_rank()
    # all examples: one pass in order (a stream has no random access); else the indices
    batches: Iterator[tuple[int, Any]] = (
        calc.train.chunks(calc.chunk_size)
        if indices is None
        else (
            (start, calc.train.select(idx[start : start + calc.chunk_size]))
            for start in range(0, idx.numel(), calc.chunk_size)
        )
    )
    total = -(-idx.numel() // calc.chunk_size)
    bar = progress_iter(batches, total=total, desc="self-influence", enabled=calc.progress)
    for start, batch in bar:
        if low is not None:
            rows = idx[start : start + calc.chunk_size]
            out.append(low_rank_self_influence(calc, low, batch, rows))
            continue
        ihvp = fitted.solve(calc.wrapper.train_grads(batch)).value
        measured = calc.wrapper.per_example_grads(calc.measurement, batch)
        out.append(-(ihvp * measured).sum(dim=1))
    return torch.cat(out)


def sharded_self_influence(calc: InfluenceCalculator, fitted: FittedSolver) -> torch.Tensor:
    """Self-influence of all ``n`` examples under ``torch.distributed``: ``[n]`` on every rank.

    Each rank takes the gradients of its shard's examples. A solve is a collective (every
    operator product is all-reduced), so the ranks go in lockstep: at each step they gather
    their chunks' gradients into one ``[B, p]`` right-hand side, solve it together and keep
    their own rows (the same solves as one process, the gradient work split ``N`` ways). A
    low-rank inverse needs no solve and no step is shared. The ``[n_r]`` results are gathered.
    """
    group, shard = calc.group, calc.shard
    local_n = len(calc.local_train)
    low = fitted.low_rank()
    out = []
    steps = list(group.lockstep_chunks(shard, calc.chunk_size))
    for start, stop in progress_iter(steps, desc="self-influence", enabled=calc.progress):
        rows = torch.arange(start, stop)
        batch = calc.local_train.select(rows) if stop > start else None
        if low is not None:
            if batch is not None:
                out.append(low_rank_self_influence(calc, low, batch, rows + shard.start))
            continue
        wrapper = calc.wrapper
        grads = (
            wrapper.train_grads(batch)
            if batch is not None
            else torch.zeros(0, calc.num_params, dtype=wrapper.dtype, device=wrapper.device)
        )
        sizes = group.lockstep_sizes(shard, start, calc.chunk_size)
        ihvp_all = fitted.solve(group.gather_rows(grads, sizes)).value
        if batch is None:
            continue
        offset = sum(sizes[: group.rank])
        ihvp = ihvp_all[offset : offset + grads.shape[0]]
        measured = wrapper.per_example_grads(calc.measurement, batch)
        out.append(-(ihvp * measured).sum(dim=1))
    dtype = calc.wrapper.dtype
    local = torch.cat(out) if out else torch.zeros(0, dtype=dtype, device=calc.wrapper.device)
    if local.shape[0] != local_n:
        raise InflError(f"rank {group.rank} scored {local.shape[0]} of its {local_n} examples")
    return group.gather_shard_rows(local, calc.num_train)
