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

A loss of the model's outputs, :math:`\\ell(z_i;\\theta) = L(f(x_i;\\theta), y_i)`, is a
:class:`SupervisedLoss` (built-in by name, or your own through :func:`supervised_loss`; both
live in :mod:`infl.losses`); it can also apply :math:`\\partial^2 L/\\partial f^2` to a vector,
which the generalised Gauss-Newton curvature needs. Weight decay per parameter is a
:class:`WeightDecayGroups` (:mod:`infl.weight_decay`). The names of both modules stay
importable from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from infl.errors import InputError
from infl.losses import (
    IGNORE_INDEX,
    LossName,
    OutputHessianFn,
    OutputLossFn,
    PerExampleFn,
    SupervisedLoss,
    _split_supervised,
    output_hessian_loss,
    supervised_loss,
)
from infl.weight_decay import (
    _COUPLED_OPTIMIZERS,
    WeightDecay,
    WeightDecayGroups,
    _check_decay,
    describe_weight_decay,
    name_matches,
)

__all__ = [
    "IGNORE_INDEX",
    "LogitMeasurement",
    "LossName",
    "MarginMeasurement",
    "Objective",
    "OutputHessianFn",
    "OutputLossFn",
    "PerExampleFn",
    "SupervisedLoss",
    "WeightDecay",
    "WeightDecayGroups",
    "describe_weight_decay",
    "logit_measurement",
    "loss_measurement",
    "margin_measurement",
    "name_matches",
    "output_hessian_loss",
    "supervised_loss",
]


