"""LiSSA: the truncated Neumann-series inverse-HVP of Agarwal et al. (2017) / Koh & Liang (2017)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from infl.data import IndexedData
from infl.errors import (
    InflWarning,
    InputError,
    NonFiniteError,
    NotPositiveDefiniteError,
    SolverDivergedError,
)
from infl.operators import DampedOperator, DenseOperator, LinearOperator, MeanOperator
from infl.solvers.base import (
    FittedSolver,
    Solver,
    SolveResult,
    as_rhs,
    check_damping,
    check_positive,
    relative_residuals,
)
from infl.solvers.lissa_recursion import DIVERGENCE_FACTOR as DIVERGENCE_FACTOR  # re-exported
from infl.solvers.lissa_recursion import depth_text, noise_text, run_recursion
from infl.spectral import (
    SCALE_MARGIN,
    SolverAdvice,
    estimate_extreme_eigenvalues,
    lissa_depth,
)
from infl.spectral.damping import AutoDamping, auto_damping
from infl.spectral.lanczos import lanczos

AUTO_SCALE_LANCZOS_STEPS = 30
"""At most this many HVPs for the ``scale="auto"`` estimate of :math:`\\mu_{\\max}`."""

MINIBATCH_SCALE_SAMPLES = 4
"""With minibatches and ``scale="auto"``, the top eigenvalue is also estimated on this many
random minibatch operators (each by :data:`MINIBATCH_LANCZOS_STEPS` HVPs of ``batch_size``
examples); the scale covers the largest."""

MINIBATCH_LANCZOS_STEPS = 20
"""Lanczos steps per minibatch top-eigenvalue estimate."""

DEFAULT_MAX_DEPTH = 10_000
"""``depth=None`` takes the advised depth for ``rtol``, capped at ``max_depth`` (this default)."""

AUTO_BATCH_MIN_EXAMPLES = 2048
"""``batch_size="auto"`` uses full-data steps up to this many training examples, above it
minibatches of :data:`AUTO_BATCH_SIZE`."""

AUTO_BATCH_SIZE = 256
"""The minibatch size ``batch_size="auto"`` picks for large data."""

AUTO_SNAPSHOT_EPOCHS = 4.0
"""``snapshot_every="auto"``: an anchor every ``AUTO_SNAPSHOT_EPOCHS * n / batch_size`` steps, so
that its full-data HVP costs a quarter of the minibatch steps between two anchors (measured on
the digits CNN at an equal budget of 1000 steps of 128: Pearson 0.9999 against 0.9994 with an
anchor every ``n / b`` steps; benchmarks/bench_lissa.py)."""

PARTITION_SEED_OFFSET = 104_729
"""``sampling="partition"`` draws its partition from ``seed`` plus this offset, so that the
partition and the epochs' orders (drawn from ``seed``) are independent streams."""

DENSE_MAX_BYTES = 1 << 28
"""``dense="auto"`` assembles the ``[p, p]`` matrix only when it takes at most this many bytes
(256 MiB: ``p`` up to 5,792 in float64)."""


