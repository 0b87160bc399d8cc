"""How the predictive power of influence functions fades with training time.

Schioppa, Filippova, Titov & Zablotskaia (*Theoretical and Practical Perspectives on what
Influence Functions Do*, NeurIPS 2023) show that influence functions predict the effect of a
removal on a *finite* training run less and less well as the run gets longer, even when
training is deterministic: the runs with and without the example drift apart in parameter
space ("parameter divergence") faster than the local quadratic model that influence functions
rely on can follow. :func:`influence_fading` measures this on the user's model.

Protocol
--------
Starting from the trained parameters :math:`\\theta^*` (warm start), :func:`influence_fading`
trains

* one *control run* :math:`\\theta_c(t)` on all :math:`n` examples, and
* one *removal run* :math:`\\theta_{-R}(t)` per removal :math:`R` (a training index or a group),

with the same optimizer, the same seed and the same data order: every run visits the same
minibatches in the same order; the removal run gives the removed examples weight 0 and the
others weight :math:`n/(n-|R|)`, so its minibatch gradient is an unbiased estimate of
:math:`\\nabla J_{-R}` and, full batch, equals it exactly. Each run records the measurement and
the parameters at every horizon :math:`T` (one run per removal, never restarted per horizon).
At each :math:`T`,

.. math::

    \\Delta_{jR}(T) = f(z_j;\\theta_{-R}(T)) - f(z_j;\\theta_c(T)),
    \\qquad
    d_R(T) = \\|\\theta_{-R}(T) - \\theta_c(T)\\|_2,

are compared with the predicted removal effect of :meth:`infl.InfluenceCalculator.removal_effect`
at :math:`\\theta^*` (summed over the members of a group), :math:`\\hat\\Delta_{jR} =
-\\sum_{i\\in R}\\mathcal I(z_j, z_i)/n`, by Pearson and Spearman correlation over all
:math:`(j, R)` pairs.

What "no fading" means
----------------------
For a strongly convex objective trained to its minimum and full-batch gradient descent with a
step :math:`\\eta < 2/\\lambda_{max}(H)`, the control run stays at :math:`\\theta^*` and the
removal run converges to :math:`\\theta_{-R}`: to first order
:math:`\\theta_{-R}(T) - \\theta^* = (I - (I-\\eta H)^T)\\,(\\theta_{-R} - \\theta^*)`. At short
horizons the actual effect is only a fraction of the predicted one (and mixes the directions of
:math:`H` unevenly), so the correlation may be below 1 while :math:`T\\eta\\lambda_{min}(H)` is
small; once the run has converged it stays at the influence prediction, up to second order,
however long training continues. That plateau is the convex control case. A non-convex model
instead keeps diverging: :math:`d_R(T)` grows and the correlation decays.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from infl.calculator import InfluenceCalculator
from infl.data import IndexedData, as_indexed
from infl.errors import InputError, NonFiniteError
from infl.metrics import pearson, spearman
from infl.model import ModelWrapper
from infl.objective import Objective, PerExampleFn, loss_measurement
from infl.retrain import normalize_removals
from infl.retrain.batched import BatchedSGD
from infl.solvers import ExactHessian, Solver

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["FadingResult", "influence_fading", "plot_fading"]


@dataclass(frozen=True)
class FadingResult:
    """Result of :func:`influence_fading` (``H`` horizons, ``m`` test examples, ``k`` removals).

    Attributes
    ----------
    horizons : tuple of int
        The training horizons :math:`T_1 < \\dots < T_H` (optimizer steps after
        :math:`\\theta^*`).
    removals : tuple of tuple of int
        The ``k`` removals, each a sorted tuple of training indices.
    predicted : Tensor ``[m, k]``
        :math:`\\hat\\Delta_{jR}`, the predicted change of test measurement ``j`` when ``R`` is
        removed (units of :meth:`~infl.InfluenceCalculator.removal_effect`).
    actual : Tensor ``[H, m, k]``
        :math:`\\Delta_{jR}(T) = f(z_j;\\theta_{-R}(T)) - f(z_j;\\theta_c(T))`.
    divergence : Tensor ``[H, k]``
        :math:`d_R(T) = \\|\\theta_{-R}(T) - \\theta_c(T)\\|_2` over the trainable parameters.
    control_drift : Tensor ``[H]``
        :math:`\\|\\theta_c(T) - \\theta^*\\|_2`: how far training alone moves the model (near 0
        when :math:`\\theta^*` is a converged minimum and training is full batch).
    pearson, spearman : tuple of float
        Correlation of ``predicted`` and ``actual[h]`` over all ``m * k`` pairs, per horizon
        (NaN where ``actual[h]`` is constant).
    scale : tuple of float
        Least-squares slope through the origin of actual on predicted,
        :math:`\\sum \\Delta\\hat\\Delta / \\sum\\hat\\Delta^2`, per horizon: 1 when the actual
        effects have the predicted size, near 0 when the removal runs have barely moved.
    lr, batch_size, momentum, seed
        The training protocol used.
    """

    horizons: tuple[int, ...]
    removals: tuple[tuple[int, ...], ...]
    predicted: torch.Tensor
    actual: torch.Tensor
    divergence: torch.Tensor
    control_drift: torch.Tensor
    pearson: tuple[float, ...]
    spearman: tuple[float, ...]
    scale: tuple[float, ...]
    lr: float
    batch_size: int | None
    momentum: float
    seed: int

    @property
    def mean_divergence(self) -> torch.Tensor:
        """:math:`\\text{mean}_R\\, d_R(T)` per horizon: ``[H]``."""
        return self.divergence.mean(dim=1)

    @property
    def max_divergence(self) -> torch.Tensor:
        """:math:`\\max_R d_R(T)` per horizon: ``[H]``."""
        return self.divergence.max(dim=1).values

    def to_rows(self) -> list[dict[str, float | int]]:
        """One row per horizon: ``horizon``, ``pearson``, ``spearman``, ``scale``,
        ``mean_divergence``, ``max_divergence``, ``control_drift``."""
        mean_d, max_d = self.mean_divergence, self.max_divergence
        return [
            {
                "horizon": t,
                "pearson": self.pearson[h],
                "spearman": self.spearman[h],
                "scale": self.scale[h],
                "mean_divergence": float(mean_d[h]),
                "max_divergence": float(max_d[h]),
                "control_drift": float(self.control_drift[h]),
            }
            for h, t in enumerate(self.horizons)
        ]

    def table(self) -> str:
        """The rows of :meth:`to_rows` as a fixed-width text table."""
        head = (
            f"{'T':>8} {'pearson':>8} {'spearman':>8} {'scale':>8} "
            f"{'mean ‖Δθ‖':>10} {'max ‖Δθ‖':>10} {'drift':>10}"
        )
        lines = [head]
        for r in self.to_rows():
            lines.append(
                f"{r['horizon']:>8d} {r['pearson']:>8.3f} {r['spearman']:>8.3f} "
                f"{r['scale']:>8.3f} {r['mean_divergence']:>10.3e} "
                f"{r['max_divergence']:>10.3e} {r['control_drift']:>10.3e}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _check_horizons(horizons: Sequence[int]) -> tuple[int, ...]:
    hs = list(horizons)
    if not hs:
        raise InputError("horizons is empty: give at least one number of training steps")
    for h in hs:
        if isinstance(h, bool) or int(h) != h or h < 1:
            raise InputError(f"horizons must be positive integers (steps), got {h!r}")
    out = tuple(int(h) for h in hs)
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise InputError(f"horizons must be strictly increasing, got {list(out)}")
    return out


def _predicted_effects(
    predicted: torch.Tensor | InfluenceCalculator | Solver | None,
    model: nn.Module,
    objective: Objective,
    train: IndexedData,
    test: IndexedData,
    removals: list[tuple[int, ...]],
    measurement: PerExampleFn,
    progress: bool,
) -> torch.Tensor:
    m, k = len(test), len(removals)
    if isinstance(predicted, torch.Tensor):
        if tuple(predicted.shape) != (m, k):
            raise InputError(
                f"predicted has shape {tuple(predicted.shape)}; expected [m={m}, k={k}] "
                "(one predicted removal effect per test example and removal)"
            )
        return predicted.detach().cpu().to(torch.float64)
    if isinstance(predicted, InfluenceCalculator):
        calc = predicted
        if len(calc.train) != len(train):
            raise InputError(
                f"the calculator was built on {len(calc.train)} training examples but "
                f"train_data has {len(train)}; pass the same training data"
            )
    elif predicted is None or isinstance(predicted, Solver):
        solver = ExactHessian(pseudo_inverse=True) if predicted is None else predicted
        calc = InfluenceCalculator(
            model, objective, train, solver, measurement=measurement, progress=progress
        )
    else:
        raise InputError(
            "predicted must be None, an infl solver, an InfluenceCalculator or a [m, k] tensor "
            f"of predicted removal effects; got {type(predicted).__name__}"
        )
    effects = calc.removal_effect(test).detach().cpu().to(torch.float64)  # [m, n]
    cols = [effects[:, list(r)].sum(dim=1) for r in removals]
    return torch.stack(cols, dim=1)


def influence_fading(
    model: nn.Module,
    objective: Objective,
    train_data: Any,
    test_data: Any,
    removals: Any,
    horizons: Sequence[int] = (10, 100, 1000, 10000),
    *,
    predicted: torch.Tensor | InfluenceCalculator | Solver | None = None,
    measurement: PerExampleFn | None = None,
    lr: float = 0.1,
    batch_size: int | None = None,
    momentum: float = 0.0,
    seed: int = 0,
    parallel_runs: int = 16,
    chunk_size: int = 1024,
    progress: bool = True,
) -> FadingResult:
    """Correlation of predicted and actual removal effects as training goes on.

    Trains a control run and one run per removal from :math:`\\theta^*` for
    :math:`\\max T` steps (see the module docstring for the protocol), recording at every
    horizon :math:`T` the actual effect :math:`\\Delta_{jR}(T) = f(z_j;\\theta_{-R}(T)) -
    f(z_j;\\theta_c(T))` and the parameter divergence :math:`\\|\\theta_{-R}(T) -
    \\theta_c(T)\\|_2`, and correlates the actual effects with the influence prediction
    :math:`\\hat\\Delta_{jR} = -\\sum_{i\\in R}\\mathcal I(z_j,z_i)/n` made at :math:`\\theta^*`.

    Parameters
    ----------
    model
        The trained module :math:`\\theta^*`, in eval mode. It is not modified (the runs
        work on copies of its parameters).
    objective
        The training objective :math:`J` (loss and ``weight_decay``) the runs minimise.
    train_data
        The ``n`` training examples (tensors, a ``Dataset`` or a non-shuffling
        ``DataLoader``).
    test_data
        The ``m`` test examples whose measurement is explained.
    removals
        Training indices (each removed alone) or groups of indices (removed together), as
        accepted by :func:`infl.retrain.normalize_removals`; ``k`` removals.
    horizons
        Strictly increasing step counts :math:`T_1<\\dots<T_H` at which to compare.
    predicted
        Where the predicted effects come from: ``None`` (an exact, pseudo-inverted Hessian
        :class:`~infl.ExactHessian` ``(pseudo_inverse=True)``; needs ``p`` up to 20,000), an
        infl solver, an :class:`~infl.InfluenceCalculator` built with the same measurement,
        or a precomputed ``[m, k]`` tensor in the units of ``removal_effect``.
    measurement
        :math:`f`, ``(model, batch) -> Tensor[b]``; default: the objective's loss (with a
        calculator and no ``measurement``, the calculator's).
    lr
        Learning rate :math:`\\eta` of SGD. For a convex model and full batch, keep it below
        :math:`2/\\lambda_{max}(H)`.
    batch_size
        ``None`` for full-batch gradient descent, else the minibatch size (epochs of a
        permutation of all ``n`` indices drawn from ``seed``; identical for every run).
    momentum
        SGD (heavy-ball) momentum :math:`\\mu`: :math:`b \\leftarrow \\mu b + g`,
        :math:`\\theta \\leftarrow \\theta - \\eta b`.
    seed
        Seeds the minibatch order.
    parallel_runs
        How many removal runs are trained together (on the batched engine of
        :mod:`infl.retrain.batched`: ``vmap`` over stacked parameters; each
        group also carries its own control run, so that every removal run is compared with
        a control computed by exactly the same arithmetic). Memory grows with it.
    chunk_size
        Examples per vmapped chunk for full-batch gradients and measurements.
    progress
        Show a tqdm progress bar over training steps.

    Returns
    -------
    FadingResult

    Notes
    -----
    Cost: :math:`\\lceil k/\\text{parallel\\_runs}\\rceil \\cdot \\max T` vmapped steps of
    ``parallel_runs + 1`` runs each, plus one influence computation.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from infl import Objective
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> X, y = torch.randn(30, 2, dtype=torch.float64), torch.randint(0, 2, (30,))
    >>> net = nn.Linear(2, 2).double()
    >>> res = influence_fading(net, Objective("cross_entropy", 0.1), (X, y), (X[:3], y[:3]),
    ...                        [0, 1, 2], horizons=(5, 20), progress=False)
    >>> res.actual.shape, len(res.to_rows())
    (torch.Size([2, 3, 3]), 2)
    """
    hs = _check_horizons(horizons)
    lr = float(lr)
    if not math.isfinite(lr) or lr <= 0:
        raise InputError(f"lr must be a finite number > 0, got {lr}")
    if not 0 <= momentum < 1:
        raise InputError(f"momentum must be in [0, 1), got {momentum}")
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise InputError(f"batch_size must be None or a positive integer, got {batch_size}")
    if parallel_runs < 1 or chunk_size < 1:
        raise InputError(
            f"parallel_runs and chunk_size must be positive, got {parallel_runs}, {chunk_size}"
        )
    train = as_indexed(train_data, "training data")
    test = as_indexed(test_data, "test data")
    n = len(train)
    rem = normalize_removals(removals, n)
    if measurement is None:
        measurement = (
            predicted.measurement
            if isinstance(predicted, InfluenceCalculator)
            else loss_measurement(objective)
        )
    wrapper = ModelWrapper(model, objective)  # validates the model (eval mode, finite, ...)
    pred = _predicted_effects(predicted, model, objective, train, test, rem, measurement, progress)

    # one shared minibatch schedule for every run
    total = hs[-1]
    schedule: list[torch.Tensor | None]
    if batch_size is None:
        schedule = [None] * total
    else:
        gen = torch.Generator().manual_seed(seed)
        bs = min(int(batch_size), n)
        schedule = []
        while len(schedule) < total:
            perm = torch.randperm(n, generator=gen)
            schedule.extend(perm[s : s + bs] for s in range(0, n, bs))
        schedule = schedule[:total]

    k, m, nh = len(rem), len(test), len(hs)
    actual = torch.empty(nh, m, k, dtype=torch.float64)
    divergence = torch.empty(nh, k, dtype=torch.float64)
    control_drift = torch.empty(nh, dtype=torch.float64)
    groups = [list(range(s, min(s + parallel_runs, k))) for s in range(0, k, parallel_runs)]
    bar = tqdm(total=total * len(groups), desc="fading runs", disable=not progress, leave=False)
    theta_star = wrapper.flat_params
    runs = BatchedSGD(
        model,
        objective.per_example_loss,
        wrapper.decays,
        train,
        lr=lr,
        momentum=momentum,
        chunk_size=chunk_size,
    )
    for gi, group in enumerate(groups):
        weights = torch.ones(len(group) + 1, n, dtype=wrapper.dtype, device=wrapper.device)
        for row, r in enumerate(group, start=1):
            idx = list(rem[r])
            weights[row] *= n / (n - len(idx))
            weights[row, idx] = 0.0
        runs.begin(weights)
        h = 0
        for step in range(1, total + 1):
            runs.step(runs.gradient_only(schedule[step - 1]))
            bar.update(1)
            if step % 256 == 0 and step != hs[h] and not torch.isfinite(runs.theta).all():
                raise NonFiniteError(
                    f"training diverged before step {step} (non-finite parameters); lower lr "
                    f"(now {lr:g}; for full batch keep it below 2/lambda_max(H))"
                )
            if step != hs[h]:
                continue
            theta = runs.theta
            if not torch.isfinite(theta).all():
                raise NonFiniteError(
                    f"training diverged before step {step} (non-finite parameters); lower lr "
                    f"(now {lr:g}; for full batch keep it below 2/lambda_max(H))"
                )
            values = runs.measure(measurement, test).detach().to(torch.float64).cpu()  # [R, m]
            actual[h][:, group] = (values[1:] - values[0]).T
            diff = (theta[1:] - theta[0]).to(torch.float64)
            divergence[h, group] = torch.linalg.vector_norm(diff, dim=1).cpu()
            if gi == 0:
                control_drift[h] = float(
                    torch.linalg.vector_norm((theta[0] - theta_star).to(torch.float64))
                )
            h += 1
    bar.close()

    pear, spear, scale = [], [], []
    denom = float((pred**2).sum())
    for h in range(nh):
        a = actual[h]
        constant = bool((a == a.reshape(-1)[0]).all()) or bool((pred == pred.reshape(-1)[0]).all())
        pear.append(math.nan if constant else pearson(pred, a))
        spear.append(math.nan if constant else spearman(pred, a))
        scale.append(float((a * pred).sum()) / denom if denom > 0 else math.nan)
    return FadingResult(
        horizons=hs,
        removals=tuple(rem),
        predicted=pred,
        actual=actual,
        divergence=divergence,
        control_drift=control_drift,
        pearson=tuple(pear),
        spearman=tuple(spear),
        scale=tuple(scale),
        lr=lr,
        batch_size=None if batch_size is None else int(batch_size),
        momentum=float(momentum),
        seed=int(seed),
    )


def plot_fading(result: FadingResult, *, title: str | None = None) -> Figure:
    """The fading curve: correlation and parameter divergence against the horizon.

    Left panel: Pearson and Spearman correlation of predicted and actual removal effects
    against :math:`T` (log axis). Right panel: mean and max :math:`\\|\\theta_{-R}(T) -
    \\theta_c(T)\\|_2` (log-log), with the control drift :math:`\\|\\theta_c(T)-\\theta^*\\|`.

    Returns a ``matplotlib.figure.Figure`` (not shown, not saved; call ``fig.savefig``).

    Raises
    ------
    infl.plotting.PlottingUnavailableError
        (an ``ImportError``) if matplotlib is not installed (``pip install 'infl[plot]'``).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        from infl.plotting import PlottingUnavailableError

        raise PlottingUnavailableError(
            "plot_fading needs matplotlib, which is not installed: pip install 'infl[plot]'"
        ) from err
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax_c, ax_d = fig.subplots(1, 2)
    t = list(result.horizons)
    ax_c.plot(t, result.pearson, "o-", label="Pearson")
    ax_c.plot(t, result.spearman, "s--", label="Spearman")
    ax_c.set_xscale("log")
    ax_c.set_xlabel("training steps after θ* (T)")
    ax_c.set_ylabel("corr(predicted, actual)")
    ax_c.set_ylim(min(-0.05, *(v for v in result.spearman + result.pearson if v == v)), 1.02)
    ax_c.axhline(0.0, color="0.7", lw=0.8)
    ax_c.legend()
    ax_d.plot(t, result.mean_divergence.tolist(), "o-", label="mean ‖θ₋(T) − θ(T)‖")
    ax_d.plot(t, result.max_divergence.tolist(), "^:", label="max ‖θ₋(T) − θ(T)‖")
    ax_d.plot(t, result.control_drift.tolist(), "x--", color="0.5", label="‖θ(T) − θ*‖")
    ax_d.set_xscale("log")
    if all(v > 0 for v in result.max_divergence.tolist()):
        ax_d.set_yscale("log")
    ax_d.set_xlabel("training steps after θ* (T)")
    ax_d.set_ylabel("parameter divergence")
    ax_d.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig
