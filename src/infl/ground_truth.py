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

This module is deliberately independent of the influence estimator it checks: it uses plain
autograd and :mod:`torch.optim` on a deep copy of the user's module (for full-batch SGD, the
same update written out for many retrains at once under :func:`torch.func.vmap`), and never
imports :mod:`infl.calculator` or :mod:`infl.model`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from infl.data import IndexedData, as_indexed, batch_to, tensor_leaves
from infl.errors import InflWarning, InputError, NonFiniteError, StoreMismatchError
from infl.objective import Objective, PerExampleFn, loss_measurement

Removal = int | Sequence[int] | torch.Tensor
"""One removal: a training index (leave-one-out) or a group of indices."""

InitName = Literal["warm", "scratch"]
OptimizerName = Literal["sgd", "adam", "lbfgs"]

_DEFAULT_LR: dict[str, float] = {"sgd": 0.1, "adam": 1e-3, "lbfgs": 1.0}
_STORE_FORMAT = 1
_EVAL_CHUNK = 4096
_PARALLEL_RUNS = 32
_BATCHED_EXAMPLES = 1 << 15  # runs x examples per vmapped gradient evaluation (memory bound)
_PROBE_RUNS = 8  # runs in the trial batched gradient that decides whether batching pays
_BATCHED_MIN_SPEEDUP_INV = 0.8  # batched must take < 0.8x the time of the runs one by one


# ---------------------------------------------------------------------------------------------
# configuration and results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrainConfig:
    """How each retrain is run (the *protocol*).

    Parameters
    ----------
    init
        ``"warm"``: start from :math:`\\theta^*` (Koh & Liang 2017; Basu et al. 2021);
        ``"scratch"``: re-initialise every submodule that has ``reset_parameters()`` with
        ``seed`` (the same initialisation for every removal and for the control run).
    optimizer
        ``"sgd"`` (with ``momentum``), ``"adam"`` or ``"lbfgs"`` (strong-Wolfe line search;
        full batch only). All minimise :math:`J` including the weight-decay term, which is
        added to the loss explicitly (the optimizers' own ``weight_decay`` is not used).
    max_steps
        Maximum number of optimizer steps (for L-BFGS: quasi-Newton iterations). With
        ``grad_tol=None`` every retrain takes exactly this many steps (the fixed-budget
        protocol, e.g. Basu et al.'s 7.5k full-batch steps on Iris).
    lr
        Learning rate; ``None`` picks 0.1 (SGD), 1e-3 (Adam) or 1.0 (L-BFGS).
    grad_tol
        Stop as soon as the full-batch :math:`\\|\\nabla J(\\theta)\\|_2 \\le` ``grad_tol``
        (``None``: never stop early). With minibatches the full gradient is checked once per
        epoch.
    batch_size
        ``None`` for full-batch steps, else the minibatch size (epochs of a permutation drawn
        from ``seed``).
    momentum
        SGD momentum.
    seed
        Seeds the scratch initialisation and the minibatch order.
    """

    init: InitName = "warm"
    optimizer: OptimizerName = "lbfgs"
    max_steps: int = 1000
    lr: float | None = None
    grad_tol: float | None = 1e-6
    batch_size: int | None = None
    momentum: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.init not in ("warm", "scratch"):
            raise InputError(f"init must be 'warm' or 'scratch', got {self.init!r}")
        if self.optimizer not in _DEFAULT_LR:
            raise InputError(
                f"optimizer must be one of {sorted(_DEFAULT_LR)}, got {self.optimizer!r}"
            )
        if int(self.max_steps) != self.max_steps or self.max_steps < 1:
            raise InputError(f"max_steps must be a positive integer, got {self.max_steps}")
        lr = _DEFAULT_LR[self.optimizer] if self.lr is None else float(self.lr)
        if not math.isfinite(lr) or lr <= 0:
            raise InputError(f"lr must be a finite number > 0, got {self.lr}")
        object.__setattr__(self, "lr", lr)
        if self.grad_tol is not None and not (self.grad_tol >= 0 and math.isfinite(self.grad_tol)):
            raise InputError(f"grad_tol must be None or a finite number >= 0, got {self.grad_tol}")
        if self.batch_size is not None:
            if int(self.batch_size) != self.batch_size or self.batch_size < 1:
                raise InputError(f"batch_size must be None or >= 1, got {self.batch_size}")
            if self.optimizer == "lbfgs":
                raise InputError(
                    "L-BFGS needs exact full-batch gradients for its line search; use "
                    "batch_size=None, or optimizer='sgd'/'adam' for minibatch retraining"
                )
        if not 0 <= self.momentum < 1:
            raise InputError(f"momentum must be in [0, 1), got {self.momentum}")

    @property
    def learning_rate(self) -> float:
        """The learning rate actually used (``lr`` with its default filled in)."""
        assert self.lr is not None
        return self.lr


