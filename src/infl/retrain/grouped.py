"""Full-batch SGD retrains in groups, on the batched engine (:mod:`infl.retrain.batched`).

:class:`GroupedRetrain` runs a group of removals (``()`` is the control run) as one
:class:`~infl.retrain.batched.BatchedSGD`, with the stopping rule, step count, final gradient
norm and parameter change of :meth:`RetrainJob.run <infl.retrain.single.RetrainJob.run>`: a
run whose :math:`\\|\\nabla J_{-R}\\|` reaches ``grad_tol`` is frozen (masked) while the others
go on. Only the order of floating-point operations differs from the one-by-one path.
:func:`grouped_retrain` decides, once, whether the batched path applies, gives the same
gradient as plain autograd, and (optionally) is faster.
"""

from __future__ import annotations

import copy
import math
import time

import torch

from infl.retrain.batched import BatchedSGD
from infl.retrain.records import Outcome
from infl.retrain.single import RetrainJob, trainable

__all__ = ["CHECK_EVERY", "DEFAULT_GROUP", "GroupedRetrain", "grouped_retrain"]

DEFAULT_GROUP = 32
"""Retrains per group when ``parallel_runs=None``."""

CHECK_EVERY = 64
"""Steps between the finiteness checks of a fixed-length (``grad_tol=None``) group: the
objective's value and gradient norm, which such a run needs for nothing else, cost about a
quarter of a step on the fragility study's Iris MLPs."""

_BATCHED_EXAMPLES = 1 << 15  # runs x examples per vmapped gradient evaluation (memory bound)
_PROBE_RUNS = 8  # runs in the trial batched gradient that decides whether batching pays
_BATCHED_MIN_SPEEDUP_INV = 0.8  # batched must take < 0.8x the time of the runs one by one
_PROBE_MIN_SCALE = 0.01
"""The smallest parameter scale the probe's random step is a tenth of (see ``probe``)."""