def _check_int_or_auto(name: str, value: Any, none_means: str) -> None:
    """Refuse ``value`` unless it is a positive integer, ``None`` or ``"auto"``."""
    if isinstance(value, str):
        if value != "auto":
            raise InputError(
                f"{name} must be a positive integer, {none_means} or 'auto', got {value!r}"
            )
    elif value is not None:
        check_positive(name, value, integer=True)


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
        :math:`\\lambda \\ge 0`, or ``"auto"`` (one Lanczos run on :math:`H`, at most 60 HVPs,
        also used for ``scale`` and ``depth``; the rule of :mod:`infl.spectral.damping`:
        :math:`\\lambda = -(1+c)(\\theta_{\\min} - r_{\\min}) + 10^{-3}|\\theta_{\\max}|`, 0 when
        :math:`H` looks safely positive definite). Koh & Liang's code writes the recursion as
        :math:`x \\leftarrow b + (1 - d)x - Hx/\\sigma`; their :math:`d` is
        :math:`\\lambda/\\sigma` here, so that ``damping`` means :math:`H + \\lambda I` for every
        infl solver.
    scale
        :math:`\\sigma`, or ``"auto"``: :data:`infl.spectral.SCALE_MARGIN` (1.2) times a
        Lanczos estimate of the largest eigenvalue :math:`\\mu_{\\max}` of :math:`A` (costs up
        to 30 extra HVPs; see :func:`infl.diagnostics.advise`, which also gives the depth for a
        tolerance). With minibatches the estimate also covers minibatch curvature: the top
        eigenvalue of :data:`MINIBATCH_SCALE_SAMPLES` (4) random minibatch operators is
        estimated (20 HVPs of ``batch_size`` examples each) and
        :math:`\\sigma = 1.2\\,(\\max(\\theta_{\\max}, \\max_b \\theta^{(b)}_{\\max}) + \\lambda)`:
        a minibatch's top eigenvalue exceeds the full-data one, and a step with
        :math:`\\mu > 2\\sigma` amplifies the error.
    depth
        :math:`T`, recursion steps per repeat, or ``None`` (default): the advised depth for
        ``rtol``, :math:`T = \\lceil \\ln(1/\\text{rtol}) / -\\ln\\rho \\rceil` with
        :math:`\\rho = \\max|1 - \\mu/\\sigma|` over the Lanczos estimates, where the smallest
        is taken pessimistically as :math:`\\theta_{\\min} - r_{\\min} + \\lambda` (or half of
        :math:`\\theta_{\\min} + \\lambda` when that is not positive); capped at ``max_depth``
        with an :class:`~infl.errors.InflWarning` that states the cap and the depth (HVPs) it
        would take.
    repeats
        :math:`R`, independent repeats averaged (useful only with ``batch_size``).
    batch_size
        Training examples per stochastic HVP; ``None`` uses the full data (deterministic);
        ``"auto"`` (default): full data up to :data:`AUTO_BATCH_MIN_EXAMPLES` (2048) training
        examples (or when the operator cannot be subsampled), else minibatches of
        :data:`AUTO_BATCH_SIZE` (256).
    seed
        Seeds the minibatch draws.
    rtol
        Tolerance on the relative residual :math:`\\|A x - b\\|/\\|b\\|` for ``converged``; in
        full-data mode the recursion also stops early once every system meets it (its residual
        is exactly the latest increment, so the check is free).
    max_depth
        The cap on the advised depth when ``depth=None``.
    check_every
        Steps per window: the increments' norms stay on the device and are read once per
        window (one host synchronisation). The guarantees are per step: divergence is reported
        at the first step whose increment is non-finite or above 100 ``||b||`` (noticed at
        most ``check_every - 1`` steps later), and a full-data run stops at the end of the
        window in which every system first meets ``rtol`` (its residual only falls after that
        step, so the result is at least as accurate). ``1`` is the per-step loop.
    dense
        ``"auto"`` (default): with full-data steps, run the same recursion on the assembled
        ``[p, p]`` matrix of :math:`A` when :math:`p^2` numbers fit :data:`DENSE_MAX_BYTES`
        (256 MiB) and ``p < depth * k`` (assembling costs ``p`` products, the matrix-free
        recursion up to ``depth * k``); the result equals the matrix-free one to round-off.
        ``True`` always (full-data steps only), ``False`` never. ``info["dense_matrix"]`` says
        which ran. The matrix is kept and shared by :meth:`FittedLiSSA.with_damping`.
    snapshot_every
        :math:`m`, minibatch steps only: a control variate. Every :math:`m` steps the iterate
        is kept as an anchor :math:`s` and one full-data product :math:`A s` is taken; the
        steps in between use :math:`\\tilde A_t (x_t - s) + A s` in place of
        :math:`\\tilde A_t x_t` (the same expectation, with noise that shrinks with
        :math:`\\|x_t - s\\|`), so the recursion converges to :math:`A^{-1} b` as the depth
        grows instead of stalling at the minibatch noise. A run stops at the first anchor
        whose (exact) residual meets ``rtol``. ``"auto"``: :math:`m = \\lceil 4n / b \\rceil`
        (:data:`AUTO_SNAPSHOT_EPOCHS`), so the anchors cost a quarter of the steps; ``None``
        (default): plain minibatch steps. With ``scale="auto"`` the minibatch top eigenvalue
        enters the scale at half weight, :math:`\\sigma = 1.2\\max(\\theta_{\\max} + \\lambda,
        (\\max_b \\theta^{(b)}_{\\max} + \\lambda)/2)`: every minibatch eigenvalue stays in
        :math:`(0, 2\\sigma)` (stability), and the smaller scale converges faster.
    average
        Minibatch steps only: return the mean of the iterates :math:`x_t/\\sigma` over the
        second half of the steps (:math:`t > T/2`, Polyak-Ruppert tail averaging) instead of
        the last one. It costs nothing and averages out most of the minibatch noise of the last
        iterate; the bias left is that of step :math:`T/2`. Ignored with full-data steps
        (deterministic: the last iterate is the best).
    sampling
        Minibatch steps only: how a step's minibatch is drawn. ``"independent"`` (default): a
        fresh random minibatch of ``batch_size`` examples per step. ``"partition"`` (random
        reshuffling): the training examples are cut once per fit into
        :math:`B = \\lceil n/b \\rceil` disjoint random blocks
        (:meth:`~infl.operators.TrainingDataOperator.partition`, drawn from ``seed``), and
        every epoch of :math:`B` steps visits each block once, in a fresh random order. The
        blocks average to :math:`A` exactly over an epoch. Each block is a fixed operator, so
        on the Hessian it keeps its gradient graph (all blocks together at most
        :data:`~infl.second_order.GRAPH_BUDGET_BYTES`, 512 MiB) and a step costs one
        double-backward pass instead of a forward, a backward and a double backward: on the
        digits CNN with ``batch_size=128`` the same number of steps takes 0.62-0.65 of the
        time with float32 products, 0.76 in float64 (``benchmarks/bench_lissa_partition.py``).
        Combines with ``snapshot_every``, which then converges to :math:`A^{-1}b` as with
        independent draws; without it the cycled steps keep a small bias (random reshuffling
        with a fixed scale) that ``average`` does not remove. Each repeat cycles the same
        blocks in its own orders. Ignored with full-data steps.

    Notes
    -----
    Cost: ``fit`` spends at most 30 HVPs (60 with ``damping="auto"``) on the spectrum estimate
    when any of ``damping``, ``scale``, ``depth`` is automatic, plus 4 x 20 minibatch HVPs for an
    automatic scale with minibatches; each ``solve`` of ``k`` right-hand sides is
    ``repeats * depth`` operator applications of ``k`` vectors on ``batch_size`` examples (one
    repeat, possibly fewer steps, for full data, which is deterministic; plus ``k`` full-data
    HVPs per anchor with ``snapshot_every``) and ``k`` full-data HVPs for the final residual;
    the dense form instead costs ``p`` products once per fit and :math:`O(kp^2)` per step.
    A window of ``check_every`` steps costs one host synchronisation.
    ``info`` reports ``scale``, ``depth``, ``depth_advised``, ``batch_size`` and the estimates.

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
    >>> r = LiSSA(scale=3.0, depth=200, rtol=1e-8).solve(A, torch.tensor([1.0, 1.0]))
    >>> r.value.round(decimals=4)
    tensor([[1.0000, 0.5000]], dtype=torch.float64)
    """

    damping: float | Literal["auto"] = 0.0
    scale: float | Literal["auto"] = "auto"
    depth: int | None = None
    repeats: int = 1
    batch_size: int | Literal["auto"] | None = "auto"
    seed: int = 0
    rtol: float = 1e-3
    max_depth: int = DEFAULT_MAX_DEPTH
    check_every: int = 32
    dense: bool | Literal["auto"] = "auto"
    snapshot_every: int | Literal["auto"] | None = None
    average: bool = False
    sampling: Literal["independent", "partition"] = "independent"

    def __post_init__(self) -> None:
        check_damping(self.damping, allow_auto=True)
        if self.scale != "auto":
            if isinstance(self.scale, str):
                raise InputError(f"scale must be a positive number or 'auto', got {self.scale!r}")
            check_positive("scale", self.scale)
        if self.depth is not None:
            check_positive("depth", self.depth, integer=True)
        check_positive("max_depth", self.max_depth, integer=True)
        check_positive("repeats", self.repeats, integer=True)
        _check_int_or_auto("batch_size", self.batch_size, "None (full data)")
        check_positive("rtol", self.rtol)
        check_positive("check_every", self.check_every, integer=True)
        _check_int_or_auto("snapshot_every", self.snapshot_every, "None (no control variate)")
        if not isinstance(self.average, bool):
            raise InputError(f"average must be True or False, got {self.average!r}")
        if self.dense not in (True, False, "auto"):
            raise InputError(f"dense must be True, False or 'auto', got {self.dense!r}")
        if self.sampling not in ("independent", "partition"):
            raise InputError(
                f"sampling must be 'independent' or 'partition', got {self.sampling!r}"
            )
        if self.dense is True and isinstance(self.batch_size, int):
            raise InputError(
                f"dense=True needs full-data steps, but batch_size={self.batch_size}: a dense "
                "matrix is one fixed operator. Use batch_size=None, or dense='auto'/False."
            )

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
        """Resolve the automatic settings (one Lanczos run on :math:`H` when any is automatic,
        plus minibatch estimates for an automatic scale with minibatches)."""
        batch = resolve_batch_size(self.batch_size, operator)
        if batch is not None and not operator.supports_subsample:
            operator.subsample(batch, torch.Generator())  # raises, naming the fix
        auto: AutoDamping | None = None
        if self.damping == "auto":
            auto = auto_damping(operator, seed=self.seed)
            extremes: tuple[float, float] | None = (auto.hessian_max, auto.hessian_min)
            residual = auto.min_residual
        elif self.scale == "auto" or self.depth is None:
            top, bottom, residual = _extremes(operator, AUTO_SCALE_LANCZOS_STEPS, self.seed)
            extremes = (top, bottom)
        else:
            extremes, residual = None, 0.0
        blocks = None
        if batch is not None and self.sampling == "partition":
            blocks = operator.partition(batch, partition_generator(self.seed))
        minibatch_max = None
        if batch is not None and self.scale == "auto":
            minibatch_max = minibatch_top_eigenvalue(operator, batch, seed=self.seed, blocks=blocks)
        scale = None if self.scale == "auto" else float(self.scale)
        return FittedLiSSA(
            self,
            operator,
            scale,
            hessian_extremes=extremes,
            min_residual=residual,
            minibatch_max=minibatch_max,
            batch_size=batch,
            auto_damping=auto,
            blocks=blocks,
        )

    def restore(self, operator: LinearOperator, state: dict[str, Any]) -> FittedLiSSA:
        """:class:`FittedLiSSA` from a saved scale / spectrum estimate (no Lanczos run).

        ``damping`` must be a number (the calculator restores ``damping="auto"`` at the
        damping the saved fit resolved).
        """
        extremes = state.get("hessian_extremes")
        if extremes is not None and (not isinstance(extremes, (list, tuple)) or len(extremes) != 2):
            raise InputError(
                f"the saved LiSSA state's 'hessian_extremes' is {extremes!r}, not a pair: it "
                "was written by another version of infl. Refit the solver and save it again."
            )
        if extremes is None and (self.scale == "auto" or self.depth is None):
            raise InputError(
                "the saved LiSSA state has no 'hessian_extremes' pair, which scale='auto' and "
                "depth=None need: it was written with a fixed scale and depth or by another "
                "version of infl. Refit the solver and save it again."
            )
        top_minibatch = state.get("minibatch_max")
        return FittedLiSSA(
            self,
            operator,
            None if self.scale == "auto" else float(self.scale),
            hessian_extremes=None if extremes is None else (float(extremes[0]), float(extremes[1])),
            min_residual=float(state.get("min_residual", 0.0)),
            minibatch_max=None if top_minibatch is None else float(top_minibatch),
            batch_size=state.get("batch_size"),
        )


def resolve_batch_size(batch_size: int | str | None, operator: LinearOperator) -> int | None:
    """``batch_size="auto"``: ``None`` (full data) for at most 2048 examples or an operator that
    cannot be subsampled, else :data:`AUTO_BATCH_SIZE`; other values pass through."""
    if batch_size != "auto":
        return None if batch_size is None else int(batch_size)
    n = _num_examples(operator)
    if n is None or n <= AUTO_BATCH_MIN_EXAMPLES or not operator.supports_subsample:
        return None
    return min(n, AUTO_BATCH_SIZE)


def _num_examples(operator: LinearOperator) -> int | None:
    """The number of training examples behind ``operator`` (``None`` if it has none)."""
    while isinstance(operator, DampedOperator):
        operator = operator.base
    data = getattr(operator, "data", None)
    return len(data) if isinstance(data, IndexedData) else None


def _extremes(operator: LinearOperator, steps: int, seed: int) -> tuple[float, float, float]:
    """Lanczos :math:`(\\theta_{\\max}, \\theta_{\\min}, r_{\\min})` (residual 0 when exact)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InflWarning)
        res = lanczos(operator, 1, which="both", max_iter=steps, tol=1e-4, seed=seed)
    exact = res.iterations >= operator.size
    residual = 0.0 if exact else float(res.smallest_residuals[0])
    return float(res.largest[0]), float(res.smallest[0]), residual