@dataclass(frozen=True)
class GroundTruth:
    """Result of :func:`retrain_ground_truth` (``m`` test examples, ``k`` removals).

    Attributes
    ----------
    removals : tuple of tuple of int
        The ``k`` removals, each a sorted tuple of training indices.
    base_measurement : Tensor ``[m]``
        :math:`f(z_j;\\theta^*)`.
    raw_change : Tensor ``[m, k]``
        :math:`f(z_j;\\theta_{-R}) - f(z_j;\\theta^*)`, the actual change on removing ``R``.
    control_change : Tensor ``[m]``
        :math:`f(z_j;\\theta_c) - f(z_j;\\theta^*)`: what retraining alone (nothing removed)
        does. Near zero when :math:`\\theta^*` is a converged minimum.
    corrected_change : Tensor ``[m, k]``
        ``raw_change - control_change[:, None]`` :math:`= f(z_j;\\theta_{-R}) -
        f(z_j;\\theta_c)`.
    param_change_norm : Tensor ``[k]``
        :math:`\\|\\theta_{-R} - \\theta^*\\|_2` over the trainable parameters.
    grad_norm : Tensor ``[k]``
        Final full-batch :math:`\\|\\nabla J_{-R}(\\theta_{-R})\\|_2` of each retrain (how
        converged it is).
    steps : Tensor ``[k]``
        Optimizer steps each retrain took.
    control_param_change_norm, control_grad_norm : float
        The same for the control run.
    config : RetrainConfig
        The protocol used.
    num_loaded, num_computed : int
        Retrains (control included) read from the store vs. computed by this call.
    """

    removals: tuple[tuple[int, ...], ...]
    base_measurement: torch.Tensor
    raw_change: torch.Tensor
    control_change: torch.Tensor
    corrected_change: torch.Tensor
    param_change_norm: torch.Tensor
    grad_norm: torch.Tensor
    steps: torch.Tensor
    control_param_change_norm: float
    control_grad_norm: float
    config: RetrainConfig
    num_loaded: int = 0
    num_computed: int = 0


@dataclass(frozen=True)
class SubsetRetrain:
    """Result of :func:`retrain_subsets` (``S`` subsets of ``n`` examples, ``m`` test points).

    Attributes
    ----------
    masks : Tensor ``[S, n]`` (bool)
        ``masks[s, i]`` is ``True`` when training example ``i`` is in subset ``s``.
    outputs : Tensor ``[m, S]``
        :math:`f(z_j;\\theta_{S_s})`, the measurement after training on subset ``s`` only.
    base_measurement : Tensor ``[m]``
        :math:`f(z_j;\\theta^*)`.
    ground_truth : GroundTruth
        The underlying retrains (removal ``s`` is the complement of subset ``s``).
    """

    masks: torch.Tensor
    outputs: torch.Tensor
    base_measurement: torch.Tensor
    ground_truth: GroundTruth


# ---------------------------------------------------------------------------------------------
# one retrain (runs in the main process or in a worker)
# ---------------------------------------------------------------------------------------------
@dataclass
class _Outcome:
    removal: tuple[int, ...]
    measurement: torch.Tensor
    param_change_norm: float
    grad_norm: float
    steps: int


def _trainable(net: nn.Module) -> list[torch.Tensor]:
    return [p for _, p in net.named_parameters() if p.requires_grad]


