"""Checks of a model and its data before influence is computed.

* :func:`check_eval_mode`: no dropout or batch-norm layer left in training mode;
* :func:`as_training_data`: the data as :class:`~infl.data.IndexedData`, refusing a list of
  per-example pairs;
* :func:`check_first_examples`, :func:`forward_error` and :func:`_check_deterministic`: what
  :meth:`ModelWrapper.check_data <infl.model.ModelWrapper.check_data>` runs, and says when the
  first few examples cannot be evaluated, or evaluate differently twice;
* :func:`measure_stationarity` and :class:`Stationarity`: how far the trained parameters are
  from a minimum of the objective, from one pass of training gradients;
* :func:`shortcut_agrees` and :func:`single_example_grads`: the check of a per-example-gradient
  shortcut (:mod:`infl.linear_grads`, :mod:`infl.layer_grads`) against plain autograd on
  examples taken alone, skipped where :func:`rowwise_by_construction` proves it.

:class:`~infl.model.ModelWrapper` calls these; this module never imports :mod:`infl.model` at
run time.
Every name here is also importable from :mod:`infl.model`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from infl.chunking import ActivationProbe
from infl.data import Batch, IndexedData, slice_batch, tensor_leaves
from infl.errors import InflError, InflWarning, InputError, ModelStateError
from infl.objective import Objective, WeightDecayGroups, describe_weight_decay

if TYPE_CHECKING:
    from infl.model import ModelWrapper

_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)

CHECK_EXAMPLES = 4
"""Examples of the first chunk that :meth:`ModelWrapper.check_data` evaluates."""


def check_first_examples(
    wrapper: ModelWrapper, data: IndexedData, measure_activations: bool = True
) -> tuple[tuple[int, ...] | None, int | None]:
    """The body of :meth:`ModelWrapper.check_data <infl.model.ModelWrapper.check_data>`: the
    first :data:`CHECK_EXAMPLES` examples evaluated twice (once for a model that
    :func:`rowwise_by_construction` accepts: deterministic by its structure), PyTorch's errors
    turned into
    :class:`~infl.errors.InputError`; returns the model's output shape per example (``None``
    for a loss that is not a built-in supervised one, or an output that is not a tensor) and
    the bytes per example of the largest tensor a submodule output in the first evaluation
    (:class:`~infl.chunking.ActivationProbe`; ``None`` without ``measure_activations``: its
    hooks cost about 0.09 ms on the Iris MLP, a quarter of this check)."""
    # imported here: at module level they would close an import cycle through infl.losses
    from infl.losses import SupervisedLoss
    from infl.second_order import functional_evaluation

    k = min(len(data), CHECK_EXAMPLES)
    batch = wrapper.prepare(data.select(range(k)))
    loss = wrapper.objective.per_example_loss
    model = wrapper.functional_model(wrapper.params)

    def explained(run: Callable[[], Any], inputs: Batch) -> Any:
        try:
            return run()
        except InflError:
            raise
        except (RuntimeError, IndexError, TypeError, ValueError) as err:
            raise forward_error(err, inputs, data.name, k, wrapper.model, wrapper.dtype) from err

    shape = None
    probe = ActivationProbe()
    watch = probe.watching if measure_activations else _unwatched
    # a chain of linear layers and element-wise activations is deterministic, and holds no
    # attention for functional_evaluation to switch
    rowwise = rowwise_by_construction(wrapper, loss)
    with torch.no_grad(), contextlib.nullcontext() if rowwise else functional_evaluation():
        if isinstance(loss, SupervisedLoss):
            inputs, targets = loss.split(batch)
            loss.check_targets(targets, None, what=data.name)
            with watch(wrapper.model, k):
                first = explained(lambda: model(inputs), inputs)
            if isinstance(first, torch.Tensor):
                shape = tuple(first.shape[1:])
                loss.check_targets(targets, shape, what=data.name)
            explained(lambda: loss.loss_of_outputs(first, targets), inputs)
            second = first if rowwise else model(inputs)
        else:
            with watch(wrapper.model, k):
                first = explained(lambda: wrapper._batch_value(loss, wrapper.params, batch), batch)
            second = wrapper._batch_value(loss, wrapper.params, batch)
    _check_deterministic(first, second, k, data.name)
    return shape, probe.largest if measure_activations else None


def _unwatched(model: nn.Module, examples: int) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def check_eval_mode(model: nn.Module) -> None:
    """Refuse a model whose output depends on train/eval mode and that is in train mode.

    Dropout and batch-norm layers, and ``nn.MultiheadAttention`` with attention dropout
    (``dropout > 0``, also inside ``nn.TransformerEncoderLayer`` / ``DecoderLayer``), are
    checked. Dropout written as ``F.dropout(x, training=True)`` in a custom ``forward`` is
    invisible here; :meth:`ModelWrapper.check_data` catches it by evaluating twice.

    Raises
    ------
    ModelStateError
        Naming the first such submodule found in training mode.
    """
    for name, module in model.named_modules():
        if not module.training:
            continue
        where = name or "<root>"
        if isinstance(module, _MODE_DEPENDENT):
            kind = type(module).__name__
            raise ModelStateError(
                f"submodule {where!r} ({kind}) is in training mode, so its output is "
                "random or depends on the batch and influence scores would be meaningless. "
                "Call model.eval() before building the influence calculator."
            )
        if isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
            raise ModelStateError(
                f"submodule {where!r} (MultiheadAttention) is in training mode with attention "
                f"dropout {module.dropout:g}, so its attention weights are randomly dropped on "
                "every call and influence scores would be meaningless. Call model.eval() "
                "before building the influence calculator."
            )


def as_training_data(data: Any, name: str = "training data") -> IndexedData:
    """``data`` as :class:`IndexedData`, refusing a Python list of per-example pairs.

    A list of ``(x_i, y_i)`` pairs (one tuple per example) is not a batch: infl needs the
    examples stacked along a leading dimension, ``(X, y)``, or a ``Dataset``.

    Raises
    ------
    InputError
        For a list of per-example tuples (saying to stack them or use a Dataset), or
        whatever :class:`IndexedData` refuses.
    """
    pairs = (
        isinstance(data, (list, tuple))
        and len(data) > 0
        and all(isinstance(e, (tuple, list)) and len(e) > 0 for e in data)
        and len({len(e) for e in data}) == 1
    )
    if pairs and (isinstance(data, list) or len(data) > 2):
        width = len(data[0])
        raise InputError(
            f"{name} is a {type(data).__name__} of {len(data)} tuples of {width} items, one per "
            "example; infl needs the examples stacked along a leading dimension. Stack them, "
            "e.g. X = torch.stack([x for x, _ in pairs]); y = torch.stack([y for _, y in "
            "pairs]) (or torch.tensor(labels)) and pass (X, y), or wrap them in a "
            "torch.utils.data.Dataset whose items are the (x, y) pairs."
        )
    try:
        return data if isinstance(data, IndexedData) else IndexedData(data, name=name)
    except InputError as err:
        if pairs:
            raise InputError(
                f"{err} — {name} looks like a sequence of per-example (x, y) pairs: stack them "
                "into (X, y) tensors with torch.stack, or wrap them in a Dataset."
            ) from err
        raise


def forward_error(
    err: BaseException, inputs: Batch, name: str, k: int, model: nn.Module, dtype: torch.dtype
) -> InputError:
    """A failed first forward pass of ``model`` (computing in ``dtype``) as an InputError.

    Names the likely cause: integer inputs to a floating-point model, a feature width that is
    not the first linear layer's ``in_features``, or else the inputs' shapes and dtypes.
    """
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    leaves = tensor_leaves(inputs)
    said = f"PyTorch said: {type(err).__name__}: {text}"
    integer = [
        t for t in leaves if not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
    ]
    if integer and any(w in text for w in ("dtype", "scalar type", "Long", "Int")):
        kinds = sorted({str(t.dtype) for t in integer})
        return InputError(
            f"{name}: the inputs are integer tensors ({', '.join(kinds)}) but the model "
            f"computes in {dtype}, and its first layer cannot take them. Convert the "
            f"inputs to floating point, e.g. X.to({dtype}) (or X.float() for a float32 "
            "model); integer inputs are right only for layers that take indices, such as "
            f"nn.Embedding. {said}"
        )
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)), None)
    if "cannot be multiplied" in text and first is not None and leaves:
        layer, linear = first
        width = int(leaves[0].shape[-1]) if leaves[0].dim() else 0
        if width != linear.in_features:
            return InputError(
                f"{name}: the model's first linear layer {layer!r} expects "
                f"{linear.in_features} features per example, but the data has {width} "
                f"(inputs of shape {tuple(leaves[0].shape)}). Pass the columns the model "
                "was trained on (the same preprocessing and feature order), or the model "
                f"trained on this data. {said}"
            )
    shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in leaves) or "no tensors"
    return InputError(
        f"{name}: evaluating the model on its first {k} examples failed (inputs: "
        f"{shapes}). Check that the inputs have the shape and dtype the model was trained "
        f"on and that the batch is in the form the loss expects. {said}"
    )


def gradient_moments(
    train_grads: Iterable[tuple[int, torch.Tensor]],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per chunk of ``(start, [b, p] gradients)``: their sum ``[p]`` and the sum of their
    squared norms ``[1]``, in float64 (what :func:`measure_stationarity` adds up)."""
    for _, grads in train_grads:
        g = grads.to(torch.float64)
        yield g.sum(dim=0), (g * g).sum().reshape(1)


