"""Retraining ground truth: what actually happens to a test measurement when data is removed.

For a trained model :math:`\\theta^*` of the objective

.. math::

    J(\\theta) = \\frac1n\\sum_{i=1}^n \\ell(z_i;\\theta) + \\frac{\\lambda_{wd}}2\\|\\theta\\|^2

and a *removal* :math:`R` (one index for leave-one-out, or a group of indices),
:func:`retrain_ground_truth` retrains on the other :math:`n-|R|` examples with the same
:math:`\\lambda_{wd}`, giving :math:`\\theta_{-R}`, and reports the *actual* change of every test
measurement,

.. math::

    \\Delta_{jR} = f(z_j;\\theta_{-R}) - f(z_j;\\theta^*),

in the units of :meth:`infl.InfluenceCalculator.removal_effect` (a positive value means that
removing :math:`R` increases :math:`f(z_j)`).

The *control run* retrains with nothing removed, under the same protocol, giving
:math:`\\theta_c`. When :math:`\\theta^*` is not a converged minimum, continued training moves
the test measurement on its own (Basu et al. 2021, §5.4), so the result also reports the
control-corrected change :math:`f(z_j;\\theta_{-R}) - f(z_j;\\theta_c)`.

This module orchestrates the package: it validates the inputs, loads finished retrains from
the store (:class:`infl.store.Store`), and runs the rest one by one through :mod:`torch.optim`
(:mod:`infl.retrain.single`, in this process or in worker processes via
:func:`infl.parallel.run_tasks`) or, for full-batch SGD, many at once on the batched engine
(:mod:`infl.retrain.grouped`, :mod:`infl.retrain.batched`). The package is deliberately
independent of the influence estimator it checks: plain autograd, never
:mod:`infl.calculator` or :mod:`infl.model`.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from infl.data import as_indexed
from infl.errors import InflWarning, InputError
from infl.legacy_keywords import config_from_keywords
from infl.objective import Objective, PerExampleFn, loss_measurement
from infl.parallel import pickle_payload, run_tasks
from infl.retrain.config import RetrainConfig
from infl.retrain.fingerprint import open_store, removal_key
from infl.retrain.grouped import DEFAULT_GROUP, grouped_retrain
from infl.retrain.records import GroundTruth, Outcome, SubsetRetrain
from infl.retrain.removals import normalize_removals
from infl.retrain.single import RetrainJob, run_one, trainable
from infl.store import Store

__all__ = ["retrain_ground_truth", "retrain_subsets"]

_PAYLOAD = "the model, loss, measurement and data"


# ---------------------------------------------------------------------------------------------
# the protocol, the store
# ---------------------------------------------------------------------------------------------
def _resolve_config(
    config: RetrainConfig | None, protocol: dict[str, Any], caller: str
) -> RetrainConfig:
    """``config``, or (deprecated) a :class:`RetrainConfig` built from protocol keywords."""
    return config_from_keywords(
        RetrainConfig, config, protocol, caller, kind="protocol", public_name="infl.RetrainConfig"
    )


def _load(store: Store, removal: tuple[int, ...]) -> Outcome | None:
    rec = store.load_tensors(removal_key(removal))
    if rec is None or tuple(rec["removal"]) != removal:  # the latter: a hash collision
        return None
    return Outcome(
        removal,
        rec["measurement"],
        float(rec["param_change_norm"]),
        float(rec["grad_norm"]),
        int(rec["steps"]),
        rec.get("stop", "max_steps"),
    )


def _save(store: Store | None, outcome: Outcome) -> None:
    if store is None:
        return
    record = {
        "removal": list(outcome.removal),
        "measurement": outcome.measurement,
        "param_change_norm": outcome.param_change_norm,
        "grad_norm": outcome.grad_norm,
        "steps": outcome.steps,
        "stop": outcome.stop,
    }
    store.save_tensors(removal_key(outcome.removal), record)


# ---------------------------------------------------------------------------------------------
# running the retrains
# ---------------------------------------------------------------------------------------------
def _run_all(
    job: RetrainJob,
    todo: list[tuple[int, ...]],
    store: Store | None,
    workers: int,
    progress: bool,
    parallel_runs: int | None = 1,
) -> Iterator[Outcome]:
    """Run ``todo``, storing and yielding each outcome as it finishes."""
    if not todo:
        return
    if workers == 1 or len(todo) == 1:
        size = DEFAULT_GROUP if parallel_runs is None else int(parallel_runs)
        grouped = grouped_retrain(job, size, len(todo), check_speed=parallel_runs is None)
        if grouped is not None:
            bar = tqdm(total=len(todo), desc="retraining", unit="retrain", disable=not progress)
            try:
                for first in range(0, len(todo), size):
                    for outcome in grouped.run(todo[first : first + size]):
                        _save(store, outcome)
                        bar.update()
                        yield outcome
            finally:
                bar.close()
            return
    tasks = run_tasks(
        run_one,
        todo,
        job,
        workers=workers,
        threads=1,
        progress=progress,
        desc="retraining",
        unit="retrain",
        what=_PAYLOAD,
    )
    for _, outcome in tasks:
        _save(store, outcome)
        yield outcome


def _unconverged_messages(outcomes: list[Outcome], control: Outcome, job: RetrainJob) -> list[str]:
    """One message per reason why retrains stopped above ``grad_tol``, with its fix."""
    cfg = job.config
    tol = cfg.grad_tol
    assert tol is not None
    messages = []
    for reason in ("max_steps", "stalled"):
        runs = [o for o in outcomes if o.grad_norm > tol and o.stop == reason]
        with_control = control.grad_norm > tol and control.stop == reason
        if not runs and not with_control:
            continue
        worst = max([o.grad_norm for o in runs] + ([control.grad_norm] if with_control else []))
        who = (
            f"{len(runs)} of {len(outcomes)} retrains (control run: "
            f"{'also' if with_control else 'not'} affected)"
        )
        if reason == "max_steps":
            messages.append(
                f"{who} used the whole step budget, max_steps={cfg.max_steps}, and stopped with "
                f"||grad J|| up to {worst:.3g} > grad_tol={tol:g}: the budget ran out before "
                "the tolerance was reached; raise max_steps or lr, or loosen grad_tol"
            )
        else:
            steps = sorted({o.steps for o in runs} | ({control.steps} if with_control else set()))
            at = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
            messages.append(
                f"{who} stopped early, at {at} of max_steps={cfg.max_steps}, with ||grad J|| "
                f"up to {worst:.3g} > grad_tol={tol:g}: L-BFGS's line search and tolerance "
                "tests, then the gradient-only polish, could make no more progress in "
                f"{str(job.dtype).removeprefix('torch.')} precision, or the objective is not "
                "differentiable where they stopped (e.g. a ReLU kink) (the step budget was not "
                f"the limit, so raising max_steps will not help); loosen grad_tol to about "
                f"{2 * worst:.1g}, retrain in float64, or check that the trained model is near "
                "a minimum of this objective (same weight_decay)"
            )
    return messages


def _ground_truth(
    model: nn.Module,
    objective: Objective,
    train_data: Any,
    test_data: Any,
    removals: Any,
    measurement: PerExampleFn | None,
    config: RetrainConfig,
    store: str | os.PathLike[str] | None,
    workers: int,
    progress: bool,
    num_threads: int | None = None,
    parallel_runs: int | None = None,
) -> GroundTruth:
    if num_threads is not None and (int(num_threads) != num_threads or num_threads < 1):
        raise InputError(f"num_threads must be None or a positive integer, got {num_threads}")
    if parallel_runs is not None and (int(parallel_runs) != parallel_runs or parallel_runs < 1):
        raise InputError(f"parallel_runs must be None or a positive integer, got {parallel_runs}")
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(objective, Objective):
        raise InputError(f"objective must be an infl.Objective, got {type(objective).__name__}")
    if int(workers) != workers or workers < 1:
        raise InputError(f"workers must be a positive integer, got {workers}")
    if not trainable(model):
        raise InputError("the model has no trainable parameters (requires_grad=True) to retrain")
    train = as_indexed(train_data, "training data")
    test = as_indexed(test_data, "test data")
    groups = normalize_removals(removals, len(train))
    meas = measurement if measurement is not None else loss_measurement(objective)
    job = RetrainJob(copy.deepcopy(model), objective, meas, train, test, config)
    if workers > 1:
        pickle_payload(job, _PAYLOAD)  # fail fast, before any work, if it cannot be sent to workers

    base = job.measure(job.model).detach().cpu()
    st = open_store(store, job) if store is not None else None

    wanted = [(), *dict.fromkeys(groups)]  # control run first, duplicates computed once
    done: dict[tuple[int, ...], Outcome] = {}
    if st is not None:
        for removal in wanted:
            found = _load(st, removal)
            if found is not None:
                done[removal] = found
    num_loaded = len(done)
    todo = [r for r in wanted if r not in done]
    saved_threads = torch.get_num_threads()
    try:
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        for outcome in _run_all(job, todo, st, int(workers), progress, parallel_runs):
            done[outcome.removal] = outcome
    finally:
        torch.set_num_threads(saved_threads)

    control = done[()]
    raw = torch.stack([done[g].measurement for g in groups], dim=1) - base[:, None]
    control_change = control.measurement - base
    grad_norms = torch.tensor([done[g].grad_norm for g in groups], dtype=torch.float64)
    if config.grad_tol is not None:
        for message in _unconverged_messages([done[g] for g in groups], control, job):
            warnings.warn(message, InflWarning, stacklevel=3)
    return GroundTruth(
        removals=tuple(groups),
        base_measurement=base,
        raw_change=raw,
        control_change=control_change,
        corrected_change=raw - control_change[:, None],
        param_change_norm=torch.tensor(
            [done[g].param_change_norm for g in groups], dtype=torch.float64
        ),
        grad_norm=grad_norms,
        steps=torch.tensor([done[g].steps for g in groups], dtype=torch.long),
        control_param_change_norm=control.param_change_norm,
        control_grad_norm=control.grad_norm,
        config=config,
        num_loaded=num_loaded,
        num_computed=len(todo),
    )


def retrain_ground_truth(
    model: nn.Module,
    objective: Objective,
    train_data: Any,
    test_data: Any,
    removals: Any = None,
    *,
    config: RetrainConfig | None = None,
    measurement: PerExampleFn | None = None,
    store: str | os.PathLike[str] | None = None,
    workers: int = 1,
    num_threads: int | None = None,
    parallel_runs: int | None = None,
    progress: bool = True,
    **protocol: Any,
) -> GroundTruth:
    """Retrain without each removal and measure the actual change of each test measurement.

    For each removal :math:`R` (``k`` of them) the model is retrained on the other
    :math:`n-|R|` examples, minimising

    .. math::

        J_{-R}(\\theta) = \\frac1{n-|R|}\\sum_{i\\notin R}\\ell(z_i;\\theta)
        + \\frac{\\lambda_{wd}}2\\|\\theta\\|^2

    with the protocol of ``config`` (:class:`RetrainConfig`: ``init``, ``optimizer``,
    ``max_steps``, ``grad_tol``, ...), and the result reports
    ``raw_change[j, r]`` :math:`= f(z_j;\\theta_{-R_r}) - f(z_j;\\theta^*)` — the same units and
    sign as :meth:`infl.InfluenceCalculator.removal_effect` — together with the control run
    (nothing removed, same protocol) and the control-corrected change
    :math:`f(z_j;\\theta_{-R_r}) - f(z_j;\\theta_c)`.

    With ``config=RetrainConfig(target="pbrf", proximity=λ)`` each retrain instead minimises
    the proximal Bregman response function of Bae et al. (2022) around :math:`\\theta^*`
    (:mod:`infl.retrain.pbrf`: the Bregman divergence of the output-space loss over all ``n``
    examples, minus :math:`\\frac1n` times the removed examples' terms, plus
    :math:`\\frac{\\lambda}2\\|\\theta-\\theta^*\\|^2`), the quantity that
    ``InfluenceCalculator(..., curvature="gauss_newton")`` at ``damping=λ`` approximates;
    results are reported in the same units, and the control run returns :math:`\\theta^*`.
    PBRF retrains run one by one (never batched by ``parallel_runs``).

    Parameters
    ----------
    model
        The trained module (:math:`\\theta^*`), normally in eval mode. It is never modified:
        every retrain works on a deep copy. Only ``requires_grad`` parameters are retrained.
    objective
        The training objective: per-example loss :math:`\\ell` and ``weight_decay``
        :math:`\\lambda_{wd}` (as in ``torch.optim.SGD``).
    train_data
        The ``n`` training examples in a fixed order (tensors, ``(X, y)``, a Dataset, a
        non-shuffling DataLoader or an :class:`~infl.IndexedData`).
    test_data
        The ``m`` test examples.
    removals
        ``None`` (leave-one-out for all ``n``), indices (leave-one-out for each) or groups of
        indices; see :func:`normalize_removals`. A repeated removal is retrained once.
    config
        The retraining protocol, a :class:`RetrainConfig`; ``None``: ``RetrainConfig()``. The
        default (warm start, L-BFGS to :math:`\\|\\nabla J\\| \\le 10^{-6}`) suits small
        convex models in float64; Basu et al.'s fixed-budget protocol is
        ``RetrainConfig(optimizer="sgd", grad_tol=None, max_steps=...)``.
    measurement
        ``(model, batch) -> Tensor[b]``, :math:`f`; default: the per-example loss.
    store
        A directory. Each finished retrain is written there atomically as it ends; a later call
        with the same store skips finished work (a killed run resumes). A store written with a
        different configuration (protocol, objective, measurement, model, data) is refused.
        Retrains are keyed by their removal, so a later call may ask for other removals.
    workers
        Run retrains in this many processes (``spawn`` start method; each uses one thread).
        The model, loss, measurement and data must be picklable (no lambdas). With
        ``workers > 1`` every retrain runs alone (no ``parallel_runs`` batching).
    num_threads
        Torch intra-op threads while retraining in this process (restored afterwards);
        ``None`` leaves the setting alone. For small models ``1`` is often much faster: the
        per-operation threading overhead dominates, badly so on a loaded machine.
    parallel_runs
        Full-batch SGD (``optimizer="sgd"``, ``batch_size=None``) in this process can run
        groups of up to this many retrains side by side as one :func:`torch.func.vmap`
        computation (the control run in the first group), which removes most of the per-step
        overhead of small models; memory grows with the group size times the model. Each
        group's results are stored as the group finishes. ``None`` (default): groups of 32,
        used when a trial gradient evaluation (once, at the start) is faster batched than one
        retrain after another, e.g. for small MLPs, though usually not for CNNs on a CPU. An
        integer ``>= 2`` always batches in groups of that size, ``1`` never does. Batching is
        used only when the model, loss and data work under ``vmap`` and give the same gradient
        as plain autograd (also checked at the start); otherwise each retrain runs alone
        through :mod:`torch.optim`. The two paths agree to floating-point rounding.
    progress
        Show a tqdm bar over retrains.
    **protocol
        Deprecated: the fields of :class:`RetrainConfig` (``init``, ``optimizer``,
        ``max_steps``, ``lr``, ``grad_tol``, ``batch_size``, ``momentum``, ``seed``) as
        keywords, as before ``config`` existed. They still work, with a
        ``DeprecationWarning``, until the next release; not together with ``config``.

    Returns
    -------
    GroundTruth
        ``raw_change``/``corrected_change`` ``[m, k]``, ``control_change`` ``[m]``,
        ``param_change_norm``, ``grad_norm``, ``steps`` ``[k]``.

    Raises
    ------
    InputError
        Bad removals (index out of range, empty group, repeated index), bad protocol
        settings, or an unpicklable job with ``workers > 1``.
    StoreMismatchError
        ``store`` holds results of a different configuration (the message names the key).
    NonFiniteError
        A retrain diverged.

    Warns
    -----
    InflWarning
        Some retrain stopped at ``max_steps`` above ``grad_tol``.

    Notes
    -----
    Cost: ``k + 1`` retrains of up to ``max_steps`` full-batch gradient evaluations each
    (L-BFGS: a few per step for the line search). Full-batch SGD batches them, see
    ``parallel_runs``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from infl import Objective
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> X, y = torch.randn(30, 2, dtype=torch.float64), torch.randint(0, 2, (30,))
    >>> model = nn.Linear(2, 2).double().eval()
    >>> gt = retrain_ground_truth(model, Objective("cross_entropy", 0.1), (X, y),
    ...                           (X[:3], y[:3]), removals=[0, 1, [2, 3]], progress=False)
    >>> gt.raw_change.shape, gt.control_change.shape
    (torch.Size([3, 3]), torch.Size([3]))
    """
    config = _resolve_config(config, protocol, "retrain_ground_truth")
    return _ground_truth(
        model,
        objective,
        train_data,
        test_data,
        removals,
        measurement,
        config,
        store,
        workers,
        progress,
        num_threads,
        parallel_runs,
    )


def retrain_subsets(
    model: nn.Module,
    objective: Objective,
    train_data: Any,
    test_data: Any,
    *,
    num_subsets: int = 100,
    alpha: float = 0.5,
    subset_seed: int = 0,
    config: RetrainConfig | None = None,
    measurement: PerExampleFn | None = None,
    store: str | os.PathLike[str] | None = None,
    workers: int = 1,
    num_threads: int | None = None,
    parallel_runs: int | None = None,
    progress: bool = True,
    **protocol: Any,
) -> SubsetRetrain:
    """Retrain on random :math:`\\alpha`-fractions of the training data (for the LDS).

    Draws ``num_subsets`` subsets :math:`S_s` of :math:`\\lfloor \\alpha n \\rceil` examples
    uniformly without replacement (from ``subset_seed``), retrains on each (removing the
    complement, with the protocol ``config`` and the other settings of
    :func:`retrain_ground_truth`) and returns :math:`f(z_j;\\theta_{S_s})`. Park et al. (2023)
    use 100 subsets with :math:`\\alpha = 0.5` and retrain from scratch
    (``RetrainConfig(init="scratch")``); for convex models a warm start to a tight
    ``grad_tol`` reaches the same minimum faster.

    Feed the result to :func:`infl.metrics.linear_datamodeling_score` together with predicted
    removal effects.

    Returns
    -------
    SubsetRetrain
        ``masks`` ``[S, n]`` and ``outputs`` ``[m, S]``.
    """
    if int(num_subsets) != num_subsets or num_subsets < 1:
        raise InputError(f"num_subsets must be a positive integer, got {num_subsets}")
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1), got {alpha}")
    train = as_indexed(train_data, "training data")
    n = len(train)
    size = round(alpha * n)
    if size < 1 or size >= n:
        raise InputError(
            f"alpha={alpha} of n={n} examples gives subsets of {size}; need 1..{n - 1}"
        )
    gen = torch.Generator().manual_seed(subset_seed)
    masks = torch.zeros(num_subsets, n, dtype=torch.bool)
    for s in range(num_subsets):
        masks[s, torch.randperm(n, generator=gen)[:size]] = True
    removals = [tuple(torch.nonzero(~row).reshape(-1).tolist()) for row in masks]
    gt = retrain_ground_truth(
        model,
        objective,
        train,
        test_data,
        removals,
        config=_resolve_config(config, protocol, "retrain_subsets"),
        measurement=measurement,
        store=store,
        workers=workers,
        num_threads=num_threads,
        parallel_runs=parallel_runs,
        progress=progress,
    )
    outputs = gt.raw_change + gt.base_measurement[:, None]
    return SubsetRetrain(masks, outputs, gt.base_measurement, gt)
