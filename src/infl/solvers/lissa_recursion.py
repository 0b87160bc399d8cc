"""The LiSSA recursion engine and its failure messages, used by :meth:`FittedLiSSA.solve`.

:func:`run_recursion` runs one repeat of :math:`x_{t+1} = b + x_t - \\tilde A_t x_t/\\sigma`
on ``[k, p]`` right-hand sides: windowed divergence checks (:func:`check_window`, one host
synchronisation per window), the dense path, the control variate (snapshot anchors), tail
averaging and the epochs of ``sampling="partition"`` (:class:`EpochCycle`). The other
functions build the messages of a divergence (:func:`divergence_error`) or of an unconverged
run (:func:`depth_text`, :func:`noise_text`) from the spectrum estimates
(:func:`spectrum_advice`, :func:`fitted_advice`). Each takes the
:class:`~infl.solvers.lissa.FittedLiSSA` whose settings it reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from infl.errors import InflError, NonFiniteError, SolverDivergedError
from infl.operators import DenseOperator, LinearOperator
from infl.spectral import (
    SolverAdvice,
    advice_from_extremes,
    estimate_extreme_eigenvalues,
    lissa_depth,
)

if TYPE_CHECKING:
    from infl.solvers.lissa import FittedLiSSA

DIVERGENCE_FACTOR = 100.0
"""An increment larger than this multiple of ``||b||`` counts as divergence: in a convergent
full-batch run the increments never exceed ``||b||``."""


def spectrum_advice(fitted: FittedLiSSA, dense: torch.Tensor | None = None) -> SolverAdvice | None:
    """Spectrum-based advice for ``fitted``'s operator, or None if unavailable.

    Lanczos (50 steps) on ``dense`` when given (no HVP), else on the operator (about 50
    HVPs).
    """
    target = fitted.operator if dense is None else DenseOperator(dense)
    try:
        top, bottom = estimate_extreme_eigenvalues(target, max_iter=50, seed=fitted.solver.seed)
    except InflError:
        return None
    lam = fitted.damping
    return advice_from_extremes(top - lam, bottom - lam, damping=lam, tol=fitted.solver.rtol)


def fitted_advice(
    fitted: FittedLiSSA, dense: torch.Tensor | None, steps: int
) -> SolverAdvice | None:
    """Advice from what the fit already knows (the dense matrix or its Lanczos estimates).

    Without either, a new Lanczos run (50 HVPs) only after at least 500 full-data steps, so
    that the message costs at most a tenth of the run; none after minibatch steps.
    """
    if dense is None and fitted.hessian_extremes is not None:
        top, bottom = fitted.hessian_extremes
        return advice_from_extremes(
            top, bottom - fitted.min_residual, damping=fitted.damping, tol=fitted.solver.rtol
        )
    if dense is None and (fitted.batch_size is not None or steps < 500):
        return None
    return spectrum_advice(fitted, dense)


def divergence_error(
    fitted: FittedLiSSA, step: int, repeat: int, increment: float
) -> SolverDivergedError:
    """The error for a divergence at ``step`` of ``repeat`` (``increment``: the largest relative
    increment of that step, ``inf``/``nan`` when non-finite), naming its cause and a fix; costs
    one Lanczos run (about 50 HVPs) for the advice."""
    what = (
        "a non-finite iterate"
        if not math.isfinite(increment)
        else (f"an increment of norm {increment:.3g} x ||b||")
    )
    head = (
        f"LiSSA diverged at step {step} of repeat {repeat} ({what}) with scale={fitted.scale:.4g}"
    )
    advice = spectrum_advice(fitted)
    if advice is None:
        return SolverDivergedError(
            f"{head}: the recursion converges only when every eigenvalue of H + damping*I "
            "lies in (0, 2*scale). Increase scale above the top eigenvalue (or use "
            "scale='auto'); if it still diverges, increase damping."
        )
    top, bottom = advice.mu_max, advice.mu_min
    if top > 0 and fitted.scale <= top / 2:
        cause = (
            f"scale is below lambda_max(H + damping*I)/2 ~= {top / 2:.4g} (the recursion "
            "converges only when every eigenvalue lies in (0, 2*scale)): increase `scale` "
            f"above the top eigenvalue ~= {top:.4g}: use scale >= {advice.scale:.4g} (or "
            "scale='auto')."
        )
    elif bottom <= 0:
        cause = (
            f"H + damping*I has an eigenvalue ~= {bottom:.4g} <= 0 (Lanczos), so no scale "
            f"converges: increase damping above {advice.min_damping:.4g} (for example "
            f"damping={advice.suggested_damping:.3g})."
        )
    else:
        cause = (
            "the recursion converges only when every eigenvalue of H + damping*I lies in "
            f"(0, 2*scale); Lanczos estimates [{bottom:.4g}, {top:.4g}]. Use scale >= "
            f"{advice.scale:.4g} (or scale='auto'); if it still diverges, a negative "
            "eigenvalue was missed: increase damping."
        )
    return SolverDivergedError(f"{head}: {cause} Advice: {advice.summary()}")


def depth_text(fitted: FittedLiSSA, dense: torch.Tensor | None, steps: int) -> str:
    """The depth this scale needs for rtol, from Lanczos estimates (or how to get it)."""
    advice = fitted_advice(fitted, dense, steps)
    if advice is None:
        return (
            "LiSSA(scale='auto') or LiSSA(depth=None) estimate the spectrum at fit time and "
            "name the depth needed."
        )
    if not advice.positive_definite:
        return (
            f"Lanczos finds an eigenvalue of H + damping*I ~= {advice.mu_min:.4g} <= 0: use "
            f"damping > {advice.min_damping:.4g} (e.g. {advice.suggested_damping:.3g})."
        )
    need = lissa_depth(advice.mu_min, advice.mu_max, fitted.scale, fitted.solver.rtol)
    if need is None:
        return f"Advice: {advice.summary()}"
    return (
        f"With scale={fitted.scale:.4g} and Lanczos estimates lambda in "
        f"[{advice.mu_min:.4g}, {advice.mu_max:.4g}], full-batch LiSSA needs depth >= "
        f"{need} for rtol={fitted.solver.rtol:g} (an underestimate if lambda_min is smaller)."
    )


def noise_text(fitted: FittedLiSSA) -> str:
    """The options that remove plain minibatch noise, when a run does not use them."""
    if fitted.batch_size is None or fitted.snapshot_every is not None:
        return ""
    # averaging leaves the bias of cycled steps (sampling="partition"), so only the control
    # variate is named for them
    free = fitted.solver.average or fitted.partitioned
    return (
        ", or use snapshot_every='auto' (a control variate that converges to the exact "
        "answer)" + ("" if free else " or average=True (free)")
    )


class EpochCycle:
    """The blocks of a partition, visited once per epoch each, in a fresh random order per
    epoch (drawn from ``generator``): ``sampling="partition"``'s minibatch stream."""

    def __init__(self, blocks: Sequence[LinearOperator], generator: torch.Generator) -> None:
        self.blocks = blocks
        self.generator = generator
        self.order: list[int] = []  # the rest of the current epoch, next block last

    def take(self, count: int) -> list[LinearOperator]:
        """The operators of the next ``count`` steps."""
        out = []
        for _ in range(count):
            if not self.order:
                self.order = torch.randperm(len(self.blocks), generator=self.generator).tolist()
            out.append(self.blocks[self.order.pop()])
        return out


def step_products(
    fitted: FittedLiSSA,
    count: int,
    generator: torch.Generator,
    dense: torch.Tensor | None,
    cycle: EpochCycle | None = None,
) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The operator of each of the next ``count`` steps, as ``[k, p] -> [k, p]`` maps."""
    if dense is not None:
        return [dense.__rmatmul__] * count  # x @ A = (A x^T)^T: A is symmetric
    if fitted.batch_size is None:
        return [fitted.operator.matmat] * count
    if cycle is not None:
        return [block.matmat for block in cycle.take(count)]
    subs = fitted.operator.subsample_many(fitted.batch_size, count, generator)
    return [sub.matmat for sub in subs]


def run_recursion(
    fitted: FittedLiSSA,
    b: torch.Tensor,
    bnorm: torch.Tensor,
    repeat: int,
    generator: torch.Generator,
    dense: torch.Tensor | None,
    history: list[torch.Tensor],
    bar: Any,
) -> torch.Tensor:
    """One repeat: :math:`x_T` (``[k, p]``, not yet divided by :math:`\\sigma`).

    Appends each window's relative increments ``[width, k]`` to ``history`` and advances
    ``bar``; ``dense`` (the ``[p, p]`` matrix of :math:`A`) replaces the matrix-free products
    when given. Raises :class:`~infl.errors.SolverDivergedError` via :func:`check_window`.
    """
    cfg = fitted.solver
    period = fitted.snapshot_every
    x = b.clone()
    norms = b.new_empty(cfg.check_every, b.shape[0])
    anchor = anchor_product = None
    averaging = cfg.average and fitted.batch_size is not None
    tail = torch.zeros_like(b) if averaging else None  # sum of x_t over t > depth // 2
    cycle = EpochCycle(fitted.partition_blocks(), generator) if fitted.partitioned else None
    done = 0
    while done < fitted.depth:
        width = min(cfg.check_every, fitted.depth - done)
        if period is not None:
            if done % period == 0:
                anchor, anchor_product = x.clone(), fitted.operator.matmat(x)
                exact = torch.sub(b, anchor_product, alpha=1.0 / fitted.scale)
                if bool((torch.linalg.vector_norm(exact, dim=1) <= cfg.rtol * bnorm).all()):
                    return x  # the anchor's exact residual meets rtol: return it
            width = min(width, period - done % period)
        products = step_products(fitted, width, generator, dense, cycle)
        filled = 0
        try:
            for product in products:
                if anchor is None or anchor_product is None:
                    ax = product(x)
                else:  # the control variate: A_t (x - anchor) + A anchor
                    ax = product(x - anchor) + anchor_product
                increment = torch.sub(b, ax, alpha=1.0 / fitted.scale)
                x += increment
                norms[filled] = torch.linalg.vector_norm(increment, dim=1)
                filled += 1
                if tail is not None and done + filled > fitted.depth // 2:
                    tail += x
        except NonFiniteError:
            # the model's product overflowed: report the divergence that led there, if any
            check_window(fitted, (norms[:filled] / bnorm).cpu(), done, repeat)
            raise
        rel = (norms[:filled] / bnorm).cpu()  # the one host synchronisation per window
        history.append(rel)
        bar.update(filled)
        check_window(fitted, rel, done, repeat)
        done += filled
        if fitted.batch_size is None and bool((rel.amax(dim=1) <= cfg.rtol).any()):
            break  # the residual (= the increment) only falls from here on
    if tail is not None:
        return tail / (fitted.depth - fitted.depth // 2)
    return x


def check_window(fitted: FittedLiSSA, rel: torch.Tensor, done: int, repeat: int) -> None:
    """Raise for the first step of the window whose increment is non-finite or too large."""
    worst = rel.amax(dim=1) if rel.numel() else rel.new_empty(0)
    bad = ~torch.isfinite(worst) | (worst > DIVERGENCE_FACTOR)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise divergence_error(fitted, done + first + 1, repeat, float(worst[first]))
