"""The retraining protocol: how each retrain is run, as one frozen, validated record."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from infl.errors import InputError

__all__ = ["InitName", "OptimizerName", "RetrainConfig", "TargetName"]

InitName = Literal["warm", "scratch"]
OptimizerName = Literal["sgd", "adam", "lbfgs"]
TargetName = Literal["loo", "pbrf"]

_DEFAULT_LR: dict[str, float] = {"sgd": 0.1, "adam": 1e-3, "lbfgs": 1.0}


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
    target
        What each retrain minimises. ``"loo"`` (default): the objective without the removed
        examples, :math:`J_{-R}`. ``"pbrf"``: the proximal Bregman response function of Bae et
        al. (2022), :math:`J^{PBRF}_R` (see :mod:`infl.retrain.pbrf`), which is what damped
        Gauss-Newton influence approximates in deep networks. PBRF needs a loss of the model's
        outputs (a built-in name or :func:`~infl.objective.supervised_loss`), full batches
        (``batch_size=None``) and a warm start (``init="warm"``: it is defined around
        :math:`\\theta^*`).
    proximity
        :math:`\\lambda \\ge 0` of the PBRF's proximity term
        :math:`\\frac\\lambda2\\|\\theta-\\theta^*\\|^2`: the damping of the influence it is
        compared with. Only for ``target="pbrf"`` (must stay 0 for ``"loo"``).
    """

    init: InitName = "warm"
    optimizer: OptimizerName = "lbfgs"
    max_steps: int = 1000
    lr: float | None = None
    grad_tol: float | None = 1e-6
    batch_size: int | None = None
    momentum: float = 0.0
    seed: int = 0
    target: TargetName = "loo"
    proximity: float = 0.0

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
        self._check_target()

    def _check_target(self) -> None:
        if self.target not in ("loo", "pbrf"):
            raise InputError(
                f"target must be 'loo' (leave-one-out retraining) or 'pbrf' (the proximal "
                f"Bregman response function), got {self.target!r}"
            )
        try:
            proximity = float(self.proximity)
        except (TypeError, ValueError):
            proximity = math.nan
        if not (math.isfinite(proximity) and proximity >= 0):
            raise InputError(f"proximity must be a finite number >= 0, got {self.proximity!r}")
        object.__setattr__(self, "proximity", proximity)
        if self.target == "loo" and proximity != 0:
            raise InputError(
                f"proximity={proximity} is the PBRF's damping term; leave-one-out retraining "
                "has none. Use target='pbrf' with it, or drop proximity"
            )
        if self.target == "pbrf":
            if self.batch_size is not None:
                raise InputError(
                    "target='pbrf' retrains with full batches (the PBRF's Bregman term is over "
                    f"all n examples); use batch_size=None, got batch_size={self.batch_size}"
                )
            if self.init != "warm":
                raise InputError(
                    "target='pbrf' is defined around the trained parameters and starts there; "
                    f"use init='warm', got init={self.init!r}"
                )

    @property
    def learning_rate(self) -> float:
        """The learning rate actually used (``lr`` with its default filled in)."""
        assert self.lr is not None
        return self.lr
