"""The training objective (what was minimised) and measurements (what is explained).

The training objective is

.. math::

    J(\\theta) = \\frac1n \\sum_{i=1}^n \\ell(z_i;\\theta)
    + \\frac{\\lambda_{wd}}2\\|\\theta\\|^2,

where ``weight_decay`` = :math:`\\lambda_{wd}` means exactly what it means in
``torch.optim.SGD(weight_decay=...)``: pass the number you trained with. :math:`H = \\nabla^2 J`.

A *measurement* :math:`f(z;\\theta)` is the scalar whose change an influence score explains: the
test loss by default, or a logit, a margin, any per-example scalar of the model's output. The two
roles stay separate: the objective defines :math:`H` and the training gradients, the measurement
defines the test gradients.

Both are given as callables ``(model, batch) -> Tensor[b]`` returning one value per example,
where ``model`` is called like the user's module (it is the module evaluated at infl's
parameters) and ``batch`` is whatever the data holds for ``b`` examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from infl.errors import InputError

PerExampleFn = Callable[[Callable[..., Any], Any], torch.Tensor]
"""``(model, batch) -> Tensor[b]``: one scalar per example of the batch."""

LossName = Literal["cross_entropy", "mse", "bce_with_logits"]


def _split_supervised(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and {"inputs", "targets"} <= batch.keys():
        return batch["inputs"], batch["targets"]
    raise InputError(
        "the built-in losses expect batches of (inputs, targets) or "
        "{'inputs': ..., 'targets': ...}; got "
        f"{type(batch).__name__}. Pass your own loss callable (model, batch) -> Tensor[b]."
    )


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    diff = (outputs - targets.reshape(outputs.shape).to(outputs.dtype)) ** 2
    return diff.reshape(diff.shape[0], -1).sum(dim=1)


def _bce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    out = outputs.reshape(outputs.shape[0], -1)
    tgt = targets.reshape(out.shape).to(out.dtype)
    return F.binary_cross_entropy_with_logits(out, tgt, reduction="none").sum(dim=1)


_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": _cross_entropy,
    "mse": _mse,
    "bce_with_logits": _bce,
}


@dataclass(frozen=True)
class SupervisedLoss:
    """A built-in per-example loss for ``(inputs, targets)`` batches (picklable).

    Parameters
    ----------
    name
        ``"cross_entropy"`` (logits ``[b, C]``, integer targets ``[b]``), ``"mse"`` (squared
        error summed over output dimensions) or ``"bce_with_logits"`` (binary targets).
    """

    name: LossName

    def __post_init__(self) -> None:
        if self.name not in _LOSSES:
            raise InputError(f"unknown loss {self.name!r}; choose one of {sorted(_LOSSES)}")

    def __call__(self, model: Callable[..., Any], batch: Any) -> torch.Tensor:
        """``(model, batch) -> Tensor[b]``."""
        inputs, targets = _split_supervised(batch)
        return _LOSSES[self.name](model(inputs), targets)


def supervised_loss(name: LossName) -> PerExampleFn:
    """The built-in loss ``name`` as a callable ``(model, batch) -> Tensor[b]``."""
    return SupervisedLoss(name)


@dataclass(frozen=True)
class Objective:
    """The objective the model was trained to minimise.

    :math:`J(\\theta) = \\frac1n\\sum_i \\ell(z_i;\\theta) + \\frac{\\lambda_{wd}}2\\|\\theta\\|^2`.

    Parameters
    ----------
    loss
        :math:`\\ell`: the name of a built-in loss for ``(inputs, targets)`` batches
        (``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``) or a callable
        ``(model, batch) -> Tensor[b]`` giving one loss per example (no reduction).
    weight_decay
        :math:`\\lambda_{wd} \\ge 0`, as in ``torch.optim.SGD(weight_decay=...)``; it applies to
        every trainable parameter.

    Notes
    -----
    The *training gradient* of example ``i`` is the gradient of its term of the objective,
    :math:`g_i = \\nabla\\ell(z_i) + \\lambda_{wd}\\theta`, so that removing ``i`` and
    retraining with the same ``weight_decay`` minimises the mean of the other terms; at a
    minimum, :math:`\\sum_i g_i = 0`. Without weight decay this is the plain loss gradient.

    Examples
    --------
    >>> obj = Objective("cross_entropy", weight_decay=1e-3)
    >>> obj.weight_decay
    0.001
    """

    loss: LossName | PerExampleFn = "cross_entropy"
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.loss, str):
            object.__setattr__(self, "loss", supervised_loss(self.loss))
        elif not callable(self.loss):
            raise InputError(f"loss must be a name or a callable, got {type(self.loss).__name__}")
        wd = float(self.weight_decay)
        if not math.isfinite(wd) or wd < 0:
            raise InputError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        object.__setattr__(self, "weight_decay", wd)

    @property
    def per_example_loss(self) -> PerExampleFn:
        """:math:`\\ell` as a callable ``(model, batch) -> Tensor[b]``."""
        return self.loss  # type: ignore[return-value]


def loss_measurement(objective: Objective) -> PerExampleFn:
    """The default measurement: the objective's per-example loss (no weight decay term)."""
    return objective.per_example_loss


@dataclass(frozen=True)
class LogitMeasurement:
    """The logit of one class, for ``(inputs, targets)`` batches (picklable).

    Parameters
    ----------
    class_index
        Which logit to explain; ``None`` takes each example's own target class.
    """

    class_index: int | None = None

    def __call__(self, model: Callable[..., Any], batch: Any) -> torch.Tensor:
        """``(model, batch) -> Tensor[b]``."""
        inputs, targets = _split_supervised(batch)
        logits = model(inputs)
        if self.class_index is None:
            return logits.gather(1, targets.reshape(-1, 1).long()).squeeze(1)
        return logits[:, self.class_index]


@dataclass(frozen=True)
class MarginMeasurement:
    """The classification margin: target logit minus the largest other logit (picklable).

    Positive when the example is classified correctly.
    """

    def __call__(self, model: Callable[..., Any], batch: Any) -> torch.Tensor:
        """``(model, batch) -> Tensor[b]``."""
        inputs, targets = _split_supervised(batch)
        logits = model(inputs)
        tgt = targets.reshape(-1, 1).long()
        correct = logits.gather(1, tgt).squeeze(1)
        others = logits.scatter(1, tgt, float("-inf"))
        return correct - others.max(dim=1).values


def logit_measurement(class_index: int | None = None) -> PerExampleFn:
    """Measure the logit of ``class_index`` (``None``: each example's target class)."""
    return LogitMeasurement(class_index)


def margin_measurement() -> PerExampleFn:
    """Measure the classification margin (see :class:`MarginMeasurement`)."""
    return MarginMeasurement()