def measure_stationarity(
    moments: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_train: int,
    *,
    names: Sequence[str],
    numels: Sequence[int],
    theta: torch.Tensor,
    decay: torch.Tensor,
    objective: Objective,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Stationarity:
    """:class:`Stationarity` from one pass of training gradients (see
    :meth:`ModelWrapper.check_stationarity <infl.model.ModelWrapper.check_stationarity>`).

    ``moments`` yields, per chunk, the sum of its gradients ``[p]`` and of their squared norms
    ``[1]`` (:func:`gradient_moments`, or
    :meth:`ModelWrapper.train_grad_moments <infl.model.ModelWrapper.train_grad_moments>`).
    ``names`` and ``numels`` are the trainable parameters in flat order, ``theta`` the flat
    parameters ``[p]``, ``decay`` the diagonal of :math:`\\Lambda` ``[p]``. ``all_reduce``
    sums the gradient sums over the ranks of a ``torch.distributed`` job, whose
    ``train_grads`` are each rank's shard (``num_train`` is then all ranks' total).
    """
    total = torch.zeros(theta.numel(), dtype=torch.float64, device=theta.device)
    squares = torch.zeros(1, dtype=torch.float64, device=theta.device)
    for chunk_total, chunk_squares in moments:
        total += chunk_total.to(total)
        squares += chunk_squares.to(squares)
    if all_reduce is not None:
        both = all_reduce(torch.cat([total, squares]))
        total, squares = both[:-1], both[-1:]
    grad_j = total / num_train
    theta = theta.to(torch.float64)
    groups = objective.decay_groups
    wd = groups if groups is not None else float(objective.uniform_weight_decay or 0.0)
    loss_grad = grad_j - decay.to(torch.float64) * theta
    theta_sq = float(theta @ theta)
    implied: float | None = None
    residual = math.nan
    if theta_sq > 0:
        implied = -float(loss_grad @ theta) / theta_sq
        residual = float(torch.linalg.vector_norm(loss_grad + implied * theta))
    # one implied decay per parameter tensor: catches a bias/norm trained without decay
    per_param: list[tuple[str, float]] = []
    left = []
    for name, lg, th in zip(
        names,
        torch.split(loss_grad, list(numels)),
        torch.split(theta, list(numels)),
        strict=True,
    ):
        sq = float(th @ th)
        value = -float(lg @ th) / sq if sq > 0 else 0.0
        if sq > 0:
            per_param.append((name, value))
        left.append(lg + value * th)
    return Stationarity(
        grad_norm=float(torch.linalg.vector_norm(grad_j)),
        grad_scale=math.sqrt(float(squares) / num_train),
        num_train=num_train,
        weight_decay=wd,
        implied_weight_decay=implied,
        implied_residual=residual,
        implied_by_parameter=tuple(per_param),
        implied_by_parameter_residual=float(torch.linalg.vector_norm(torch.cat(left))),
    )


def _check_deterministic(first: Any, second: Any, k: int, name: str) -> None:
    """Refuse a forward pass that gives different values on the same examples."""
    if first is second:  # evaluated once (deterministic by construction)
        return
    worst = 0.0
    for a, b in zip(tensor_leaves(first), tensor_leaves(second), strict=True):
        if not a.is_floating_point() or a.shape != b.shape:
            continue
        tol = 1e3 * torch.finfo(a.dtype).eps * max(float(a.abs().max()) if a.numel() else 0.0, 1.0)
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        if diff > tol:
            worst = max(worst, diff)
    if worst > 0:
        raise ModelStateError(
            f"two evaluations of the same {k} examples of {name} at the same parameters gave "
            f"different values (largest difference {worst:.3g}): the model's forward pass is "
            "random, so its gradients and Hessian are too and influence scores would be "
            "meaningless. The usual cause is dropout that ignores eval mode in a custom "
            "forward: F.dropout(x, p, training=True), or F.dropout(x, p) whose default is "
            "training=True. Write F.dropout(x, p, training=self.training) and call "
            "model.eval(); switch other random operations (noise, sampling) off the same way."
        )


@dataclass(frozen=True)
class Stationarity:
    """How close the trained parameters are to a minimum of the objective :math:`J`.

    Influence functions assume :math:`\\nabla J(\\theta^*) = 0`. Away from a minimum,
    retraining without an example also moves :math:`\\theta` by the drift
    :math:`-A^{-1}\\nabla J` that continued training causes, and measured removal effects
    include it. The drift is compared with a typical single-example removal,
    :math:`A^{-1}g_i/n`: their size ratio is about ``drift_ratio``
    :math:`= n\\,\\|\\nabla J\\| / s`.

    Attributes
    ----------
    grad_norm
        :math:`\\|\\nabla J(\\theta)\\|_2`, with :math:`\\nabla J = \\frac1n\\sum_i g_i`.
    grad_scale
        :math:`s = (\\frac1n\\sum_i \\|g_i\\|_2^2)^{1/2}`, the RMS training-gradient norm.
    num_train
        :math:`n`.
    weight_decay
        The objective's ``weight_decay`` (a number, or its
        :class:`~infl.objective.WeightDecayGroups`).
    implied_weight_decay
        :math:`\\hat\\lambda = -\\langle \\nabla L, \\theta\\rangle / \\|\\theta\\|^2`
        (:math:`\\nabla L` the mean loss gradient): the weight decay that best cancels the
        loss gradient; ``None`` when :math:`\\theta = 0`.
    implied_residual
        :math:`\\|\\nabla L + \\hat\\lambda\\theta\\|`, what is left of the gradient at
        :math:`\\hat\\lambda`.
    implied_by_parameter
        ``((name, λ̂_j), ...)``: :math:`\\hat\\lambda_j = -\\langle \\nabla_j L,
        \\theta_j\\rangle / \\|\\theta_j\\|^2` for each parameter tensor with
        :math:`\\theta_j \\ne 0`: the weight decay per parameter (e.g. none on biases) that
        best cancels the loss gradient.
    implied_by_parameter_residual
        What is left of the loss gradient with those per-parameter values.
    """

    grad_norm: float
    grad_scale: float
    num_train: int
    weight_decay: float | WeightDecayGroups
    implied_weight_decay: float | None
    implied_residual: float
    implied_by_parameter: tuple[tuple[str, float], ...] = ()
    implied_by_parameter_residual: float = math.nan

    @property
    def relative(self) -> float:
        """:math:`\\|\\nabla J\\| / s`."""
        if self.grad_scale > 0:
            return self.grad_norm / self.grad_scale
        return 0.0 if self.grad_norm == 0 else math.inf

    @property
    def drift_ratio(self) -> float:
        """:math:`n\\,\\|\\nabla J\\| / s`: the drift in units of a typical removal effect."""
        return self.num_train * self.relative

    @property
    def is_minimum(self) -> bool:
        """``drift_ratio <= 1``: the gradient left is below one example's share of it."""
        return self.drift_ratio <= 1.0

    @property
    def wrong_weight_decay(self) -> bool:
        """Whether another weight decay (``implied_weight_decay``) would make it a minimum."""
        if self.is_minimum or self.implied_weight_decay is None or self.grad_scale <= 0:
            return False
        return (
            self.implied_weight_decay >= 0
            and self.num_train * self.implied_residual / self.grad_scale <= 1.0
        ) or self.wrong_decay_groups

    @property
    def wrong_decay_groups(self) -> bool:
        """Whether weight decay *per parameter* (``implied_by_parameter``) makes it a minimum.

        Needs every :math:`\\hat\\lambda_j \\ge 0` (up to round-off) and the gradient left
        below one example's share; checked only when the single number does not fit.
        """
        if self.is_minimum or self.grad_scale <= 0 or not self.implied_by_parameter:
            return False
        if self.implied_weight_decay is not None and (
            self.implied_weight_decay >= 0
            and self.num_train * self.implied_residual / self.grad_scale <= 1.0
        ):
            return False
        values = [v for _, v in self.implied_by_parameter]
        floor = -1e-6 * max(1.0, max(abs(v) for v in values))
        return (
            min(values) >= floor
            and self.num_train * self.implied_by_parameter_residual / self.grad_scale <= 1.0
        )

    def summary(self) -> str:
        """One sentence with the numbers."""
        return (
            f"||grad J(theta)|| = {self.grad_norm:.3g} with weight_decay="
            f"{describe_weight_decay(self.weight_decay)}; "
            f"RMS per-example gradient norm {self.grad_scale:.3g}, n = {self.num_train}: "
            f"relative {self.relative:.3g}, drift ratio n*relative = {self.drift_ratio:.3g} "
            f"({'at' if self.is_minimum else 'not at'} a minimum)"
        )

    def warn_if_not_minimum(self, stacklevel: int = 2) -> None:
        """Issue an :class:`~infl.errors.InflWarning` unless :attr:`is_minimum`."""
        if self.is_minimum:
            return
        given = describe_weight_decay(self.weight_decay)
        cause = ""
        if self.wrong_decay_groups:
            shown = ", ".join(f"{n} ~ {max(v, 0.0):.3g}" for n, v in self.implied_by_parameter)
            cause = (
                f" The model looks trained with a weight decay per parameter ({shown}), not "
                f"{given}: with those values the gradient nearly vanishes. Pass the groups the "
                "model was trained with: Objective(loss, weight_decay={'default': ..., "
                "'no_decay': ['bias', ...]}) or Objective.from_optimizer(loss, optimizer, model)."
            )
        elif self.wrong_weight_decay:
            cause = (
                f" The model looks trained with weight_decay ~ {self.implied_weight_decay:.3g}, "
                f"not {given}: with that value the gradient nearly vanishes. Pass the "
                "weight_decay the model was trained with."
            )
        warnings.warn(
            f"the model is not at a minimum of the objective: {self.summary()}. Influence "
            "functions assume grad J(theta) = 0; here retraining without an example would also "
            "move theta by the drift that continued training causes (about "
            f"{self.drift_ratio:.3g} times a typical single-example removal effect), so "
            "measured removal effects include that drift and will disagree with the scores."
            f"{cause} Retrain longer (to a smaller gradient), check that weight_decay is the one "
            "the model was trained with (a different weight decay leaves grad J != 0 even at "
            "the trained minimum), or compare with control-corrected ground truth "
            "(GroundTruth.corrected_change from infl.retrain_ground_truth). "
            "InfluenceCalculator(check_minimum=False) turns this check off.",
            InflWarning,
            stacklevel=stacklevel + 1,
        )


_ROWWISE_MODULES = (
    nn.Linear, nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh,
)  # fmt: skip
"""Module types (exactly these, not subclasses) that map each row of a ``[b, d]`` input to the
same row of their output, and depend on no other row."""

_SPATIAL_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.Flatten)
"""Module types (exactly these) that map each example of a ``[b, ...]`` input to the same
example of their output but not row by row: :func:`rowwise_by_construction` admits them only
when asked (``spatial=True``)."""