def partition_generator(seed: int) -> torch.Generator:
    """The generator ``sampling="partition"`` draws its blocks from (see
    :data:`PARTITION_SEED_OFFSET`)."""
    return torch.Generator(device="cpu").manual_seed(seed + PARTITION_SEED_OFFSET)


def minibatch_top_eigenvalue(
    operator: LinearOperator,
    batch_size: int,
    *,
    samples: int = MINIBATCH_SCALE_SAMPLES,
    steps: int = MINIBATCH_LANCZOS_STEPS,
    seed: int = 0,
    blocks: Sequence[LinearOperator] | None = None,
) -> float:
    """:math:`\\max_b \\theta_{\\max}(H_b)` over ``samples`` random minibatch operators.

    Each :math:`H_b` = ``operator.subsample(batch_size, ...)`` (undamped), or with ``blocks``
    (a random partition's, ``sampling="partition"``) the first ``samples`` of those, its top
    eigenvalue estimated by ``steps`` Lanczos steps (a lower bound on it). Cost:
    ``samples * steps`` HVPs of ``batch_size`` examples.
    """
    if blocks is not None:
        subs = list(blocks[:samples])
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed + 7919)
        subs = [operator.subsample(batch_size, gen) for _ in range(samples)]
    return max(estimate_extreme_eigenvalues(sub, max_iter=steps, seed=seed)[0] for sub in subs)


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
        min_residual: float = 0.0,
        minibatch_max: float | None = None,
        batch_size: int | str | None = "solver",
        auto_damping: AutoDamping | None = None,
        dense_base: torch.Tensor | None = None,
        blocks: Sequence[LinearOperator] | None = None,
    ) -> None:
        super().__init__(solver, operator, auto_damping=auto_damping)
        self.solver: LiSSA = solver
        self._dense_base = dense_base  # the undamped [p, p] matrix, once assembled
        self._blocks = blocks  # sampling="partition": the undamped blocks, once drawn
        self.hessian_extremes = hessian_extremes
        self.min_residual = min_residual
        self.minibatch_max = minibatch_max
        self.batch_size = (
            resolve_batch_size(solver.batch_size, operator)
            if batch_size == "solver"
            else resolve_batch_size(batch_size, operator)
        )
        lam = self.damping
        if scale is None:
            if hessian_extremes is None:
                raise InputError("FittedLiSSA needs a scale or the Hessian's extreme eigenvalues")
            top, bottom = (v + lam for v in hessian_extremes)
            if top == 0.0 and bottom == 0.0:
                raise InputError("scale='auto': the operator is zero, nothing to invert")
            if top <= 0.0:
                raise NotPositiveDefiniteError(
                    f"scale='auto': H + damping*I has no positive eigenvalue (largest ~= "
                    f"{top:.4g}, smallest ~= {bottom:.4g}) with damping={lam:g}, "
                    f"so no LiSSA scale converges. Use damping > {lam - bottom:.4g}."
                )
            if minibatch_max is not None:
                # plain steps: sigma above the minibatch top eigenvalue damps their noise; with
                # the control variate (which removes that noise) only stability is needed:
                # every minibatch eigenvalue inside (0, 2 sigma)
                cover = 0.5 if solver.snapshot_every is not None else 1.0
                top = max(top, cover * (minibatch_max + lam))
            scale = SCALE_MARGIN * top
        self.scale = scale
        if solver.dense is True and self.batch_size is not None:
            raise InputError(
                f"dense=True needs full-data steps, but batch_size resolved to {self.batch_size} "
                "minibatch examples: a dense matrix is one fixed operator. Use batch_size=None."
            )
        self.snapshot_every = self._resolve_snapshot_every()
        self.depth_advised: int | None = None
        if solver.depth is not None:
            self.depth = int(solver.depth)
        else:
            self.depth = self._default_depth()

    @property
    def partitioned(self) -> bool:
        """Whether the steps cycle the blocks of a partition (``sampling="partition"`` with
        minibatch steps)."""
        return self.solver.sampling == "partition" and self.batch_size is not None

    def partition_blocks(self) -> list[LinearOperator]:
        """The damped blocks :math:`A_j` that ``sampling="partition"`` cycles (the partition
        is drawn once per fit from ``seed`` and shared with :meth:`with_damping`, with the
        gradient graphs its blocks keep)."""
        if not self.partitioned or self.batch_size is None:
            raise InputError(
                "partition_blocks() needs LiSSA(sampling='partition') with minibatch steps"
            )
        if self._blocks is None:
            draw = partition_generator(self.solver.seed)
            self._blocks = self.base.partition(self.batch_size, draw)
        blocks: Sequence[LinearOperator] = self._blocks
        return [block.damped(self.damping) for block in blocks]

    def _resolve_snapshot_every(self) -> int | None:
        """The control variate's period :math:`m` in steps (``None``: no control variate, as
        with full-data steps, where it would change nothing)."""
        every = self.solver.snapshot_every
        if self.batch_size is None or every is None:
            return None
        if every == "auto":
            n = _num_examples(self.operator) or self.batch_size
            return max(1, math.ceil(AUTO_SNAPSHOT_EPOCHS * n / self.batch_size))
        return int(every)

    def _default_depth(self) -> int:
        """The advised depth for ``rtol`` from the estimates, capped at ``max_depth`` (warned)."""
        cfg = self.solver
        if self.hessian_extremes is None:
            raise InputError(
                "LiSSA(depth=None) chooses the depth from a spectrum estimate that this fitted "
                "solver does not have; refit it (solver.fit(operator)) or give depth explicitly"
            )
        lam = self.damping
        top, bottom = self.hessian_extremes
        mu_max = max(top + lam, (self.minibatch_max or -math.inf) + lam)
        mu_min = bottom - self.min_residual + lam
        if mu_min <= 0:
            mu_min = (bottom + lam) / 2
        if mu_min <= 0:
            raise NotPositiveDefiniteError(
                f"LiSSA(depth=None): Lanczos estimates lambda_min(H + damping*I) ~= "
                f"{bottom + lam:.4g} <= 0 with damping={lam:.4g}, so no depth converges. Use "
                f"damping > {-bottom:.4g}, or damping='auto'."
            )
        need = lissa_depth(mu_min, mu_max, self.scale, cfg.rtol)
        self.depth_advised = need
        if need is None:
            raise SolverDivergedError(
                f"LiSSA(depth=None): with scale={self.scale:.4g} the recursion does not "
                f"converge for the estimated spectrum [{mu_min:.4g}, {mu_max:.4g}] of H + "
                "damping*I (every eigenvalue must lie in (0, 2*scale)); use scale='auto'."
            )
        if need <= cfg.max_depth:
            return need
        per_step = "full-data" if self.batch_size is None else f"{self.batch_size}-example"
        warnings.warn(
            f"LiSSA: reaching rtol={cfg.rtol:g} needs depth ~{need} (estimated spectrum of H + "
            f"damping*I in [{mu_min:.4g}, {mu_max:.4g}], scale={self.scale:.4g}); capped at "
            f"max_depth={cfg.max_depth}. Uncapped it would cost {need * cfg.repeats} {per_step} "
            f"HVPs of k vectors per solve instead of {cfg.max_depth * cfg.repeats}. Raise "
            "max_depth to pay that, add damping (condition number ~ scale/lambda_min), or use "
            "ConjugateGradient (about sqrt of the condition number iterations).",
            InflWarning,
            stacklevel=4,
        )
        return int(cfg.max_depth)

    @property
    def info(self) -> dict[str, Any]:
        cfg = self.solver
        facts = {**super().info, "scale": self.scale, "scale_auto": cfg.scale == "auto"}
        facts.update(
            depth=self.depth,
            depth_auto=cfg.depth is None,
            depth_advised=self.depth_advised,
            batch_size=self.batch_size,
            batch_size_auto=cfg.batch_size == "auto",
            minibatch_max_eigenvalue=self.minibatch_max,
            snapshot_every=self.snapshot_every,
            average=cfg.average and self.batch_size is not None,
            sampling=cfg.sampling if self.batch_size is not None else None,
        )
        if self.partitioned and self._blocks is not None:
            facts["blocks"] = len(self._blocks)
        if self.hessian_extremes is not None:
            facts["lanczos_max_eigenvalue"], facts["lanczos_min_eigenvalue"] = self.hessian_extremes
            facts["lanczos_min_residual"] = self.min_residual
        return facts

    def state(self) -> dict[str, Any]:
        """The scale, the Lanczos spectrum estimates of H (automatic scale, depth or damping),
        and the resolved minibatch size."""
        extremes = None if self.hessian_extremes is None else list(self.hessian_extremes)
        return {
            "scale": self.scale,
            "hessian_extremes": extremes,
            "min_residual": self.min_residual,
            "minibatch_max": self.minibatch_max,
            "batch_size": self.batch_size,
        }

    def with_damping(self, damping: float) -> FittedLiSSA:
        """Another :math:`\\lambda`; an automatic scale moves with it, with no new Lanczos run."""
        check_damping(damping)
        solver = replace(self.solver, damping=float(damping))
        return FittedLiSSA(
            solver,
            self.base,
            None if self.solver.scale == "auto" else self.scale,
            hessian_extremes=self.hessian_extremes,
            min_residual=self.min_residual,
            minibatch_max=self.minibatch_max,
            batch_size=self.batch_size,
            dense_base=self._dense_base,
            blocks=self._blocks,
        )

    def uses_dense(self, k: int) -> bool:
        """Whether a solve of ``k`` right-hand sides runs the recursion on the dense matrix.

        ``dense="auto"``: with full-data steps, when :math:`p^2` numbers fit
        :data:`DENSE_MAX_BYTES` and assembling the matrix (``p`` products) costs fewer products
        than the recursion would (``depth * k``), or the matrix is already assembled.
        """
        mode = self.solver.dense
        if self.batch_size is not None or mode is False:
            return False
        if mode is True or self._dense_base is not None:
            return True
        p = self.operator.size
        itemsize = torch.empty(0, dtype=self.operator.dtype).element_size()
        return p * p * itemsize <= DENSE_MAX_BYTES and p < self.depth * k

    def dense_matrix(self) -> torch.Tensor:
        """:math:`H + \\lambda I` as a ``[p, p]`` matrix (``p`` products once per fit, shared with
        :meth:`with_damping`)."""
        if self._dense_base is None:
            self._dense_base = self.base.to_dense()
        base = self._dense_base
        eye = torch.eye(self.operator.size, dtype=base.dtype, device=base.device)
        return base + self.damping * eye

    def solve(self, rhs: torch.Tensor, *, progress: bool = False) -> SolveResult:
        """Run the recursion on all ``k`` right-hand sides at once (``[k, p]``).

        Steps run in windows of ``check_every``; the increments' norms stay on the device and
        are read once per window (one host synchronisation), so divergence and early stopping
        are decided per window with the per-step guarantees of :class:`LiSSA`.
        """
        cfg = self.solver
        b = as_rhs(rhs, self.operator)
        bnorm = torch.linalg.vector_norm(b, dim=1).clamp_min(torch.finfo(b.dtype).tiny)
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        dense = self.dense_matrix() if self.uses_dense(b.shape[0]) else None
        deterministic = self.batch_size is None
        runs = 1 if deterministic else cfg.repeats  # full-data repeats are identical
        total = torch.zeros_like(b)
        history: list[torch.Tensor] = []
        bar = tqdm(total=self.depth * runs, desc="LiSSA", disable=not progress, leave=False)
        try:
            for repeat in range(runs):
                total += run_recursion(self, b, bnorm, repeat, generator, dense, history, bar)
        finally:
            bar.close()
        value = total / (runs * self.scale)
        if not torch.isfinite(value).all():
            raise NonFiniteError("LiSSA produced a non-finite estimate")
        if dense is not None:
            residuals = relative_residuals(DenseOperator(dense), value, b)
        elif self.partitioned:  # the blocks' mean is the operator, from their kept state
            residuals = relative_residuals(MeanOperator(self.partition_blocks()), value, b)
        else:
            residuals = relative_residuals(self.operator, value, b)
        converged = bool((residuals <= cfg.rtol).all())
        trace = torch.cat(history) if history else b.new_empty(0, b.shape[0])
        if not converged:
            advice = depth_text(self, dense, trace.shape[0])
            warnings.warn(
                f"LiSSA finished depth={self.depth} with relative residual up to "
                f"{float(residuals.max()):.3g} > rtol={cfg.rtol:g}. The error shrinks like "
                f"(1 - lambda_min/scale)^depth: increase depth, add damping, or (for stochastic "
                f"runs) increase batch_size or repeats{noise_text(self)}. {advice}".rstrip(),
                InflWarning,
                stacklevel=2,
            )
        return SolveResult(
            value=value,
            converged=converged,
            iterations=trace.shape[0],
            residual_norms=residuals,
            trace=trace,
            info={**self.info, "dense_matrix": dense is not None, "repeats_run": runs},
        )
