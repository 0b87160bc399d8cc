"""Correcting a mis-prediction with a few fine-tuning steps on the most influential examples.

Schioppa, Filippova, Titov & Zablotskaia (*Theoretical and Practical Perspectives on what
Influence Functions Do*, NeurIPS 2023) argue that, although influence functions predict the
effect of retraining poorly on deep models, they still point in a useful *direction*: a few
gradient steps on the training examples they rank as most helpful for a mis-predicted test
point fix that prediction. :func:`correct_prediction` runs that procedure on one test example
and :func:`compare_rankings` compares it with two controls over many.

Sign logic
----------
Let :math:`f` be the measurement of the test example :math:`z` (its *margin*, target logit
minus the largest other logit, or its *loss*) and :math:`\\sigma = +1` when larger :math:`f`
is better (margin), :math:`\\sigma = -1` when smaller is better (loss). With
:math:`\\mathcal I_i = -\\nabla f(z)^T (H+\\lambda I)^{-1} g_i` (``InfluenceCalculator.influence``),
up-weighting training example :math:`i` by :math:`\\varepsilon` changes :math:`f` by
:math:`\\varepsilon\\,\\mathcal I_i`. Each ranking gives every training example a
*helpfulness* :math:`h_i` (larger = descending on :math:`\\ell(z_i)` helps the test example):

* ``"influence"``: :math:`h_i = \\sigma\\,\\mathcal I_i` (for the loss: the most negative
  influence — up-weighting them most decreases the test loss; for the margin: the most
  positive — up-weighting them most increases the margin);
* ``"gradient_similarity"`` (no Hessian): a descent step on :math:`\\ell(z_i)` changes
  :math:`f` by :math:`-\\eta\\nabla f^T\\nabla\\ell(z_i)`, so
  :math:`h_i = -\\sigma\\cos(\\nabla f(z), \\nabla\\ell(z_i))`;
* ``"random"``: a random permutation (the control that any fine-tuning achieves).

The ``k`` examples of largest :math:`h` are the *helpful* set :math:`S_+`, the ``k`` of smallest
:math:`h` the *harmful* set :math:`S_-`. Each fine-tuning step is one SGD step of size
:math:`\\eta` on

.. math::

    L(\\theta) = \\frac1{|S_+|}\\sum_{i\\in S_+}\\ell(z_i;\\theta)
    - a\\,\\frac1{|S_-|}\\sum_{i\\in S_-}\\ell(z_i;\\theta),

with :math:`a = 1` if ``ascend_harmful`` else 0: descent on the helpful examples and
(optionally) ascent on the harmful ones; the weight decay term is left out (a few steps of it
only shrink the weights). The ranking is computed
once at :math:`\\theta^*`. Fine-tuning stops as soon as the test example is classified
correctly (the prediction *flips*) or after ``max_steps`` steps.
"""

from __future__ import annotations

import copy
import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from infl.calculator import InfluenceCalculator
from infl.data import Batch, IndexedData, as_indexed, batch_to
from infl.errors import InputError, NonFiniteError
from infl.model import ModelWrapper
from infl.objective import (
    LogitMeasurement,
    MarginMeasurement,
    Objective,
    PerExampleFn,
    margin_measurement,
)
from infl.solvers import ConjugateGradient, Solver

__all__ = [
    "CorrectionConfig",
    "CorrectionResult",
    "CorrectionSummary",
    "Ranking",
    "compare_rankings",
    "correct_prediction",
]

Ranking = Literal["influence", "random", "gradient_similarity"]
MeasurementName = Literal["margin", "loss"]
RANKINGS: tuple[Ranking, ...] = ("influence", "random", "gradient_similarity")
_EVAL_CHUNK = 4096