_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def rowwise_by_construction(wrapper: ModelWrapper, fn: Any, *, spatial: bool = False) -> bool:
    """Whether ``fn``'s value for each example depends, by the model's structure alone, on that
    example and on the parameters only through the layers' outputs: ``fn`` is the objective's
    built-in supervised loss (``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``), and the
    model an ``nn.Sequential`` (nested ones allowed) of modules of exactly the types in
    :data:`_ROWWISE_MODULES` (``nn.Linear`` and element-wise activations), with no hook on any
    of them and no global module hook. That is what :func:`shortcut_agrees` checks
    numerically, so for such a model the check is not run. With ``spatial``, the modules of
    :data:`_SPATIAL_MODULES` (``nn.Conv2d``, ``nn.MaxPool2d``, ``nn.Flatten``) are admitted
    too: each example's value still depends on that example alone, but a layer's
    per-example gradient is no longer one outer product."""
    from infl.losses import SupervisedLoss  # see check_first_examples

    if fn is not wrapper.objective.per_example_loss:
        return False
    if not isinstance(fn, SupervisedLoss) or not isinstance(fn.loss, str):
        return False
    if type(wrapper.model) is not nn.Sequential:
        return False
    modules = list(wrapper.model.modules())
    admitted = _ROWWISE_MODULES + _SPATIAL_MODULES if spatial else _ROWWISE_MODULES
    if any(type(m) is not nn.Sequential and type(m) not in admitted for m in modules):
        return False
    hooks = [getattr(m, table, None) for m in modules for table in _HOOK_TABLES]
    hooks += [getattr(torch.nn.modules.module, f"_global{t}", None) for t in _HOOK_TABLES]
    return not any(hooks)