def _flat(params: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


class _Job:
    """Everything one retrain needs; picklable when the model, loss and measurement are."""

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        measurement: PerExampleFn,
        train: IndexedData,
        test: IndexedData,
        config: RetrainConfig,
    ) -> None:
        self.model = model
        self.objective = objective
        self.measurement = measurement
        self.train = train
        self.test = test
        self.config = config
        params = _trainable(model)
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.theta_star = _flat(params)

    # -- pieces ---------------------------------------------------------------------------
    def measure(self, net: nn.Module) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for _, batch in self.test.chunks(_EVAL_CHUNK):
                values = torch.as_tensor(
                    self.measurement(net, batch_to(batch, self.device, self.dtype))
                )
                b = len(tensor_leaves(batch)[0])
                if values.shape != (b,):
                    raise InputError(
                        f"the measurement returned shape {tuple(values.shape)} for {b} test "
                        "examples; it must return one value per example (Tensor[b])"
                    )
                out.append(values)
        return torch.cat(out)

    def _full_objective_backward(
        self, net: nn.Module, params: list[torch.Tensor], data: IndexedData
    ) -> torch.Tensor:
        """Accumulate :math:`\\nabla J` into ``.grad`` (zeroed first); return :math:`J` (0-d)."""
        for p in params:
            p.grad = None
        n = len(data)
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for _, batch in data.chunks(_EVAL_CHUNK):
            losses = self.objective.per_example_loss(net, batch_to(batch, self.device, self.dtype))
            part = losses.sum() / n
            part.backward()
            total = total + part.detach()
        wd = self.objective.weight_decay
        if wd > 0:
            reg = 0.5 * wd * sum((p * p).sum() for p in params)
            assert isinstance(reg, torch.Tensor)
            reg.backward()
            total = total + reg.detach()
        return total

    @staticmethod
    def _grad_norm(params: list[torch.Tensor]) -> float:
        sq = sum(float((p.grad * p.grad).sum()) for p in params if p.grad is not None)
        return math.sqrt(sq)

    def _reinit(self, net: nn.Module) -> None:
        frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
        resettable = [m for m in net.modules() if callable(getattr(m, "reset_parameters", None))]
        if not resettable:
            raise InputError(
                "init='scratch' needs submodules with reset_parameters() (nn.Linear, nn.Conv2d, "
                "...); this model has none. Use init='warm' or give the modules a "
                "reset_parameters method"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            for m in resettable:
                m.reset_parameters()  # type: ignore[operator]
        with torch.no_grad():
            for n, p in net.named_parameters():
                if n in frozen:
                    p.copy_(frozen[n])

    def _fail(self, removal: tuple[int, ...], step: int, value: float) -> NonFiniteError:
        what = f"removal {list(removal)}" if removal else "the control run"
        return NonFiniteError(
            f"retraining for {what} diverged at step {step} (objective or gradient {value}); "
            f"lower lr (now {self.config.learning_rate}) or use optimizer='lbfgs'"
        )

    # -- the retrain ----------------------------------------------------------------------
    def run(self, removal: tuple[int, ...]) -> _Outcome:
        cfg = self.config
        net = copy.deepcopy(self.model)
        if cfg.init == "scratch":
            self._reinit(net)
        params = _trainable(net)
        data = self.train.without(list(removal)) if removal else self.train
        wd = self.objective.weight_decay
        tol = cfg.grad_tol
        steps = 0

        if cfg.optimizer == "lbfgs":
            steps = self._run_lbfgs(net, params, data, removal)
        elif cfg.batch_size is None:
            opt = self._first_order(params)
            while steps < cfg.max_steps:
                value = float(self._full_objective_backward(net, params, data))
                gnorm = self._grad_norm(params)
                if not (math.isfinite(value) and math.isfinite(gnorm)):
                    raise self._fail(removal, steps, value if not math.isfinite(value) else gnorm)
                if tol is not None and gnorm <= tol:
                    break
                opt.step()
                steps += 1
        else:
            opt = self._first_order(params)
            gen = torch.Generator().manual_seed(cfg.seed)
            n = len(data)
            bs = min(cfg.batch_size, n)
            done = False
            while not done:
                perm = torch.randperm(n, generator=gen)
                for start in range(0, n, bs):
                    batch = batch_to(data.select(perm[start : start + bs]), self.device, self.dtype)
                    for p in params:
                        p.grad = None
                    loss = self.objective.per_example_loss(net, batch).mean()
                    if wd > 0:
                        loss = loss + 0.5 * wd * sum((p * p).sum() for p in params)
                    if not torch.isfinite(loss):
                        raise self._fail(removal, steps, float(loss))
                    loss.backward()
                    opt.step()
                    steps += 1
                    if steps >= cfg.max_steps:
                        done = True
                        break
                if not done and tol is not None:
                    self._full_objective_backward(net, params, data)
                    done = self._grad_norm(params) <= tol

        self._full_objective_backward(net, params, data)
        gnorm = self._grad_norm(params)
        for p in params:
            p.grad = None
        if not math.isfinite(gnorm):
            raise self._fail(removal, steps, gnorm)
        delta = float(torch.linalg.vector_norm(_flat(params) - self.theta_star))
        return _Outcome(removal, self.measure(net).detach().cpu(), delta, gnorm, steps)

    def _first_order(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        lr = self.config.learning_rate
        if self.config.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=self.config.momentum)
        return torch.optim.Adam(params, lr=lr)

    def _run_lbfgs(
        self,
        net: nn.Module,
        params: list[torch.Tensor],
        data: IndexedData,
        removal: tuple[int, ...],
    ) -> int:
        cfg = self.config
        tol = cfg.grad_tol
        # L-BFGS's own stopping test is on max|g|; max|g| <= tol/sqrt(p) implies ||g|| <= tol.
        p_count = sum(p.numel() for p in params)
        inner_tol = 0.0 if tol is None else tol / math.sqrt(p_count)
        opt = torch.optim.LBFGS(
            params,
            lr=cfg.learning_rate,
            max_iter=20,
            history_size=20,
            tolerance_grad=inner_tol,
            tolerance_change=0.0,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            return self._full_objective_backward(net, params, data)

        steps = 0
        prev = math.inf
        while steps < cfg.max_steps:
            for group in opt.param_groups:
                group["max_iter"] = min(20, cfg.max_steps - steps)
                group["max_eval"] = group["max_iter"] * 5 // 4 * 2
            value = float(opt.step(closure))
            if not math.isfinite(value):
                raise self._fail(removal, steps, value)
            state = opt.state[opt._params[0]]
            new_steps = int(state.get("n_iter", 0))
            self._full_objective_backward(net, params, data)
            gnorm = self._grad_norm(params)
            if not math.isfinite(gnorm):
                raise self._fail(removal, new_steps, gnorm)
            stalled = new_steps <= steps or gnorm > 0.5 * prev
            steps, prev = max(new_steps, steps), gnorm
            if tol is not None and gnorm <= tol:
                break
            if stalled:
                # Near the minimum, J changes by less than its float rounding, so the Wolfe line
                # search (which compares values of J) and torch's absolute curvature test
                # (y's > 1e-10) stop L-BFGS short of a tight tolerance. Finish with steps that
                # look only at gradients.
                if tol is not None:
                    steps = self._polish(net, params, data, removal, steps)
                break
        return steps

    def _polish(
        self,
        net: nn.Module,
        params: list[torch.Tensor],
        data: IndexedData,
        removal: tuple[int, ...],
        steps: int,
    ) -> int:
        """Gradient-only L-BFGS: two-loop recursion, unit step, halved until ||grad J|| drops.

        Used only close to a minimum, where the quasi-Newton step is accurate and the gradient
        norm is a sound merit function; it needs no values of :math:`J`.
        """
        cfg = self.config
        tol = cfg.grad_tol if cfg.grad_tol is not None else 0.0

        def grad_at(x: torch.Tensor) -> tuple[torch.Tensor, float]:
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(x, params)
            self._full_objective_backward(net, params, data)
            g = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
            return g, float(torch.linalg.vector_norm(g))

        x = torch.nn.utils.parameters_to_vector(params).detach().clone()
        g, gnorm = grad_at(x)
        hist: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        while steps < cfg.max_steps and gnorm > tol:
            q = -g
            alphas = []
            for s_k, y_k, rho in reversed(hist):
                a = rho * torch.dot(s_k, q)
                alphas.append(a)
                q = q - a * y_k
            if hist:
                s_k, y_k, _ = hist[-1]
                q = q * (torch.dot(s_k, y_k) / torch.dot(y_k, y_k))
            for (s_k, y_k, rho), a in zip(hist, reversed(alphas), strict=True):
                q = q + s_k * (a - rho * torch.dot(y_k, q))
            t = 1.0
            for _ in range(40):
                x_new = x + t * q
                g_new, gnorm_new = grad_at(x_new)
                if gnorm_new < gnorm:
                    break
                t *= 0.5
            else:
                break  # no step lowers the gradient norm: float precision is exhausted
            steps += 1
            s_vec, y_vec = x_new - x, g_new - g
            ys = float(torch.dot(s_vec, y_vec))
            if ys > 1e-12 * float(
                torch.linalg.vector_norm(s_vec) * torch.linalg.vector_norm(y_vec)
            ):
                hist.append((s_vec, y_vec, torch.tensor(1.0 / ys, dtype=x.dtype)))
                hist = hist[-20:]
            x, g, gnorm = x_new, g_new, gnorm_new
            if not math.isfinite(gnorm):
                raise self._fail(removal, steps, gnorm)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(x, params)
        return steps


# ---------------------------------------------------------------------------------------------
# many full-batch SGD retrains at once (torch.func.vmap)
# ---------------------------------------------------------------------------------------------
class _CallLoss(nn.Module):
    """``forward(batch) = loss(net, batch)``, so that ``functional_call`` can swap ``net``'s
    parameters while the loss still receives the real module, as in :meth:`_Job.run`."""

    def __init__(self, net: nn.Module, loss: PerExampleFn) -> None:
        super().__init__()
        self.net = net
        self.loss = loss

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss(self.net, batch)


class _BatchedSGD:
    """Full-batch SGD (with momentum) for a group of retrains side by side, vmapped.

    Run ``r`` holds its own copy of the trainable parameters, row ``r`` of a flat
    ``[runs, p]`` tensor, and minimises
    :math:`\\sum_i w_{ri}\\,\\ell(z_i;\\theta_r) + \\frac{\\lambda_{wd}}2\\|\\theta_r\\|^2`
    with :math:`w_{ri} = 0` for its removed examples and :math:`1/(n-|R_r|)` otherwise, which is
    exactly :math:`J_{-R_r}`. The loss is evaluated for all runs by one
    :func:`torch.func.vmap` of :func:`torch.func.functional_call`, and differentiated by plain
    autograd (the runs are independent, so the gradient of the summed objectives is every
    run's own gradient). The update is ``torch.optim.SGD``'s (``buf = momentum * buf + g``,
    ``buf = g`` on the first step; ``theta -= lr * buf``), and the stopping rule, step count,
    final gradient norm and parameter change are those of :meth:`_Job.run`: a run whose
    :math:`\\|\\nabla J_{-R}\\|` reaches ``grad_tol`` is frozen (masked) while the others go on.
    Only the order of floating-point operations differs.
    """

    def __init__(self, job: _Job, max_runs: int) -> None:
        self.job = job
        net = copy.deepcopy(job.model)
        if job.config.init == "scratch":
            job._reinit(net)
        self.net = net  # the starting point; also evaluated (with each run's θ) to measure
        names = [name for name, p in net.named_parameters() if p.requires_grad]
        self.keys = [f"net.{name}" for name in names]
        targets = _trainable(net)
        self.shapes = [p.shape for p in targets]
        self.sizes = [p.numel() for p in targets]
        self.start = _flat(targets)
        self.call = _CallLoss(net, job.objective.per_example_loss)
        n = len(job.train)
        chunk = max(1, min(n, _BATCHED_EXAMPLES // max(1, max_runs)))
        self.chunks = [
            (start, batch_to(batch, job.device, job.dtype))
            for start, batch in job.train.chunks(chunk)
        ]
        self.vloss = torch.func.vmap(self._run_loss, in_dims=(0, 0, None))

    # -- pieces ---------------------------------------------------------------------------
    def _run_loss(
        self, params: tuple[torch.Tensor, ...], weights: torch.Tensor, batch: Any
    ) -> torch.Tensor:
        losses = torch.func.functional_call(
            self.call, dict(zip(self.keys, params, strict=True)), (batch,)
        )
        if losses.shape != weights.shape:
            raise InputError(
                f"the loss returned shape {tuple(losses.shape)} for {weights.shape[0]} examples"
            )
        return (weights * losses).sum()

    def _weights(self, group: list[tuple[int, ...]]) -> torch.Tensor:
        n = len(self.job.train)
        w = torch.ones(len(group), n, dtype=self.job.dtype, device=self.job.device)
        for r, removal in enumerate(group):
            if removal:
                w[r, list(removal)] = 0.0
        return w / w.sum(dim=1, keepdim=True)

    def _stacked(self, runs: int) -> torch.Tensor:
        return self.start.unsqueeze(0).expand(runs, -1).clone()

    def gradient(
        self, flat: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per run (rows of ``flat``): :math:`\\nabla J_{-R_r}`, :math:`J_{-R_r}`, its norm."""
        runs = flat.shape[0]
        grad = torch.zeros_like(flat)
        value = torch.zeros(runs, dtype=flat.dtype, device=flat.device)
        for start, batch in self.chunks:
            x = flat.detach().requires_grad_(True)
            params = tuple(
                part.reshape(runs, *shape)
                for part, shape in zip(x.split(self.sizes, dim=1), self.shapes, strict=True)
            )
            w = weights[:, start : start + len(tensor_leaves(batch)[0])]
            v = self.vloss(params, w, batch)
            (g,) = torch.autograd.grad(v.sum(), x, allow_unused=True, materialize_grads=True)
            grad += g
            value += v.detach()
        wd = self.job.objective.weight_decay
        if wd > 0:
            grad += wd * flat
            value += 0.5 * wd * (flat * flat).sum(dim=1)
        return grad, value, torch.linalg.vector_norm(grad, dim=1)

    def _check(
        self,
        group: list[tuple[int, ...]],
        active: torch.Tensor,
        steps: torch.Tensor,
        value: torch.Tensor,
        gnorm: torch.Tensor,
    ) -> None:
        bad = active & ~(torch.isfinite(value) & torch.isfinite(gnorm))
        if bool(bad.any()):
            r = int(torch.nonzero(bad)[0])
            v = float(value[r]) if not math.isfinite(float(value[r])) else float(gnorm[r])
            raise self.job._fail(group[r], int(steps[r]), v)

    # -- is the batched path right, and worth it? ------------------------------------------
    def probe(self, runs: int, *, check_speed: bool) -> bool:
        """Batched gradient at the start == :meth:`_Job.run`'s (and faster per retrain).

        Compares the control objective's gradient from ``runs`` stacked copies with plain
        autograd's (to :math:`\\sqrt{\\epsilon}` relative), and with ``check_speed`` times one
        batched evaluation against ``runs`` plain ones (the batching rules of some layers,
        e.g. convolutions on a CPU, are slower than running the retrains one by one).
        """
        net = copy.deepcopy(self.net)
        params = _trainable(net)

        def plain() -> torch.Tensor:
            self.job._full_objective_backward(net, params, self.job.train)
            return torch.cat(
                [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params]
            )

        ref = plain()
        clock = time.perf_counter()
        plain()
        t_plain = time.perf_counter() - clock
        flat, weights = self._stacked(runs), self._weights([()] * runs)
        got, _, _ = self.gradient(flat, weights)
        clock = time.perf_counter()
        self.gradient(flat, weights)
        t_batched = time.perf_counter() - clock
        if not bool(torch.isfinite(ref).all() and torch.isfinite(got).all()):
            return False
        tol = math.sqrt(torch.finfo(self.job.dtype).eps) * (float(ref.norm()) + 1e-12)
        if not bool((got - ref).norm(dim=1).max() <= tol):
            return False
        return not check_speed or t_batched < _BATCHED_MIN_SPEEDUP_INV * runs * t_plain

    # -- the retrains ---------------------------------------------------------------------
    def run(self, group: list[tuple[int, ...]]) -> list[_Outcome]:
        """Retrain every removal of ``group`` (``()`` is the control run) at once."""
        cfg = self.job.config
        runs = len(group)
        lr, momentum, tol = cfg.learning_rate, cfg.momentum, cfg.grad_tol
        weights = self._weights(group)
        flat = self._stacked(runs)
        buf = torch.zeros_like(flat)
        steps = torch.zeros(runs, dtype=torch.long, device=flat.device)
        active = torch.ones(runs, dtype=torch.bool, device=flat.device)
        for it in range(cfg.max_steps):
            grad, value, gnorm = self.gradient(flat, weights)
            self._check(group, active, steps, value, gnorm)
            if tol is not None:
                active = active & (gnorm > tol)
                if not bool(active.any()):
                    break
            if momentum != 0:
                buf = grad if it == 0 else momentum * buf + grad
                grad = buf
            if tol is None:
                flat = flat - lr * grad
            else:  # frozen runs keep their parameters (their momentum no longer matters)
                flat = torch.where(active[:, None], flat - lr * grad, flat)
                steps += active.long()
        if tol is None:
            steps += cfg.max_steps
        _, value, gnorm = self.gradient(flat, weights)
        self._check(group, torch.ones_like(active), steps, value, gnorm)
        delta = torch.linalg.vector_norm(flat - self.job.theta_star, dim=1)
        outcomes = []
        for r, removal in enumerate(group):
            self._load(flat[r])
            outcomes.append(
                _Outcome(
                    removal,
                    self.job.measure(self.net).detach().cpu(),
                    float(delta[r]),
                    float(gnorm[r]),
                    int(steps[r]),
                )
            )
        self._load(self.start)
        return outcomes

    def _load(self, theta: torch.Tensor) -> None:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(theta, _trainable(self.net))


def _batched_engine(
    job: _Job, parallel_runs: int, num_runs: int, *, check_speed: bool
) -> _BatchedSGD | None:
    """A :class:`_BatchedSGD` when it applies, is right (and faster), else ``None``."""
    cfg = job.config
    if cfg.optimizer != "sgd" or cfg.batch_size is not None or parallel_runs < 2:
        return None
    try:
        engine = _BatchedSGD(job, parallel_runs)
        if engine.probe(min(parallel_runs, num_runs, _PROBE_RUNS), check_speed=check_speed):
            return engine
    except Exception:  # vmap/functional_call fail in many ways on unsupported models
        pass
    return None


# ---------------------------------------------------------------------------------------------
# worker processes
# ---------------------------------------------------------------------------------------------
_WORKER_JOB: _Job | None = None


def _init_worker(payload: bytes) -> None:
    global _WORKER_JOB
    torch.set_num_threads(1)
    _WORKER_JOB = pickle.loads(payload)


def _run_in_worker(removal: tuple[int, ...]) -> _Outcome:
    assert _WORKER_JOB is not None
    return _WORKER_JOB.run(removal)


def _pickled_job(job: _Job) -> bytes:
    try:
        return pickle.dumps(job)
    except Exception as err:  # pickling raises many types (PicklingError, AttributeError, ...)
        raise InputError(
            "workers > 1 sends the model, loss, measurement and data to other processes, but "
            f"they cannot be pickled ({type(err).__name__}: {err}). A lambda or a function "
            "defined inside another function is the usual cause: define it at module level "
            "(or use the built-in losses/measurements of infl.objective), or use workers=1"
        ) from err


# ---------------------------------------------------------------------------------------------
# validation, fingerprints and the store
# ---------------------------------------------------------------------------------------------
def normalize_removals(removals: Any, n: int) -> list[tuple[int, ...]]:
    """Turn ``removals`` into a list of sorted index tuples, validating each.

    Parameters
    ----------
    removals
        ``None`` (leave-one-out for every training example), a 1-d integer tensor/array or a
        sequence of ints (leave-one-out for each), or a sequence whose items are ints or
        groups (sequences / 1-d tensors of ints). A 2-d tensor is read as one group per row.
    n
        Number of training examples.

    Raises
    ------
    InputError
        An index out of ``0..n-1``, an empty group, an index repeated within a group, a group
        that removes every example, or a non-integer index.
    """
    if removals is None:
        return [(i,) for i in range(n)]
    if isinstance(removals, (torch.Tensor, np.ndarray)):
        arr = np.asarray(
            removals.detach().cpu() if isinstance(removals, torch.Tensor) else removals
        )
        if arr.ndim == 1:
            items: list[Any] = arr.tolist()
        elif arr.ndim == 2:
            items = arr.tolist()
        else:
            raise InputError(f"removals as an array must be 1-d or 2-d, got shape {arr.shape}")
    elif isinstance(removals, (int, np.integer)):
        items = [int(removals)]
    else:
        items = list(removals)
    if not items:
        raise InputError("removals is empty: give at least one index or group to remove")
    out = []
    for pos, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            item = item.reshape(-1).tolist() if item.dim() > 0 else int(item)
        group = [item] if _is_int(item) else list(item)
        if not group:
            raise InputError(f"removal {pos} is an empty group; every removal needs >= 1 index")
        for v in group:
            if not _is_int(v):
                raise InputError(f"removal {pos} contains {v!r}, which is not an integer index")
            if not 0 <= int(v) < n:
                raise InputError(
                    f"removal {pos} contains index {int(v)}, out of range for {n} training "
                    f"examples (valid: 0..{n - 1})"
                )
        ints = sorted(int(v) for v in group)
        if len(set(ints)) != len(ints):
            dup = next(v for v in ints if ints.count(v) > 1)
            raise InputError(
                f"removal {pos} lists index {dup} more than once; a group is a set of "
                "distinct indices"
            )
        if len(ints) >= n:
            raise InputError(f"removal {pos} removes all {n} training examples; nothing is left")
        out.append(tuple(ints))
    return out


def _is_int(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, (int, np.integer))


def _hash_tensors(tensors: Iterable[torch.Tensor], h: Any) -> None:
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _fingerprint_data(data: IndexedData) -> str:
    h = hashlib.sha256()
    h.update(str(len(data)).encode())
    for _, batch in data.chunks(_EVAL_CHUNK):
        _hash_tensors(tensor_leaves(batch), h)
    return h.hexdigest()[:24]


def _fingerprint_model(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _hash_tensors([t], h)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    h.update(",".join(trainable).encode())
    return h.hexdigest()[:24]


def _describe(fn: Any) -> str:
    """A stable description of a callable for the store config."""
    if dataclasses.is_dataclass(fn):
        return repr(fn)
    module = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qual}"


def _store_config(job: _Job) -> dict[str, Any]:
    cfg = dataclasses.asdict(job.config)
    return {
        "format": _STORE_FORMAT,
        **cfg,
        "weight_decay": job.objective.weight_decay,
        "loss": _describe(job.objective.per_example_loss),
        "measurement": _describe(job.measurement),
        "model": _fingerprint_model(job.model),
        "dtype": str(job.dtype),
        "train_data": _fingerprint_data(job.train),
        "test_data": _fingerprint_data(job.test),
    }


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _Store:
    """A directory: ``config.json`` plus one ``retrain-<hash>.pt`` per finished retrain."""

    def __init__(self, root: str | os.PathLike[str], config: dict[str, Any]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        cfg_path = self.root / "config.json"
        config = json.loads(json.dumps(config))
        if cfg_path.exists():
            try:
                stored = json.loads(cfg_path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise StoreMismatchError(
                    f"cannot read the store's configuration {cfg_path} ({err}); "
                    "use a new store path"
                ) from err
            for key in sorted(set(stored) | set(config)):
                if stored.get(key, "<missing>") != config.get(key, "<missing>"):
                    raise StoreMismatchError(
                        f"store {self.root} was written with a different configuration: "
                        f"{key}={stored.get(key, '<missing>')!r} there, "
                        f"{key}={config.get(key, '<missing>')!r} in this call. Use a new store "
                        "path for the new setting, or repeat the original setting to resume"
                    )
        else:
            _atomic_write(
                cfg_path, lambda fh: fh.write(json.dumps(config, indent=2, sort_keys=True)), "w"
            )

    def path(self, removal: tuple[int, ...]) -> Path:
        key = hashlib.sha256(",".join(map(str, removal)).encode()).hexdigest()[:24]
        return self.root / f"retrain-{key}.pt"

    def load(self, removal: tuple[int, ...]) -> _Outcome | None:
        path = self.path(removal)
        if not path.exists():
            return None
        rec = torch.load(path, weights_only=True)
        if tuple(rec["removal"]) != removal:  # pragma: no cover - hash collision
            return None
        return _Outcome(
            removal,
            rec["measurement"],
            float(rec["param_change_norm"]),
            float(rec["grad_norm"]),
            int(rec["steps"]),
        )

    def save(self, outcome: _Outcome) -> None:
        rec = {
            "removal": list(outcome.removal),
            "measurement": outcome.measurement,
            "param_change_norm": outcome.param_change_norm,
            "grad_norm": outcome.grad_norm,
            "steps": outcome.steps,
        }
        _atomic_write(self.path(outcome.removal), lambda fh: torch.save(rec, fh))


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
def _run_all(
    job: _Job,
    todo: list[tuple[int, ...]],
    store: _Store | None,
    workers: int,
    progress: bool,
    parallel_runs: int | None = 1,
) -> Iterator[_Outcome]:
    if not todo:
        return
    bar = tqdm(total=len(todo), desc="retraining", unit="retrain", disable=not progress)
    try:
        if workers == 1 or len(todo) == 1:
            size = _PARALLEL_RUNS if parallel_runs is None else int(parallel_runs)
            engine = _batched_engine(job, size, len(todo), check_speed=parallel_runs is None)
            if engine is not None:
                for first in range(0, len(todo), size):
                    for outcome in engine.run(todo[first : first + size]):
                        if store is not None:
                            store.save(outcome)
                        bar.update()
                        yield outcome
                return
            for removal in todo:
                outcome = job.run(removal)
                if store is not None:
                    store.save(outcome)
                bar.update()
                yield outcome
            return
        payload = _pickled_job(job)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=min(workers, len(todo)),
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(payload,),
        ) as pool:
            futures = [pool.submit(_run_in_worker, r) for r in todo]
            try:
                for fut in as_completed(futures):
                    outcome = fut.result()
                    if store is not None:
                        store.save(outcome)
                    bar.update()
                    yield outcome
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    finally:
        bar.close()


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
    if not _trainable(model):
        raise InputError("the model has no trainable parameters (requires_grad=True) to retrain")
    train = as_indexed(train_data, "training data")
    test = as_indexed(test_data, "test data")
    groups = normalize_removals(removals, len(train))
    meas = measurement if measurement is not None else loss_measurement(objective)
    job = _Job(copy.deepcopy(model), objective, meas, train, test, config)
    if workers > 1:
        _pickled_job(job)  # fail fast, before any work, if it cannot be sent to workers

    base = job.measure(job.model).detach().cpu()
    st = _Store(store, _store_config(job)) if store is not None else None

    wanted = [(), *dict.fromkeys(groups)]  # control run first, duplicates computed once
    done: dict[tuple[int, ...], _Outcome] = {}
    if st is not None:
        for removal in wanted:
            found = st.load(removal)
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
        bad = grad_norms > config.grad_tol
        if bool(bad.any()) or control.grad_norm > config.grad_tol:
            warnings.warn(
                f"{int(bad.sum())} of {len(groups)} retrains (control run: "
                f"{'not ' if control.grad_norm > config.grad_tol else ''}converged) stopped at "
                f"max_steps={config.max_steps} with ||grad J|| up to "
                f"{max(float(grad_norms.max()), control.grad_norm):.3g} > grad_tol="
                f"{config.grad_tol:g}; raise max_steps or lr, or loosen grad_tol",
                InflWarning,
                stacklevel=3,
            )
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
    measurement: PerExampleFn | None = None,
    init: InitName = "warm",
    optimizer: OptimizerName = "lbfgs",
    max_steps: int = 1000,
    lr: float | None = None,
    grad_tol: float | None = 1e-6,
    batch_size: int | None = None,
    momentum: float = 0.0,
    seed: int = 0,
    store: str | os.PathLike[str] | None = None,
    workers: int = 1,
    num_threads: int | None = None,
    parallel_runs: int | None = None,
    progress: bool = True,
) -> GroundTruth:
    """Retrain without each removal and measure the actual change of each test measurement.

    For each removal :math:`R` (``k`` of them) the model is retrained on the other
    :math:`n-|R|` examples, minimising

    .. math::

        J_{-R}(\\theta) = \\frac1{n-|R|}\\sum_{i\\notin R}\\ell(z_i;\\theta)
        + \\frac{\\lambda_{wd}}2\\|\\theta\\|^2

    with the protocol of ``init`` / ``optimizer`` / ``max_steps`` / ``grad_tol`` (see
    :class:`RetrainConfig`), and the result reports
    ``raw_change[j, r]`` :math:`= f(z_j;\\theta_{-R_r}) - f(z_j;\\theta^*)` — the same units and
    sign as :meth:`infl.InfluenceCalculator.removal_effect` — together with the control run
    (nothing removed, same protocol) and the control-corrected change
    :math:`f(z_j;\\theta_{-R_r}) - f(z_j;\\theta_c)`.

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
    measurement
        ``(model, batch) -> Tensor[b]``, :math:`f`; default: the per-example loss.
    init, optimizer, max_steps, lr, grad_tol, batch_size, momentum, seed
        The retraining protocol, see :class:`RetrainConfig`. The default (warm start, L-BFGS
        to :math:`\\|\\nabla J\\| \\le 10^{-6}`) suits small convex models in float64;
        Basu et al.'s fixed-budget protocol is ``optimizer="sgd", grad_tol=None,
        max_steps=...``.
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
    config = RetrainConfig(
        init=init,
        optimizer=optimizer,
        max_steps=max_steps,
        lr=lr,
        grad_tol=grad_tol,
        batch_size=batch_size,
        momentum=momentum,
        seed=seed,
    )
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
    measurement: PerExampleFn | None = None,
    init: InitName = "warm",
    optimizer: OptimizerName = "lbfgs",
    max_steps: int = 1000,
    lr: float | None = None,
    grad_tol: float | None = 1e-6,
    batch_size: int | None = None,
    momentum: float = 0.0,
    seed: int = 0,
    store: str | os.PathLike[str] | None = None,
    workers: int = 1,
    num_threads: int | None = None,
    parallel_runs: int | None = None,
    progress: bool = True,
) -> SubsetRetrain:
    """Retrain on random :math:`\\alpha`-fractions of the training data (for the LDS).

    Draws ``num_subsets`` subsets :math:`S_s` of :math:`\\lfloor \\alpha n \\rceil` examples
    uniformly without replacement (from ``subset_seed``), retrains on each (removing the
    complement, with the protocol of :func:`retrain_ground_truth`) and returns
    :math:`f(z_j;\\theta_{S_s})`. Park et al. (2023) use 100 subsets with
    :math:`\\alpha = 0.5` and retrain from scratch (``init="scratch"``); for convex models a
    warm start to a tight ``grad_tol`` reaches the same minimum faster.

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
        measurement=measurement,
        init=init,
        optimizer=optimizer,
        max_steps=max_steps,
        lr=lr,
        grad_tol=grad_tol,
        batch_size=batch_size,
        momentum=momentum,
        seed=seed,
        store=store,
        workers=workers,
        num_threads=num_threads,
        parallel_runs=parallel_runs,
        progress=progress,
    )
    outputs = gt.raw_change + gt.base_measurement[:, None]
    return SubsetRetrain(masks, outputs, gt.base_measurement, gt)


__all__ = [
    "GroundTruth",
    "RetrainConfig",
    "SubsetRetrain",
    "normalize_removals",
    "retrain_ground_truth",
    "retrain_subsets",
]
