"""Supervised losses of the model's outputs and their output-space Hessians.

A loss of the model's outputs, :math:`\\ell(z_i;\\theta) = L(f(x_i;\\theta), y_i)`, is a
:class:`SupervisedLoss` (built-in by name, or your own through :func:`supervised_loss`); it can
also apply :math:`\\partial^2 L/\\partial f^2` to a vector, which the generalised Gauss-Newton
curvature :math:`G = \\frac1n\\sum_i J_i^T (\\partial^2 L_i/\\partial f^2) J_i + \\lambda_{wd} I`
needs (:class:`~infl.operators.GaussNewtonOperator`).

Every name here is also importable from :mod:`infl.objective`, and :class:`SupervisedLoss`
keeps ``infl.objective`` as its ``__module__``: pickles and store fingerprints name the class
by that path, so results stored before this module existed stay valid.
"""

from __future__ import annotations

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

    # the path pickles and store fingerprints name (stores made before infl.losses stay valid)
    __module__ = "infl.objective"

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
        if targets.dim() != 1 or targets.numel() == 0:
            return
        low, high = (int(v) for v in torch.aminmax(targets))
        limit = int(output_shape[0]) if output_shape else None
        if low >= 0 and (limit is None or high < limit):
            return  # the common case, in one reduction; below, the examples are named
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
