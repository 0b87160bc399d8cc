"""One retrain through :mod:`torch.optim`, on a deep copy of the user's module.

:class:`RetrainJob` holds everything a retrain needs (the trained model, the objective, the
measurement, the data and the :class:`~infl.retrain.RetrainConfig`) and is picklable when those
are, so the same object runs retrains in this process or in worker processes
(:func:`run_one`). Full-batch SGD, minibatch SGD/Adam and L-BFGS (strong-Wolfe line search,
finished near the minimum by a gradient-only polish; the engine of
:func:`~infl.retrain.fit_to_minimum` in :mod:`infl.retrain.fit`) all minimise

.. math::

    J_{-R}(\\theta) = \\frac1{n-|R|}\\sum_{i\\notin R}\\ell(z_i;\\theta)
    + \\frac12\\sum_j \\lambda_j\\|\\theta_j\\|^2

with the weight-decay term (one :math:`\\lambda_j` per parameter tensor, from
:meth:`~infl.objective.Objective.decay_values`) added to the loss explicitly (the optimizers'
own ``weight_decay`` is not used). Plain autograd only: nothing here imports
:mod:`infl.calculator` or :mod:`infl.model`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import nn

from infl.data import IndexedData, batch_to, tensor_leaves
from infl.errors import InputError, NonFiniteError
from infl.objective import Objective, PerExampleFn
from infl.retrain.config import RetrainConfig
from infl.retrain.fit import (
    EVAL_CHUNK,
    decay_term,
    full_batch_backward,
    grad_norm_of,
    lbfgs_to_tolerance,
)
from infl.retrain.pbrf import PBRFObjective
from infl.retrain.records import Outcome, StopReason

__all__ = ["EVAL_CHUNK", "RetrainJob", "flat_params", "run_one", "trainable"]


def trainable(net: nn.Module) -> list[torch.Tensor]:
    return [p for _, p in net.named_parameters() if p.requires_grad]


def flat_params(params: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


class RetrainJob:
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
        params = trainable(model)
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.decays: list[float] = objective.decay_values(names)
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.theta_star = flat_params(params)
        self.pbrf: PBRFObjective | None = None
        if config.target == "pbrf":
            self.pbrf = PBRFObjective(
                model, objective, train, config.proximity, EVAL_CHUNK, self.device, self.dtype
            )

    # -- pieces ---------------------------------------------------------------------------
    def measure(self, net: nn.Module) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for _, batch in self.test.chunks(EVAL_CHUNK):
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

    def objective_backward(
        self,
        net: nn.Module,
        params: list[torch.Tensor],
        data: IndexedData,
        removal: tuple[int, ...] = (),
    ) -> torch.Tensor:
        """Accumulate :math:`\\nabla J` into ``.grad`` (zeroed first); return :math:`J` (0-d).

        For ``target="pbrf"`` the objective is :math:`J^{PBRF}_R` of ``removal`` (over all the
        training data, :mod:`infl.retrain.pbrf`) and ``data`` is not used.
        """
        if self.pbrf is not None:
            return self.pbrf.backward(net, params, removal)
        return full_batch_backward(
            net, params, self.objective.per_example_loss, self.decays, data, self.device,
            self.dtype,
        )  # fmt: skip

    def decay_term(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """:math:`\\frac12\\sum_j\\lambda_j\\|\\theta_j\\|^2` (``None`` without decay)."""
        return decay_term(params, self.decays)

    grad_norm_of = staticmethod(grad_norm_of)

    def reinit(self, net: nn.Module) -> None:
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

    def failure(
        self, removal: tuple[int, ...], step: int, value: float, *, where: str = ""
    ) -> NonFiniteError:
        """The error of a retrain whose objective or gradient became ``value`` (non-finite)."""
        what = f"removal {list(removal)}" if removal else "the control run"
        lr = self.config.learning_rate
        if self.config.optimizer == "lbfgs":
            fix = (
                f"lower lr (now {lr}, L-BFGS's first step length), retrain in float64, or "
                "check that the loss is finite at the trained parameters"
            )
        else:
            fix = f"lower lr (now {lr}) or use optimizer='lbfgs'"
        return NonFiniteError(
            f"retraining for {what} stopped at step {step}: the objective or its gradient became "
            f"non-finite ({value}){where}, so it diverged; {fix}"
        )

    # -- the retrain ----------------------------------------------------------------------
    def run(self, removal: tuple[int, ...]) -> Outcome:
        cfg = self.config
        net = copy.deepcopy(self.model)
        if cfg.init == "scratch":
            self.reinit(net)
        params = trainable(net)
        pbrf = self.pbrf is not None  # the PBRF runs over all n examples
        data = self.train.without(list(removal)) if removal and not pbrf else self.train
        tol = cfg.grad_tol
        steps = 0
        stalled = False

        if cfg.optimizer == "lbfgs":
            steps, stalled = self._run_lbfgs(net, params, data, removal)
        elif cfg.batch_size is None:
            opt = self._first_order(params)
            while steps < cfg.max_steps:
                value = float(self.objective_backward(net, params, data, removal))
                gnorm = self.grad_norm_of(params)
                if not (math.isfinite(value) and math.isfinite(gnorm)):
                    raise self.failure(removal, steps, value if not math.isfinite(value) else gnorm)
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
                    reg = self.decay_term(params)
                    if reg is not None:
                        loss = loss + reg
                    if not torch.isfinite(loss):
                        raise self.failure(removal, steps, float(loss))
                    loss.backward()
                    opt.step()
                    steps += 1
                    if steps >= cfg.max_steps:
                        done = True
                        break
                if not done and tol is not None:
                    self.objective_backward(net, params, data, removal)
                    done = self.grad_norm_of(params) <= tol

        self.objective_backward(net, params, data, removal)
        gnorm = self.grad_norm_of(params)
        for p in params:
            p.grad = None
        if not math.isfinite(gnorm):
            raise self.failure(removal, steps, gnorm)
        stop: StopReason
        if tol is not None and gnorm <= tol:
            stop = "converged"
        elif stalled and steps < cfg.max_steps:
            stop = "stalled"
        else:
            stop = "max_steps"
        delta = float(torch.linalg.vector_norm(flat_params(params) - self.theta_star))
        return Outcome(removal, self.measure(net).detach().cpu(), delta, gnorm, steps, stop)

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
    ) -> tuple[int, bool]:
        """L-BFGS to ``grad_tol``: the steps taken and whether it stalled before ``max_steps``.

        The engine of :func:`~infl.retrain.fit_to_minimum`
        (:func:`~infl.retrain.fit.lbfgs_to_tolerance`), on this retrain's objective.
        """
        cfg = self.config

        def closure() -> torch.Tensor:
            return self.objective_backward(net, params, data, removal)

        def failure(step: int, value: float, where: str) -> Exception:
            return self.failure(removal, step, value, where=where)

        return lbfgs_to_tolerance(
            params, closure, grad_tol=cfg.grad_tol, max_iter=cfg.max_steps,
            lr=cfg.learning_rate, failure=failure,
        )  # fmt: skip


def run_one(removal: tuple[int, ...], job: RetrainJob) -> Outcome:
    """``job.run(removal)``, as a module-level function for :func:`infl.parallel.run_tasks`."""
    return job.run(removal)