def shortcut_agrees(
    wrapper: ModelWrapper, fn: Any, batch: Batch, rows: list[int], fast: torch.Tensor
) -> bool:
    """Whether a per-example-gradient shortcut's rows ``fast`` (``[len(rows), p]``) of ``batch``
    agree with the plain autograd gradients of those examples alone, to
    :math:`\\sqrt{\\varepsilon}` relative to the largest entry (see
    :meth:`ModelWrapper.per_example_grads <infl.model.ModelWrapper.per_example_grads>`); the
    answer is recorded for ``fn`` on the wrapper. A model and ``fn`` that
    :func:`rowwise_by_construction` accepts agree without the comparison (the shortcut's
    outer products are then exact by construction; on the Iris MLP the comparison was a
    seventh of an EK-FAC job)."""
    if rowwise_by_construction(wrapper, fn):
        wrapper._linear_verified[fn] = True
        return True
    reference = single_example_grads(wrapper, fn, batch, rows)
    eps = torch.finfo(reference.dtype).eps
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    agree = bool(((fast - reference).abs() <= eps**0.5 * max(scale, 1.0)).all())
    wrapper._linear_verified[fn] = agree
    return agree


def single_example_grads(
    wrapper: ModelWrapper, fn: Any, batch: Batch, rows: list[int]
) -> torch.Tensor:
    """``[len(rows), p]``: the gradient of ``fn`` on each example ``rows[j]`` of ``batch``
    alone (plain autograd on a batch of one, as ``vmap(grad)`` evaluates it).

    Each example is evaluated on its own copy of the parameters, so that one backward pass
    through the sum of the values gives every gradient."""
    from infl.second_order import functional_evaluation  # see check_first_examples

    copies = []
    total: Any = 0.0
    with torch.enable_grad(), functional_evaluation():
        for i in rows:
            leaves = {n: p.detach().requires_grad_(True) for n, p in wrapper.params.items()}
            one = slice_batch(batch, slice(i, i + 1))
            total = total + wrapper._batch_value(fn, leaves, one).sum()
            copies.append(leaves)
        if not isinstance(total, torch.Tensor) or not total.requires_grad:
            return torch.zeros(
                len(rows), wrapper.num_params, dtype=wrapper.dtype, device=wrapper.device
            )
        flat = [t for leaves in copies for t in leaves.values()]
        grads = torch.autograd.grad(total, flat, allow_unused=True, materialize_grads=True)
    size = len(wrapper.params)
    per_row = [grads[j * size : (j + 1) * size] for j in range(len(rows))]
    return torch.stack(
        [wrapper.flatten(dict(zip(wrapper.params, g, strict=True))) for g in per_row]
    )
