"""Result records of retraining: one retrain's outcome, and the public results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from infl.retrain.config import RetrainConfig

__all__ = ["GroundTruth", "Outcome", "StopReason", "SubsetRetrain"]

StopReason = Literal["converged", "max_steps", "stalled"]
"""Why a retrain stopped: ``"converged"`` (``||grad J|| <= grad_tol``), ``"max_steps"`` (the
step budget ran out) or ``"stalled"`` (L-BFGS stopped on its own before ``max_steps``: its line
search or curvature test could make no more progress, and the gradient-only polish could not
lower ``||grad J||`` further: floating-point precision was exhausted, or ``J`` is not
differentiable there, e.g. at a ReLU kink). Every retrain that ends above ``grad_tol`` is
``"max_steps"`` or ``"stalled"``, and :func:`~infl.retrain_ground_truth` warns about it."""


@dataclass
class Outcome:
    """What one retrain (removal ``()`` is the control run) leaves behind."""

    removal: tuple[int, ...]
    measurement: torch.Tensor  # [m], on the CPU
    param_change_norm: float
    grad_norm: float
    steps: int
    stop: StopReason = "max_steps"


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