@dataclass(frozen=True)
class CorrectionResult:
    """The outcome of :func:`correct_prediction` on one test example.

    Attributes
    ----------
    ranking : str
        ``"influence"``, ``"random"`` or ``"gradient_similarity"``.
    flipped : bool
        Whether the test example ended up classified correctly.
    steps : int
        Fine-tuning steps taken (the step at which it flipped, or ``max_steps``).
    max_steps : int
        The step budget.
    helpful : tuple of int
        :math:`S_+`, the training indices descended on, most helpful first.
    harmful : tuple of int
        :math:`S_-`, the training indices ascended on, most harmful first (empty unless
        ``ascend_harmful``).
    label : int
        The test example's target class.
    prediction_before, prediction_after : int
        Predicted class before and after fine-tuning.
    margin_before, margin_after : float
        Target logit minus the largest other logit, before and after (positive = correct).
    heldout_accuracy_before, heldout_accuracy_after : float or None
        Accuracy on the held-out data before and after (``None`` without held-out data).
    model : nn.Module or None
        The fine-tuned copy of the model (the user's module is never modified).
    """

    ranking: str
    flipped: bool
    steps: int
    max_steps: int
    helpful: tuple[int, ...]
    harmful: tuple[int, ...]
    label: int
    prediction_before: int
    prediction_after: int
    margin_before: float
    margin_after: float
    heldout_accuracy_before: float | None = None
    heldout_accuracy_after: float | None = None
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def heldout_accuracy_change(self) -> float | None:
        """After minus before: the collateral cost of the correction (negative = a loss)."""
        if self.heldout_accuracy_before is None or self.heldout_accuracy_after is None:
            return None
        return self.heldout_accuracy_after - self.heldout_accuracy_before


