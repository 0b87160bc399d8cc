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
:class:`SupervisedLoss` (built-in by name, or your own through :func:`supervised_loss`); it can
also apply :math:`\\partial^2 L/\\partial f^2` to a vector, which the generalised Gauss-Newton
curvature :math:`G = \\frac1n\\sum_i J_i^T (\\partial^2 L_i/\\partial f^2) J_i + \\lambda_{wd} I`
needs (:class:`~infl.operators.GaussNewtonOperator`).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
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


OutputLossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(outputs, targets) -> Tensor[b]``: a per-example loss of the model's outputs."""

OutputHessianFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(outputs, targets, u) -> H_out u``: the output-space Hessian of a per-example loss applied
to ``u`` (shaped like ``outputs``), example by example."""

IGNORE_INDEX = -100
"""``F.cross_entropy``'s default ``ignore_index``: such targets have zero loss and curvature."""


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def _cross_entropy_hessian(
    outputs: torch.Tensor, targets: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    # d^2/df^2 of -sum_c t_c log softmax(f)_c is (sum_c t_c) (diag(p) - p p^T)
    p = torch.softmax(outputs, dim=1)
    hu = p * u - p * (p * u).sum(dim=1, keepdim=True)
    if targets.is_floating_point():  # class probabilities [b, C]
        weight = targets.reshape(outputs.shape).sum(dim=1)
    else:  # class indices [b]
        weight = (targets.reshape(-1) != IGNORE_INDEX).to(outputs.dtype)
    return hu * weight.reshape(-1, *([1] * (outputs.dim() - 1)))


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    diff = (outputs - targets.reshape(outputs.shape).to(outputs.dtype)) ** 2
    return diff.reshape(diff.shape[0], -1).sum(dim=1)


def _mse_hessian(outputs: torch.Tensor, targets: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    # sum over output dimensions of (f - y)^2: the Hessian is 2I
    return 2 * u


def _bce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    out = outputs.reshape(outputs.shape[0], -1)
    tgt = targets.reshape(out.shape).to(out.dtype)
    return F.binary_cross_entropy_with_logits(out, tgt, reduction="none").sum(dim=1)


def _bce_hessian(outputs: torch.Tensor, targets: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    # sum over outputs of softplus(f) - t f: the Hessian is diag(sigma(f)(1 - sigma(f)))
    s = torch.sigmoid(outputs)
    return s * (1 - s) * u


_LOSSES: dict[str, OutputLossFn] = {
    "cross_entropy": _cross_entropy,
    "mse": _mse,
    "bce_with_logits": _bce,
}

_OUTPUT_HESSIANS: dict[str, OutputHessianFn] = {
    "cross_entropy": _cross_entropy_hessian,
    "mse": _mse_hessian,
    "bce_with_logits": _bce_hessian,
}


def _autograd_output_hessian(fn: OutputLossFn) -> OutputHessianFn:
    """``H_out u`` by forward-over-reverse autodiff of ``fn`` in its outputs argument."""

    def product(outputs: torch.Tensor, targets: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        def grad_out(out: torch.Tensor) -> torch.Tensor:
            return torch.func.grad(lambda o: fn(o, targets).sum())(out)

        return torch.func.jvp(grad_out, (outputs,), (u,))[1]

    return product


def _describe_callable(fn: Any) -> str:
    module = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qual}"


@dataclass(frozen=True, repr=False)
class SupervisedLoss:
    """A per-example loss of the model's outputs, for ``(inputs, targets)`` batches (picklable).

    :math:`\\ell(z_i;\\theta) = L(f(x_i;\\theta), y_i)` with :math:`f` the model and ``loss``
    = :math:`L`. Besides being a loss callable ``(model, batch) -> Tensor[b]`` it exposes the
    structure the Gauss-Newton curvature needs: :meth:`split` and
    :meth:`output_hessian_product` (:math:`\\partial^2 L/\\partial f^2` applied to a vector).

    Parameters
    ----------
    loss
        A built-in name — ``"cross_entropy"`` (logits ``[b, C]``, integer targets ``[b]`` or
        class probabilities ``[b, C]``), ``"mse"`` (squared error *summed* over output
        dimensions, no 1/2: output Hessian ``2I``) or ``"bce_with_logits"`` (binary targets,
        summed over outputs: output Hessian ``diag(σ(1-σ))``) — or a callable
        ``(outputs, targets) -> Tensor[b]``, one loss per example (no reduction).
    output_hessian
        For a callable ``loss`` only (built-ins have theirs): ``(outputs, targets, u) -> H u``
        where, example by example, :math:`(Hu)_i = \\partial^2 L(f_i, y_i)/\\partial f_i^2 \\,
        u_i` and ``u`` is shaped like ``outputs``; or ``"autograd"`` to differentiate ``loss``
        twice; or ``None`` (the Gauss-Newton curvature is then unavailable).
    """

    loss: LossName | OutputLossFn
    output_hessian: OutputHessianFn | Literal["autograd"] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.loss, str):
            if self.loss not in _LOSSES:
                raise InputError(f"unknown loss {self.loss!r}; choose one of {sorted(_LOSSES)}")
            if self.output_hessian is not None:
                raise InputError(
                    f"the built-in loss {self.loss!r} has its own exact output Hessian; "
                    "output_hessian is for losses given as callables (outputs, targets) -> "
                    "Tensor[b]"
                )
        elif not callable(self.loss):
            raise InputError(
                "loss must be a built-in name or a callable (outputs, targets) -> Tensor[b], "
                f"got {type(self.loss).__name__}"
            )
        if not (
            self.output_hessian is None
            or self.output_hessian == "autograd"
            or callable(self.output_hessian)
        ):
            raise InputError(
                "output_hessian must be a callable (outputs, targets, u) -> H_out u, "
                f"'autograd' or None, got {self.output_hessian!r}"
            )

    @property
    def name(self) -> str | None:
        """The built-in loss's name (``None`` for a callable)."""
        return self.loss if isinstance(self.loss, str) else None

    def split(self, batch: Any) -> tuple[Any, Any]:
        """``(inputs, targets)`` of a batch; the model's outputs are ``model(inputs)``."""
        return _split_supervised(batch)

    def loss_of_outputs(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """:math:`L(f_i, y_i)` for each example: ``[b]``."""
        fn = _LOSSES[self.loss] if isinstance(self.loss, str) else self.loss
        return fn(outputs, targets)

    def __call__(self, model: Callable[..., Any], batch: Any) -> torch.Tensor:
        """``(model, batch) -> Tensor[b]``."""
        inputs, targets = self.split(batch)
        return self.loss_of_outputs(model(inputs), targets)

    def check_targets(
        self,
        targets: Any,
        output_shape: tuple[int, ...] | None,
        *,
        offset: int = 0,
        what: str = "data",
    ) -> None:
        """Refuse targets the built-in ``"cross_entropy"`` cannot use, naming the example.

        Class indices must be a 1-d integer tensor ``[b]`` with values in ``0..C-1``, where
        ``C = output_shape[0]`` is the number of logits (``None``: the range is not checked).
        ``ignore_index`` targets (-100) are refused: their loss is 0, but
        ``F.cross_entropy(reduction="mean")`` divides by the number of the *other* examples,
        so the model was trained on those alone; drop them from the data. Class probabilities
        ``[b, C]`` (floating point) are accepted. Other losses are not checked. Cost: a few
        comparisons on ``b`` targets.

        Parameters
        ----------
        targets
            The targets of ``b`` examples.
        output_shape
            The shape of one example's output (without the batch dimension).
        offset
            Index of the first of these examples in the data (errors name ``offset + i``).
        what
            The data's name in messages.

        Raises
        ------
        InputError
            ``[b, 1]`` class indices, float class indices ``[b]``, labels out of range,
            ``ignore_index`` labels.
        """
        if self.loss != "cross_entropy" or not isinstance(targets, torch.Tensor):
            return
        if targets.is_floating_point():
            if targets.dim() == 1:
                raise InputError(
                    f"{what}: cross_entropy targets of shape {tuple(targets.shape)} are "
                    f"{targets.dtype}; class indices must be integers. Pass y.long() (or class "
                    "probabilities of shape [b, C])."
                )
            return
        if targets.dim() == 2 and targets.shape[1] == 1:
            raise InputError(
                f"{what}: cross_entropy targets have shape {tuple(targets.shape)}; class "
                "indices must be one per example, shape [b]. Pass y.squeeze(1) (or y.view(-1))."
            )
        if targets.dim() != 1:
            return
        ignored = torch.nonzero(targets == IGNORE_INDEX).reshape(-1)
        if ignored.numel():
            shown = ", ".join(str(offset + int(i)) for i in ignored[:5])
            more = f" (and {ignored.numel() - 5} more in this chunk)" if ignored.numel() > 5 else ""
            raise InputError(
                f"{what}: examples {shown}{more} have the ignore_index label {IGNORE_INDEX}. "
                "Their loss is 0, and F.cross_entropy(reduction='mean') divides by the number "
                "of the other examples, so the model was trained on the others alone; infl "
                "refuses them rather than count them in n. Drop them from the data, e.g. "
                f"keep = y != {IGNORE_INDEX}; (X[keep], y[keep])."
            )
        if output_shape is None or len(output_shape) < 1:
            return
        classes = int(output_shape[0])
        bad = torch.nonzero((targets < 0) | (targets >= classes)).reshape(-1)
        if bad.numel():
            first = int(bad[0])
            raise InputError(
                f"{what}: example {offset + first} has label {int(targets[first])}, but the "
                f"model outputs {classes} classes (labels must be in 0..{classes - 1}); "
                f"{bad.numel()} label(s) of this chunk are out of range. Check the label "
                "encoding (0-based?) and that the model's last layer has one output per class."
            )

    @property
    def has_output_hessian(self) -> bool:
        """Whether :meth:`output_hessian_product` is available (always, for built-ins)."""
        return isinstance(self.loss, str) or self.output_hessian is not None

    def output_hessian_product(
        self, outputs: torch.Tensor, targets: torch.Tensor, u: torch.Tensor
    ) -> torch.Tensor:
        """:math:`\\partial^2 L/\\partial f^2\\, u`, example by example (shaped like ``u``).

        Raises
        ------
        InputError
            If the loss is a callable given without ``output_hessian``.
        """
        if isinstance(self.loss, str):
            return _OUTPUT_HESSIANS[self.loss](outputs, targets, u)
        if self.output_hessian == "autograd":
            return _autograd_output_hessian(self.loss)(outputs, targets, u)
        if self.output_hessian is None:
            raise InputError(_no_output_hessian_message(self))
        return self.output_hessian(outputs, targets, u)

    def __repr__(self) -> str:
        # stable across processes (results stores fingerprint the loss by its repr)
        if isinstance(self.loss, str):
            return f"SupervisedLoss(name={self.loss!r})"
        hess = self.output_hessian
        hess_repr = (
            repr(hess) if hess is None or isinstance(hess, str) else _describe_callable(hess)
        )
        return f"SupervisedLoss(loss={_describe_callable(self.loss)}, output_hessian={hess_repr})"


def supervised_loss(
    loss: LossName | OutputLossFn,
    *,
    output_hessian: OutputHessianFn | Literal["autograd"] | None = None,
) -> SupervisedLoss:
    """A loss of the model's outputs as a callable ``(model, batch) -> Tensor[b]``.

    ``loss`` is a built-in name or a callable ``(outputs, targets) -> Tensor[b]``; batches are
    ``(inputs, targets)`` or ``{"inputs": ..., "targets": ...}`` and ``outputs =
    model(inputs)``. ``output_hessian`` (callables only) makes the Gauss-Newton curvature
    available; see :class:`SupervisedLoss`.

    Examples
    --------
    >>> import torch
    >>> def half_sq(out, y):
    ...     return 0.5 * ((out - y) ** 2).sum(dim=1)
    >>> loss = supervised_loss(half_sq, output_hessian=lambda out, y, u: u)
    >>> loss.has_output_hessian
    True
    """
    return SupervisedLoss(loss, output_hessian)


def output_hessian_loss(loss: PerExampleFn) -> SupervisedLoss:
    """``loss`` if it provides an output-space Hessian (the Gauss-Newton curvature needs one).

    Raises
    ------
    InputError
        If ``loss`` is a plain ``(model, batch)`` callable, or a :class:`SupervisedLoss` of a
        callable without ``output_hessian``; the message names the fixes.
    """
    if isinstance(loss, SupervisedLoss) and loss.has_output_hessian:
        return loss
    raise InputError(_no_output_hessian_message(loss))


def _no_output_hessian_message(loss: Any) -> str:
    return (
        f"the Gauss-Newton curvature needs the loss's Hessian in the model's outputs, and the "
        f"loss {loss!r} does not provide one. Either use curvature='hessian', or give the loss "
        "as infl.supervised_loss(fn, output_hessian=...) with fn(outputs, targets) -> Tensor[b] "
        "and output_hessian(outputs, targets, u) -> H_out u (or output_hessian='autograd'), or "
        "use a built-in loss ('cross_entropy', 'mse', 'bce_with_logits')"
    )


def _check_decay(value: Any, what: str) -> float:
    try:
        if isinstance(value, (bool, str)):
            raise TypeError
        wd = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number >= 0, got {value!r}") from None
    if not math.isfinite(wd) or wd < 0:
        raise InputError(f"{what} must be a finite number >= 0, got {value!r}")
    return wd


_GLOB_CHARS = frozenset("*?[")


def name_matches(pattern: str, name: str) -> bool:
    """Whether a ``no_decay`` pattern matches a parameter name (the one rule infl uses).

    A pattern with a glob character (``*``, ``?``, ``[``) matches when
    ``fnmatch.fnmatchcase(name, pattern)`` does (the whole name, case-sensitive). Any other
    pattern matches when it is a run of whole dot-separated components of the name:
    ``"bias"`` matches ``"fc.bias"`` and ``"fc.bias_ih"`` does not; ``"norm"`` matches
    ``"blocks.0.norm.weight"`` but not ``"blocks.0.layer_norm.weight"`` (write ``"*norm*"``
    for that); ``"LayerNorm.weight"`` matches ``"encoder.LayerNorm.weight"``.

    Examples
    --------
    >>> name_matches("bias", "layers.0.bias"), name_matches("norm", "ln_norm.weight")
    (True, False)
    >>> name_matches("*norm*", "ln_norm.weight")
    True
    """
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return f".{pattern}." in f".{name}."


@dataclass(frozen=True)
class WeightDecayGroups:
    """Weight decay that differs between parameters (picklable, hashable, stable repr).

    Parameter :math:`\\theta_j` (a named tensor) gets the coefficient :math:`\\lambda_j`:

    1. ``overrides[name]`` when its *full* name is a key of ``overrides``;
    2. else ``0`` when a ``no_decay`` pattern matches the name (:func:`name_matches`);
    3. else ``default``.

    Build it from a mapping through :class:`Objective` (``weight_decay={"default": 1e-2,
    "no_decay": ["bias", "norm"]}``) or from an optimizer (:meth:`Objective.from_optimizer`).

    Parameters
    ----------
    default
        :math:`\\lambda` of every parameter that no rule below names.
    no_decay
        Patterns of parameters without weight decay (biases, normalisation layers).
    overrides
        ``((full parameter name, λ), ...)``, sorted by name: exact names, no patterns.
    """

    default: float = 0.0
    no_decay: tuple[str, ...] = ()
    overrides: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any]) -> WeightDecayGroups:
        """Validate ``{"default": λ, "no_decay": [patterns], "overrides": {name: λ}}``.

        Raises
        ------
        InputError
            Unknown keys, a missing ``default``, negative or non-finite values, patterns that
            are not non-empty strings.
        """
        unknown = sorted(set(spec) - {"default", "no_decay", "overrides"})
        if unknown:
            raise InputError(
                f"weight_decay mapping has unknown key(s) {unknown}; the keys are 'default' "
                "(a number), 'no_decay' (a list of name patterns) and 'overrides' ({full "
                "parameter name: number})"
            )
        if "default" not in spec:
            raise InputError(
                "weight_decay mapping needs 'default' (the weight decay of every parameter "
                "no other rule names), e.g. {'default': 1e-2, 'no_decay': ['bias']}"
            )
        default = _check_decay(spec["default"], "weight_decay['default']")
        raw = spec.get("no_decay", ())
        if isinstance(raw, str) or not isinstance(raw, (list, tuple, set, frozenset)):
            raise InputError(
                "weight_decay['no_decay'] must be a list of name patterns, e.g. ['bias', "
                f"'norm'], got {raw!r}"
            )
        for pat in raw:
            if not isinstance(pat, str) or not pat:
                raise InputError(
                    f"weight_decay['no_decay'] patterns must be non-empty strings, got {pat!r}"
                )
        overrides = spec.get("overrides", {})
        if not isinstance(overrides, Mapping):
            raise InputError(
                "weight_decay['overrides'] must be a mapping {full parameter name: number}, "
                f"got {type(overrides).__name__}"
            )
        pairs = []
        for name, value in overrides.items():
            if not isinstance(name, str) or not name:
                raise InputError(f"weight_decay['overrides'] keys must be names, got {name!r}")
            pairs.append((name, _check_decay(value, f"weight_decay['overrides'][{name!r}]")))
        return cls(default, tuple(sorted(set(raw))), tuple(sorted(pairs)))

    def values(self, names: Sequence[str]) -> list[float]:
        """:math:`\\lambda_j` for each of ``names`` (the trainable parameters, in order).

        Raises
        ------
        InputError
            A ``no_decay`` pattern or an ``overrides`` name that matches none of ``names``
            (a typo would otherwise silently decay what it meant to exempt).
        """
        overrides = dict(self.overrides)
        missing = [n for n in overrides if n not in names]
        unmatched = [pat for pat in self.no_decay if not any(name_matches(pat, n) for n in names)]
        if missing or unmatched:
            shown = ", ".join(repr(n) for n in list(names)[:12])
            more = f" (and {len(names) - 12} more)" if len(names) > 12 else ""
            what = []
            if unmatched:
                what.append(f"no_decay pattern(s) {unmatched} match no trainable parameter")
            if missing:
                what.append(f"overrides name(s) {missing} are not trainable parameters")
            raise InputError(
                f"weight_decay: {'; '.join(what)}. The trainable parameters are {shown}{more}. "
                "A pattern matches whole dot-separated parts of a name ('bias' matches "
                "'fc.bias') or, with * ? [, the whole name as a glob ('*norm*'); overrides "
                "take full names. Fix or remove the pattern."
            )
        out = []
        for n in names:
            if n in overrides:
                out.append(overrides[n])
            elif any(name_matches(pat, n) for pat in self.no_decay):
                out.append(0.0)
            else:
                out.append(self.default)
        return out

    def settings(self) -> dict[str, Any]:
        """A JSON-serialisable record (stores key their results by it)."""
        return {
            "default": self.default,
            "no_decay": list(self.no_decay),
            "overrides": dict(self.overrides),
        }


def describe_weight_decay(weight_decay: float | WeightDecayGroups) -> str:
    """A short text for messages: ``0.01`` or ``{'default': 0.01, 'no_decay': ['bias']}``."""
    if not isinstance(weight_decay, WeightDecayGroups):
        return f"{float(weight_decay):g}"
    parts = [f"'default': {weight_decay.default:g}"]
    if weight_decay.no_decay:
        parts.append(f"'no_decay': {list(weight_decay.no_decay)}")
    if weight_decay.overrides:
        shown = ", ".join(f"{n!r}: {v:g}" for n, v in weight_decay.overrides[:6])
        more = ", ..." if len(weight_decay.overrides) > 6 else ""
        parts.append(f"'overrides': {{{shown}{more}}}")
    return "{" + ", ".join(parts) + "}"


WeightDecay = float | WeightDecayGroups | Mapping[str, Any]
"""What ``Objective(weight_decay=...)`` accepts: one λ, a mapping, or :class:`WeightDecayGroups`."""

_COUPLED_OPTIMIZERS = (
    "SGD",
    "Adam",
    "Adamax",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "ASGD",
    "Rprop",
    "LBFGS",
    "SparseAdam",
)


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
