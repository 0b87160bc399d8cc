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
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from infl.calculator import InfluenceCalculator
from infl.data import Batch, IndexedData, as_indexed, batch_to
from infl.errors import InputError, NonFiniteError
from infl.experiments.correction_records import (
    RANKINGS,
    CorrectionConfig,
    CorrectionResult,
    CorrectionSummary,
    Ranking,
    resolve_config,
)
from infl.experiments.correction_records import MeasurementName as MeasurementName
from infl.experiments.ranking import Ranker
from infl.objective import MarginMeasurement, Objective
from infl.solvers import Solver

__all__ = [
    "CorrectionConfig",
    "CorrectionResult",
    "CorrectionSummary",
    "Ranking",
    "compare_rankings",
    "correct_prediction",
]


_EVAL_CHUNK = 4096


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
    cfg = resolve_config(config, settings, "correct_prediction")
    train = as_indexed(train_data, "training data")
    test = as_indexed(test_example, "test example")
    if len(test) != 1:
        raise InputError(
            f"test_example must be a single example (a batch of one), got {len(test)}; use "
            "compare_rankings for many test examples"
        )
    _check_budget(cfg.k, cfg.lr, cfg.max_steps, len(train))
    ranker = Ranker(
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
    cfg = resolve_config(config, settings, "compare_rankings")
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
    ranker = Ranker(
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