@dataclass(frozen=True)
class CorrectionSummary:
    """Result of :func:`compare_rankings`: every ranking on the same mis-predicted examples.

    Attributes
    ----------
    test_indices : tuple of int
        Positions (in ``test_data``) of the test examples that were corrected.
    results : dict of str to tuple of CorrectionResult
        One result per test example for each ranking, in ``test_indices`` order.
    """

    test_indices: tuple[int, ...]
    results: dict[str, tuple[CorrectionResult, ...]]

    def success_rate(self, ranking: str) -> float:
        """Fraction of the test examples whose prediction flipped within the budget."""
        res = self.results[ranking]
        return sum(r.flipped for r in res) / len(res) if res else math.nan

    def median_steps(self, ranking: str) -> float:
        """Median steps over the successful corrections (NaN if none succeeded)."""
        steps = [r.steps for r in self.results[ranking] if r.flipped]
        return float(statistics.median(steps)) if steps else math.nan

    def mean_heldout_change(self, ranking: str) -> float:
        """Mean held-out accuracy change over all attempts (NaN without held-out data)."""
        changes = [r.heldout_accuracy_change for r in self.results[ranking]]
        vals = [c for c in changes if c is not None]
        return sum(vals) / len(vals) if vals else math.nan

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per ranking: ``ranking``, ``attempts``, ``success_rate``,
        ``median_steps``, ``mean_heldout_change``."""
        return [
            {
                "ranking": name,
                "attempts": len(res),
                "success_rate": self.success_rate(name),
                "median_steps": self.median_steps(name),
                "mean_heldout_change": self.mean_heldout_change(name),
            }
            for name, res in self.results.items()
        ]

    def table(self) -> str:
        """:meth:`to_rows` as a fixed-width text table."""
        lines = [
            f"{'ranking':<20} {'attempts':>8} {'success':>8} {'median steps':>12} "
            f"{'Δ held-out acc':>14}"
        ]
        for r in self.to_rows():
            lines.append(
                f"{r['ranking']:<20} {r['attempts']:>8d} {r['success_rate']:>8.1%} "
                f"{r['median_steps']:>12.1f} {r['mean_heldout_change']:>+14.4f}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _split(batch: Batch, what: str) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and {"inputs", "targets"} <= batch.keys():
        return batch["inputs"], batch["targets"]
    raise InputError(
        f"{what} must hold (inputs, targets) pairs (or {{'inputs', 'targets'}} dicts) so that "
        f"a prediction can be checked against its label; got {type(batch).__name__}"
    )


def _logits(net: nn.Module, inputs: Any) -> torch.Tensor:
    out = net(inputs)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(
            f"correction needs a classifier returning logits of shape [b, C] with C >= 2; "
            f"got {shape}. Wrap a single-logit binary model to output [-z/2, z/2]"
        )
    return out


def _accuracy(net: nn.Module, data: IndexedData, device: torch.device, dtype: torch.dtype) -> float:
    correct = 0
    with torch.no_grad():
        for _, batch in data.chunks(_EVAL_CHUNK):
            inputs, targets = _split(batch_to(batch, device, dtype), "heldout data")
            pred = _logits(net, inputs).argmax(dim=1)
            correct += int((pred == targets.reshape(-1).to(pred.device)).sum())
    return correct / len(data)


def _measurement_sign(measurement: PerExampleFn, objective: Objective) -> int:
    """+1 if larger is better (margin, target logit), -1 if smaller is better (loss)."""
    if isinstance(measurement, MarginMeasurement):
        return 1
    if isinstance(measurement, LogitMeasurement) and measurement.class_index is None:
        return 1
    if measurement is objective.per_example_loss or measurement == objective.per_example_loss:
        return -1
    raise InputError(
        "the calculator's measurement must be the margin (infl.margin_measurement()), the "
        "target-class logit (infl.logit_measurement()) or the objective's loss, so that it is "
        f"clear which direction helps the test example; got {type(measurement).__name__}"
    )


class _Ranker:
    """Helpfulness scores :math:`h` ``[m, n]`` of every training example for test examples."""

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        train: IndexedData,
        *,
        calculator: InfluenceCalculator | None,
        solver: Solver | None,
        measurement: MeasurementName | None,
        chunk_size: int,
        progress: bool,
    ) -> None:
        self.model, self.objective, self.train = model, objective, train
        self.chunk_size, self.progress = chunk_size, progress
        if calculator is not None:
            if solver is not None:
                raise InputError("pass either calculator or solver, not both")
            if len(calculator.train) != len(train):
                raise InputError(
                    f"the calculator was built on {len(calculator.train)} training examples "
                    f"but train_data has {len(train)}; pass the same training data"
                )
            fn = calculator.measurement
            sign = _measurement_sign(fn, objective)
            if measurement is not None and (measurement == "margin") != (sign == 1):
                raise InputError(
                    f"measurement={measurement!r} contradicts the calculator's measurement "
                    f"({type(fn).__name__}); leave measurement=None to use the calculator's"
                )
        else:
            name = measurement or "margin"
            if name not in ("margin", "loss"):
                raise InputError(f"measurement must be 'margin' or 'loss', got {name!r}")
            fn = margin_measurement() if name == "margin" else objective.per_example_loss
            sign = 1 if name == "margin" else -1
        self.measurement_fn: PerExampleFn = fn
        self.sign = sign
        self._calculator = calculator
        self._solver = solver
        self._train_loss_grads: torch.Tensor | None = None
        self.wrapper = calculator.wrapper if calculator is not None else None

    def _wrapper(self) -> ModelWrapper:
        if self.wrapper is None:
            self.wrapper = ModelWrapper(self.model, self.objective)
        return self.wrapper

    def calculator(self) -> InfluenceCalculator:
        if self._calculator is None:
            solver = self._solver if self._solver is not None else ConjugateGradient()
            self._calculator = InfluenceCalculator(
                self.model,
                self.objective,
                self.train,
                solver,
                measurement=self.measurement_fn,
                chunk_size=self.chunk_size,
                progress=self.progress,
            )
            self.wrapper = self._calculator.wrapper
        return self._calculator

    def helpfulness(
        self, ranking: str, test: IndexedData, generators: Sequence[torch.Generator]
    ) -> torch.Tensor:
        n = len(self.train)
        if ranking == "influence":
            return (self.sign * self.calculator().influence(test)).detach().cpu()
        if ranking == "random":
            return torch.stack(
                [torch.randperm(n, generator=g).to(torch.float64) for g in generators]
            )
        if ranking == "gradient_similarity":
            w = self._wrapper()
            if self._train_loss_grads is None:
                loss = self.objective.per_example_loss
                self._train_loss_grads = torch.cat(
                    [w.per_example_grads(loss, b) for _, b in self.train.chunks(self.chunk_size)]
                )
            test_grads = torch.cat(
                [
                    w.per_example_grads(self.measurement_fn, b)
                    for _, b in test.chunks(self.chunk_size)
                ]
            )
            tiny = torch.finfo(test_grads.dtype).tiny
            gt = test_grads / torch.linalg.vector_norm(test_grads, dim=1, keepdim=True).clamp_min(
                tiny
            )
            tr = self._train_loss_grads
            tr = tr / torch.linalg.vector_norm(tr, dim=1, keepdim=True).clamp_min(tiny)
            return (-self.sign * (gt @ tr.T)).detach().cpu()
        raise InputError(f"ranking must be one of {list(RANKINGS)}, got {ranking!r}")


@dataclass(frozen=True)
class CorrectionConfig:
    """The settings shared by :func:`correct_prediction` and :func:`compare_rankings`.

    One frozen record, validated at construction, so that a study can state its correction
    protocol once and pass it to both.

    Parameters
    ----------
    measurement
        Without a calculator: ``"margin"`` (default when ``None``, :math:`\\sigma=+1`) or
        ``"loss"`` (:math:`\\sigma=-1`), the test measurement :math:`f` that the ranking
        explains.
    k
        Size of the helpful set :math:`S_+` (and of the harmful set :math:`S_-`); at most the
        number of training examples (checked when the data is known).
    lr
        SGD step :math:`\\eta` of the fine-tuning.
    max_steps
        Step budget per corrected example.
    ascend_harmful
        Also ascend on the ``k`` most harmful examples (:math:`a = 1` in the module
        docstring's :math:`L(\\theta)`).
    seed
        Seeds the ``"random"`` ranking (``seed + j`` for the ``j``-th example of
        :func:`compare_rankings`).
    chunk_size
        Examples per chunk for gradients.

    Raises
    ------
    InputError
        A setting out of range (the message names it).
    """

    measurement: MeasurementName | None = None
    k: int = 10
    lr: float = 0.1
    max_steps: int = 100
    ascend_harmful: bool = False
    seed: int = 0
    chunk_size: int = 256

    def __post_init__(self) -> None:
        if self.measurement not in (None, "margin", "loss"):
            raise InputError(
                f"measurement must be None, 'margin' or 'loss', got {self.measurement!r}"
            )
        if isinstance(self.k, bool) or int(self.k) != self.k or self.k < 1:
            raise InputError(f"k must be a positive integer, got {self.k}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be a finite number > 0, got {self.lr}")
        if isinstance(self.max_steps, bool) or int(self.max_steps) != self.max_steps:
            raise InputError(f"max_steps must be a positive integer, got {self.max_steps}")
        if self.max_steps < 1:
            raise InputError(f"max_steps must be a positive integer, got {self.max_steps}")
        if isinstance(self.chunk_size, bool) or int(self.chunk_size) != self.chunk_size:
            raise InputError(f"chunk_size must be a positive integer, got {self.chunk_size}")
        if self.chunk_size < 1:
            raise InputError(f"chunk_size must be a positive integer, got {self.chunk_size}")
        object.__setattr__(self, "lr", float(self.lr))


_SETTINGS = tuple(CorrectionConfig.__dataclass_fields__)


def _resolve_config(
    config: CorrectionConfig | None, settings: dict[str, Any], caller: str
) -> CorrectionConfig:
    """``config``, or (deprecated) a :class:`CorrectionConfig` built from keywords."""
    unknown = sorted(set(settings) - set(_SETTINGS))
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    if config is not None and not isinstance(config, CorrectionConfig):
        raise InputError(f"config must be a CorrectionConfig, got {type(config).__name__}")
    if not settings:
        return CorrectionConfig() if config is None else config
    names = ", ".join(sorted(settings))
    if config is not None:
        raise InputError(
            f"{caller}() got config= and the settings keywords {names}; put them into the "
            "config (config=CorrectionConfig(...)) or use dataclasses.replace(config, ...)"
        )
    warnings.warn(
        f"passing {names} to {caller}() as keywords is deprecated and will be removed in the "
        "next release; pass config=infl.experiments.CorrectionConfig(...) instead",
        DeprecationWarning,
        stacklevel=3,
    )
    return CorrectionConfig(**settings)


def _check_budget(k: int, lr: float, max_steps: int, n: int) -> None:
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= n:
        raise InputError(f"k must be an integer in 1..{n} (the training set size), got {k}")
    if not (math.isfinite(lr) and lr > 0):
        raise InputError(f"lr must be a finite number > 0, got {lr}")
    if isinstance(max_steps, bool) or int(max_steps) != max_steps or max_steps < 1:
        raise InputError(f"max_steps must be a positive integer, got {max_steps}")


def _finetune(
    model: nn.Module,
    objective: Objective,
    train: IndexedData,
    test_batch: Batch,
    helpfulness: torch.Tensor,
    *,
    ranking: str,
    k: int,
    lr: float,
    max_steps: int,
    ascend_harmful: bool,
    heldout: IndexedData | None,
    heldout_before: float | None,
    keep_model: bool,
) -> CorrectionResult:
    net = copy.deepcopy(model)
    params = [p for p in net.parameters() if p.requires_grad]
    dtype, device = params[0].dtype, params[0].device
    inputs, targets = _split(batch_to(test_batch, device, dtype), "the test example")
    label = int(targets.reshape(-1)[0])
    margin = MarginMeasurement()

    def state() -> tuple[int, float]:
        with torch.no_grad():
            logits = _logits(net, inputs)
            return int(logits.argmax(dim=1)[0]), float(margin(net, (inputs, targets))[0])

    pred_before, margin_before = state()
    order = torch.argsort(helpfulness, descending=True, stable=True)
    helpful = order[:k]
    harmful = order.flip(0)[:k] if ascend_harmful else order[:0]
    plus = batch_to(train.select(helpful), device, dtype)
    minus = batch_to(train.select(harmful), device, dtype) if ascend_harmful else None
    loss = objective.per_example_loss
    opt = torch.optim.SGD(params, lr=lr)
    pred, steps = pred_before, 0
    while pred != label and steps < max_steps:
        opt.zero_grad()
        value = loss(net, plus).mean()
        if minus is not None:
            value = value - loss(net, minus).mean()
        if not torch.isfinite(value):
            raise NonFiniteError(
                f"the fine-tuning loss became {float(value)} at step {steps} ({ranking} "
                f"ranking); lower lr (now {lr:g})"
                + (" or turn off ascend_harmful" if minus else "")
            )
        value.backward()
        opt.step()
        steps += 1
        pred, _ = state()
    pred_after, margin_after = state()
    for p in params:
        p.grad = None
    after = _accuracy(net, heldout, device, dtype) if heldout is not None else None
    return CorrectionResult(
        ranking=ranking,
        flipped=pred_after == label,
        steps=steps,
        max_steps=max_steps,
        helpful=tuple(int(i) for i in helpful),
        harmful=tuple(int(i) for i in harmful),
        label=label,
        prediction_before=pred_before,
        prediction_after=pred_after,
        margin_before=margin_before,
        margin_after=margin_after,
        heldout_accuracy_before=heldout_before,
        heldout_accuracy_after=after,
        model=net if keep_model else None,
    )


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def correct_prediction(
    model: nn.Module,
    objective: Objective,
    train_data: Any,
    test_example: Any,
    *,
    ranking: Ranking = "influence",
    config: CorrectionConfig | None = None,
    calculator: InfluenceCalculator | None = None,
    solver: Solver | None = None,
    heldout: Any = None,
    progress: bool = False,
    **settings: Any,
) -> CorrectionResult:
    """Fix one mis-predicted test example by fine-tuning on the training examples that help it.

    Ranks the ``n`` training examples by helpfulness :math:`h` for the test example (see the
    module docstring for the sign logic), then takes SGD steps of size :math:`\\eta` =
    ``config.lr`` on the mean loss of the ``k`` most helpful (minus, with ``ascend_harmful``,
    the mean loss of the ``k`` most harmful) until the test example is classified correctly
    or ``config.max_steps`` steps have been taken.

    Parameters
    ----------
    model
        The trained classifier (logits ``[b, C]``), in eval mode. Never modified: a deep copy
        is fine-tuned (returned as ``result.model``).
    objective
        The training objective; its per-example loss :math:`\\ell` is what fine-tuning
        descends on, and (with its ``weight_decay``) it defines the Hessian.
    train_data
        The ``n`` training examples as ``(inputs, targets)``.
    test_example
        One mis-predicted example as a batch of one, e.g. ``(x[i:i+1], y[i:i+1])``.
    ranking
        ``"influence"`` (:math:`h_i = \\sigma\\mathcal I_i`, needs inverse-HVPs),
        ``"gradient_similarity"`` (:math:`h_i = -\\sigma\\cos(\\nabla f,\\nabla\\ell_i)`) or
        ``"random"``.
    config
        The correction settings (:class:`CorrectionConfig`: ``measurement``, ``k``, ``lr``,
        ``max_steps``, ``ascend_harmful``, ``seed``, ``chunk_size``); ``None``: the
        defaults.
    calculator
        An :class:`~infl.InfluenceCalculator` for this model and training data whose
        measurement is the margin, the target logit or the loss; reused across calls.
    solver
        Otherwise, the inverse-HVP solver of a calculator built here (default
        :class:`~infl.ConjugateGradient`).
    heldout
        Optional ``(inputs, targets)`` data on which to report the accuracy change.
    progress
        Show progress bars of the influence computation.
    **settings
        Deprecated: the fields of :class:`CorrectionConfig` as keywords. They still work,
        with a ``DeprecationWarning``, until the next release; not together with ``config``.

    Returns
    -------
    CorrectionResult

    Raises
    ------
    InputError
        If the test example is not a single example, or is already classified correctly.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from infl import Objective
    >>> x = torch.tensor([[-1.0], [-2.0], [1.0], [2.0], [1.5]], dtype=torch.float64)
    >>> y = torch.tensor([0, 0, 1, 1, 0])
    >>> net = nn.Linear(1, 2).double()
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(torch.tensor([[-1.0], [1.0]])), net.bias.zero_()
    >>> res = correct_prediction(net, Objective("cross_entropy", 0.1), (x, y), (x[4:], y[4:]),
    ...                          ranking="gradient_similarity",
    ...                          config=CorrectionConfig(k=1, lr=1.0))
    >>> res.helpful, res.flipped
    ((4,), True)
    """
    cfg = _resolve_config(config, settings, "correct_prediction")
    train = as_indexed(train_data, "training data")
    test = as_indexed(test_example, "test example")
    if len(test) != 1:
        raise InputError(
            f"test_example must be a single example (a batch of one), got {len(test)}; use "
            "compare_rankings for many test examples"
        )
    _check_budget(cfg.k, cfg.lr, cfg.max_steps, len(train))
    ranker = _Ranker(
        model,
        objective,
        train,
        calculator=calculator,
        solver=solver,
        measurement=cfg.measurement,
        chunk_size=cfg.chunk_size,
        progress=progress,
    )
    batch = test.select([0])
    _require_mispredicted(model, batch)
    held = as_indexed(heldout, "heldout data") if heldout is not None else None
    dtype, device = _dtype_device(model)
    before = _accuracy(model, held, device, dtype) if held is not None else None
    gen = torch.Generator().manual_seed(cfg.seed)
    h = ranker.helpfulness(ranking, test, [gen])[0]
    return _finetune(
        model,
        objective,
        train,
        batch,
        h,
        ranking=ranking,
        k=cfg.k,
        lr=cfg.lr,
        max_steps=cfg.max_steps,
        ascend_harmful=cfg.ascend_harmful,
        heldout=held,
        heldout_before=before,
        keep_model=True,
    )


def _dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters to fine-tune")
    return params[0].dtype, params[0].device


def _predictions(model: nn.Module, data: IndexedData) -> tuple[torch.Tensor, torch.Tensor]:
    dtype, device = _dtype_device(model)
    preds, labels = [], []
    with torch.no_grad():
        for _, batch in data.chunks(_EVAL_CHUNK):
            inputs, targets = _split(batch_to(batch, device, dtype), "test data")
            preds.append(_logits(model, inputs).argmax(dim=1).cpu())
            labels.append(targets.reshape(-1).cpu())
    return torch.cat(preds), torch.cat(labels)


def _require_mispredicted(model: nn.Module, batch: Batch) -> None:
    pred, label = _predictions(model, IndexedData(batch))
    if int(pred[0]) == int(label[0]):
        raise InputError(
            f"the test example is already classified correctly (class {int(label[0])}); "
            "there is nothing to correct. Pick a mis-predicted example"
        )


def compare_rankings(
    model: nn.Module,
    objective: Objective,
    train_data: Any,
    test_data: Any,
    *,
    rankings: Sequence[Ranking] = RANKINGS,
    config: CorrectionConfig | None = None,
    calculator: InfluenceCalculator | None = None,
    solver: Solver | None = None,
    heldout: Any = None,
    max_examples: int | None = None,
    progress: bool = True,
    **settings: Any,
) -> CorrectionSummary:
    """Run :func:`correct_prediction` with each ranking on every mis-predicted test example.

    The mis-predicted examples of ``test_data`` (predicted class :math:`\\ne` target) are
    found first; influence scores for all of them come from one call of
    :meth:`~infl.InfluenceCalculator.influence` (one solve, one pass over the training
    data), gradient similarities from one pass of per-example gradients. The ``"random"``
    ranking of the ``j``-th example is seeded with ``config.seed + j``.

    Parameters
    ----------
    test_data
        ``(inputs, targets)`` test examples; only the mis-predicted ones are corrected.
    rankings
        Which rankings to run (default all three).
    max_examples
        Correct at most this many (the first mis-predicted ones, in order).
    progress
        A tqdm bar over the test examples (and the influence computation's own bars).

    Other parameters (``config``, ``calculator``, ``solver``, ``heldout`` and the deprecated
    ``**settings``) are those of :func:`correct_prediction`.

    Returns
    -------
    CorrectionSummary
        Per-ranking results, success rates and median steps (``.table()``, ``.to_rows()``).

    Raises
    ------
    InputError
        If no test example is mis-predicted, or a ranking name is unknown.
    """
    cfg = _resolve_config(config, settings, "compare_rankings")
    for r in rankings:
        if r not in RANKINGS:
            raise InputError(f"unknown ranking {r!r}; choose from {list(RANKINGS)}")
    train = as_indexed(train_data, "training data")
    test = as_indexed(test_data, "test data")
    _check_budget(cfg.k, cfg.lr, cfg.max_steps, len(train))
    pred, labels = _predictions(model, test)
    wrong = torch.nonzero(pred != labels).reshape(-1)
    if max_examples is not None:
        wrong = wrong[:max_examples]
    if wrong.numel() == 0:
        raise InputError(
            f"none of the {len(test)} test examples is mis-predicted; nothing to correct"
        )
    subset = IndexedData(test.select(wrong), name="mis-predicted test data")
    ranker = _Ranker(
        model,
        objective,
        train,
        calculator=calculator,
        solver=solver,
        measurement=cfg.measurement,
        chunk_size=cfg.chunk_size,
        progress=progress,
    )
    held = as_indexed(heldout, "heldout data") if heldout is not None else None
    dtype, device = _dtype_device(model)
    before = _accuracy(model, held, device, dtype) if held is not None else None
    gens = [torch.Generator().manual_seed(cfg.seed + j) for j in range(wrong.numel())]
    scores = {r: ranker.helpfulness(r, subset, gens) for r in rankings}
    out: dict[str, list[CorrectionResult]] = {r: [] for r in rankings}
    bar = tqdm(range(wrong.numel()), desc="correcting", disable=not progress, leave=False)
    for j in bar:
        batch = subset.select([j])
        for r in rankings:
            out[r].append(
                _finetune(
                    model,
                    objective,
                    train,
                    batch,
                    scores[r][j],
                    ranking=r,
                    k=cfg.k,
                    lr=cfg.lr,
                    max_steps=cfg.max_steps,
                    ascend_harmful=cfg.ascend_harmful,
                    heldout=held,
                    heldout_before=before,
                    keep_model=False,
                )
            )
    return CorrectionSummary(
        test_indices=tuple(int(i) for i in wrong),
        results={r: tuple(v) for r, v in out.items()},
    )