class GroupedRetrain:
    """Full-batch SGD (with momentum) for groups of up to ``max_runs`` retrains of ``job``."""

    def __init__(self, job: RetrainJob, max_runs: int) -> None:
        self.job = job
        cfg = job.config
        net = copy.deepcopy(job.model)
        if cfg.init == "scratch":
            job.reinit(net)
        n = len(job.train)
        self.engine = BatchedSGD(
            net,
            job.objective.per_example_loss,
            job.decays,
            job.train,
            lr=cfg.learning_rate,
            momentum=cfg.momentum,
            chunk_size=max(1, min(n, _BATCHED_EXAMPLES // max(1, max_runs))),
        )

    def weights(self, group: list[tuple[int, ...]]) -> torch.Tensor:
        """``[R, n]``: :math:`n/(n-|R_r|)` on the kept examples of run ``r``, 0 on removed."""
        n = len(self.job.train)
        w = torch.ones(len(group), n, dtype=self.job.dtype, device=self.job.device)
        for r, removal in enumerate(group):
            if removal:
                w[r] *= n / (n - len(removal))
                w[r, list(removal)] = 0.0
        return w

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
            raise self.job.failure(group[r], int(steps[r]), v)

    def probe(self, runs: int, *, check_speed: bool) -> bool:
        """Batched gradient == plain autograd's (and faster per retrain).

        Compares the control objective's gradient from ``runs`` stacked copies with
        :meth:`RetrainJob.objective_backward` (to :math:`\\sqrt{\\epsilon}` relative), and with
        ``check_speed`` times one batched evaluation against ``runs`` plain ones (the batching
        rules of some layers, e.g. convolutions on a CPU, are slower than running the
        retrains one by one).

        Both are evaluated at the start moved by a seeded random step: in each coordinate a
        tenth of the mean absolute parameter, or of :data:`_PROBE_MIN_SCALE` when the
        parameters are smaller. At the start itself, a trained minimum, the gradient is a sum
        of per-example terms that cancel to about round-off, so a relative test would compare
        round-off with round-off and refuse a correct engine (on the fragility study's Iris
        MLPs that weight decay collapsed to zero, every retrain then ran one by one).
        """
        engine = self.engine
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(engine.start.shape, generator=gen, dtype=engine.start.dtype)
        scale = float(engine.start.abs().mean()) if engine.start.numel() else 0.0
        step = 0.1 * max(scale, _PROBE_MIN_SCALE)
        point = engine.start + step * noise.to(engine.device)
        net = copy.deepcopy(engine.net)
        params = trainable(net)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(point, params)

        def plain() -> torch.Tensor:
            self.job.objective_backward(net, params, self.job.train)
            return torch.cat(
                [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params]
            )

        ref = plain()
        clock = time.perf_counter()
        plain()
        t_plain = time.perf_counter() - clock
        engine.begin(self.weights([()] * runs))
        engine.theta = point.unsqueeze(0).repeat(runs, 1)
        got, _, _ = engine.gradient()
        clock = time.perf_counter()
        engine.gradient()
        t_batched = time.perf_counter() - clock
        engine.begin(self.weights([()] * runs))  # back at the start
        if not bool(torch.isfinite(ref).all() and torch.isfinite(got).all()):
            return False
        tol = math.sqrt(torch.finfo(self.job.dtype).eps) * (float(ref.norm()) + 1e-12)
        if not bool((got - ref).norm(dim=1).max() <= tol):
            return False
        return not check_speed or t_batched < _BATCHED_MIN_SPEEDUP_INV * runs * t_plain

    def run(self, group: list[tuple[int, ...]]) -> list[Outcome]:
        """Retrain every removal of ``group`` (``()`` is the control run) at once."""
        cfg = self.job.config
        engine = self.engine
        runs = len(group)
        tol = cfg.grad_tol
        engine.begin(self.weights(group))
        device = engine.device
        steps = torch.zeros(runs, dtype=torch.long, device=device)
        active = torch.ones(runs, dtype=torch.bool, device=device)
        if tol is None:
            # a fixed step count: no norm is needed to stop, so the objective is checked every
            # CHECK_EVERY steps (a non-finite run stays non-finite, so none is missed)
            for i in range(cfg.max_steps):
                if i % CHECK_EVERY == 0:
                    grad, value, gnorm = engine.gradient()
                    self._check(group, active, torch.full_like(steps, i), value, gnorm)
                else:
                    grad = engine.gradient_only()
                engine.step(grad)
            steps += cfg.max_steps
        else:
            for _ in range(cfg.max_steps):
                grad, value, gnorm = engine.gradient()
                self._check(group, active, steps, value, gnorm)
                active = active & (gnorm > tol)
                if not bool(active.any()):
                    break
                engine.step(grad, active)  # frozen runs keep their parameters
                steps += active.long()
        _, value, gnorm = engine.gradient()
        self._check(group, torch.ones_like(active), steps, value, gnorm)
        flat = engine.theta
        delta = torch.linalg.vector_norm(flat - self.job.theta_star, dim=1)
        outcomes = []
        for r, removal in enumerate(group):
            measured = self.job.measure(engine.module(flat[r])).detach().cpu()
            converged = tol is not None and float(gnorm[r]) <= tol
            outcomes.append(
                Outcome(
                    removal,
                    measured,
                    float(delta[r]),
                    float(gnorm[r]),
                    int(steps[r]),
                    "converged" if converged else "max_steps",
                )
            )
        engine.module(engine.start)
        return outcomes


def grouped_retrain(
    job: RetrainJob, parallel_runs: int, num_runs: int, *, check_speed: bool
) -> GroupedRetrain | None:
    """A :class:`GroupedRetrain` when it applies, is right (and faster), else ``None``."""
    cfg = job.config
    if cfg.optimizer != "sgd" or cfg.batch_size is not None or parallel_runs < 2:
        return None
    if cfg.target != "loo":  # the batched engine minimises J_{-R} only
        return None
    try:
        grouped = GroupedRetrain(job, parallel_runs)
        if grouped.probe(min(parallel_runs, num_runs, _PROBE_RUNS), check_speed=check_speed):
            return grouped
    except Exception:  # vmap/functional_call fail in many ways on unsupported models
        pass
    return None