@dataclass(frozen=True)
class Objective:
    """The objective the model was trained to minimise.

    :math:`J(\\theta) = \\frac1n\\sum_i \\ell(z_i;\\theta) + \\frac12\\theta^T\\Lambda\\theta`,
    :math:`\\Lambda = \\mathrm{diag}(\\lambda_j)` with one :math:`\\lambda_j` per named
    parameter tensor (all equal, :math:`\\Lambda = \\lambda_{wd}I`, for a single number).

    Parameters
    ----------
    loss
        :math:`\\ell`: the name of a built-in loss for ``(inputs, targets)`` batches
        (``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``), a
        :func:`supervised_loss` of your own loss of the outputs, or any callable
        ``(model, batch) -> Tensor[b]`` giving one loss per example (no reduction). The
        Gauss-Newton curvature (``InfluenceCalculator(..., curvature="gauss_newton")``) needs
        the loss's Hessian in the model's outputs: the built-ins have it, a
        ``supervised_loss(fn, output_hessian=...)`` supplies it, a plain callable does not.
    weight_decay
        :math:`\\lambda_{wd} \\ge 0`, as in ``torch.optim.SGD(weight_decay=...)``, for every
        trainable parameter; or parameter groups as a mapping ``{"default": λ, "no_decay":
        [patterns], "overrides": {full name: λ}}`` (see :class:`WeightDecayGroups` and
        :func:`name_matches` for the matching rule), or a :class:`WeightDecayGroups`; or use
        :meth:`from_optimizer` to read the groups of the optimizer you trained with. A
        mapping without ``no_decay``/``overrides`` is the single number ``default``.

    Attributes
    ----------
    weight_decay : float or WeightDecayGroups
        What was given, normalised. Code that needs :math:`\\Lambda` must not read it: use
        :meth:`decay_values` / :meth:`decay_vector` (one accessor for every use), or
        :attr:`uniform_weight_decay` where only a single number makes sense.

    Notes
    -----
    The *training gradient* of example ``i`` is the gradient of its term of the objective,
    :math:`g_i = \\nabla\\ell(z_i) + \\Lambda\\theta`, so that removing ``i`` and
    retraining with the same ``weight_decay`` minimises the mean of the other terms; at a
    minimum, :math:`\\sum_i g_i = 0`. Without weight decay this is the plain loss gradient.

    Examples
    --------
    >>> obj = Objective("cross_entropy", weight_decay=1e-3)
    >>> obj.weight_decay
    0.001
    >>> groups = Objective("cross_entropy", weight_decay={"default": 1e-2, "no_decay": ["bias"]})
    >>> groups.decay_values(["fc.weight", "fc.bias"])
    [0.01, 0.0]
    """

    loss: LossName | PerExampleFn = "cross_entropy"
    weight_decay: WeightDecay = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.loss, str):
            object.__setattr__(self, "loss", supervised_loss(self.loss))
        elif not callable(self.loss):
            raise InputError(f"loss must be a name or a callable, got {type(self.loss).__name__}")
        wd = self.weight_decay
        groups: WeightDecayGroups | None = None
        if isinstance(wd, WeightDecayGroups):
            groups = WeightDecayGroups.from_mapping(wd.settings())
        elif isinstance(wd, Mapping):
            groups = WeightDecayGroups.from_mapping(wd)
        if groups is None:
            object.__setattr__(self, "weight_decay", _check_decay(wd, "weight_decay"))
        elif not groups.no_decay and not groups.overrides:
            object.__setattr__(self, "weight_decay", groups.default)
        else:
            object.__setattr__(self, "weight_decay", groups)

    @property
    def per_example_loss(self) -> PerExampleFn:
        """:math:`\\ell` as a callable ``(model, batch) -> Tensor[b]``."""
        return self.loss  # type: ignore[return-value]

    @property
    def uniform_weight_decay(self) -> float | None:
        """The single :math:`\\lambda_{wd}` when every parameter has it, else ``None``."""
        return self.weight_decay if isinstance(self.weight_decay, float) else None

    @property
    def decay_groups(self) -> WeightDecayGroups | None:
        """The parameter groups, or ``None`` for a single number."""
        return self.weight_decay if isinstance(self.weight_decay, WeightDecayGroups) else None

    def decay_values(self, names: Sequence[str]) -> list[float]:
        """:math:`\\lambda_j` of each named trainable parameter, in the order given.

        Raises
        ------
        InputError
            A group rule that names no trainable parameter (see
            :meth:`WeightDecayGroups.values`).
        """
        groups = self.decay_groups
        if groups is None:
            return [float(self.weight_decay)] * len(names)  # type: ignore[arg-type]
        return groups.values(names)

    def decay_vector(
        self,
        names: Sequence[str],
        numels: Sequence[int],
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The diagonal of :math:`\\Lambda` on the flat parameter space: ``[p]``.

        ``names`` and ``numels`` are the trainable parameters and their sizes, in the order
        of the flat vector (``p = sum(numels)``).
        """
        uniform = self.uniform_weight_decay
        if uniform is not None:
            return torch.full((sum(numels),), uniform, dtype=dtype, device=device)
        values = torch.tensor(self.decay_values(names), dtype=dtype, device=device)
        counts = torch.tensor(list(numels), dtype=torch.long, device=values.device)
        return torch.repeat_interleave(values, counts)

    def decay_settings(self) -> float | dict[str, Any]:
        """The weight decay as a JSON-serialisable record (a float stays a float)."""
        groups = self.decay_groups
        return float(self.weight_decay) if groups is None else groups.settings()  # type: ignore[arg-type]

    @classmethod
    def from_optimizer(
        cls,
        loss: LossName | PerExampleFn,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module,
        *,
        decoupled: Literal["refuse", "as_l2"] = "refuse",
    ) -> Objective:
        """The objective with the weight decay of each of ``optimizer``'s parameter groups.

        Each trainable parameter of ``model`` (``named_parameters()``, ``requires_grad``) is
        found in the optimizer's groups by identity and gets that group's ``weight_decay``
        (0 for optimizers without one: Rprop, L-BFGS). ``torch.optim.SGD``, ``Adam``,
        ``Adamax``, ``NAdam``, ``RAdam``, ``RMSprop``, ``Adagrad``, ``Adadelta``, ``ASGD`` add
        :math:`\\lambda\\theta` to the gradient (L2), the meaning infl uses.

        Decoupled decay (``AdamW``, or ``decoupled_weight_decay=True``) shrinks the weights
        directly, :math:`\\theta \\leftarrow (1-\\eta\\beta)\\theta - \\eta u` with update
        :math:`u`. Its fixed point solves :math:`u = -\\beta\\theta`: for a plain gradient
        update (:math:`u = \\nabla L`) that is the minimum of :math:`L +
        \\frac\\beta2\\|\\theta\\|^2`, L2 coefficient :math:`\\beta` (a decay *not* scaled by
        :math:`\\eta`, :math:`\\theta \\leftarrow (1-\\beta)\\theta - \\eta\\nabla L`, would
        give :math:`\\beta/\\eta`); for Adam's preconditioned update
        :math:`u = \\hat m/(\\sqrt{\\hat v}+\\epsilon)` it is no L2 minimum at all (the
        coefficient would be :math:`\\beta(\\sqrt{\\hat v_j}+\\epsilon)`, per coordinate). So
        ``decoupled="refuse"`` (default) refuses; ``decoupled="as_l2"`` takes
        :math:`\\beta` as the L2 coefficient, exact for an SGD-like update and an
        approximation for AdamW: check ``InfluenceCalculator``'s stationarity warning.

        Parameters
        ----------
        loss
            :math:`\\ell`, as for :class:`Objective`.
        optimizer
            The optimizer the model was trained with (its ``param_groups`` are read).
        model
            The trained model whose parameters the optimizer holds.
        decoupled
            ``"refuse"`` or ``"as_l2"`` for decoupled weight decay (see above).

        Raises
        ------
        InputError
            A trainable parameter in no group (named); a parameter the optimizer holds that
            is not one of the model's; decoupled decay with ``decoupled="refuse"``; an
            optimizer outside ``torch.optim`` (its ``weight_decay`` may mean anything: pass
            the mapping form).

        Examples
        --------
        >>> from torch import nn
        >>> net = nn.Linear(3, 2)
        >>> opt = torch.optim.SGD([{"params": [net.weight], "weight_decay": 1e-2},
        ...                        {"params": [net.bias], "weight_decay": 0.0}], lr=0.1)
        >>> Objective.from_optimizer("cross_entropy", opt, net).decay_values(["weight", "bias"])
        [0.01, 0.0]
        """
        if decoupled not in ("refuse", "as_l2"):
            raise InputError(f"decoupled must be 'refuse' or 'as_l2', got {decoupled!r}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InputError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        kind = type(optimizer).__name__
        is_adamw = isinstance(optimizer, torch.optim.AdamW)
        if not is_adamw and (
            type(optimizer).__module__.split(".")[:2] != ["torch", "optim"]
            or kind not in _COUPLED_OPTIMIZERS
        ):
            raise InputError(
                f"optimizer {type(optimizer).__module__}.{kind} is not one of torch.optim's "
                f"L2-decay optimizers {list(_COUPLED_OPTIMIZERS)}, so what its weight_decay "
                "means is unknown to infl. Pass the decay explicitly: Objective(loss, "
                "weight_decay={'default': ..., 'no_decay': [...], 'overrides': {...}})"
            )
        by_id: dict[int, float] = {}
        for index, group in enumerate(optimizer.param_groups):
            wd = _check_decay(group.get("weight_decay", 0.0), f"param_groups[{index}].weight_decay")
            is_decoupled = is_adamw or bool(group.get("decoupled_weight_decay", False))
            if is_decoupled and wd > 0 and decoupled == "refuse":
                raise InputError(
                    f"{kind} param_groups[{index}] uses decoupled weight decay ({wd:g}): it "
                    "shrinks the weights directly instead of adding the gradient of "
                    "(weight_decay/2)||theta||^2, and with Adam's preconditioning the trained "
                    "weights minimise no L2-regularised objective. Pass decoupled='as_l2' to "
                    "take the coefficient as an L2 weight decay (exact for SGD-like updates, an "
                    "approximation for AdamW: check the stationarity warning), or give the "
                    "weight_decay mapping explicitly"
                )
            for param in group["params"]:
                by_id[id(param)] = wd
        named = list(model.named_parameters())
        known = {id(p) for _, p in named}
        foreign = [i for i in by_id if i not in known]
        if foreign:
            raise InputError(
                f"the optimizer holds {len(foreign)} parameter(s) that are not parameters of "
                "the model given; pass the model this optimizer trained"
            )
        trainable = [(n, p) for n, p in named if p.requires_grad]
        orphans = [n for n, p in trainable if id(p) not in by_id]
        if orphans:
            raise InputError(
                f"trainable parameter(s) {orphans} are in none of the optimizer's param_groups, "
                "so their weight decay is unknown (and they were not trained by it). Add them "
                "to a group, or freeze them (requires_grad_(False)) before building infl's "
                "objects"
            )
        names = [n for n, _ in trainable]
        decays = [by_id[id(p)] for _, p in trainable]
        if len(set(decays)) <= 1:
            return cls(loss, decays[0] if decays else 0.0)
        sizes: dict[float, int] = {}
        for (_, p), v in zip(trainable, decays, strict=True):
            sizes[v] = sizes.get(v, 0) + p.numel()
        default = max(sizes, key=lambda v: sizes[v])
        overrides = {n: v for n, v in zip(names, decays, strict=True) if v != default}
        return cls(
            loss, WeightDecayGroups.from_mapping({"default": default, "overrides": overrides})
        )


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
