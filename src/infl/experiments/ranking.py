"""Helpfulness of every training example for mis-predicted test examples.

The three rankings of :func:`infl.experiments.correct_prediction` (see the sign logic in
:mod:`infl.experiments.correction`): influence through an
:class:`~infl.InfluenceCalculator` (built here on first use unless one is given), cosine
similarity of gradients, and a seeded random permutation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from infl.calculator import InfluenceCalculator
from infl.data import IndexedData
from infl.errors import InputError
from infl.experiments.correction_records import RANKINGS, MeasurementName
from infl.model import ModelWrapper
from infl.objective import (
    LogitMeasurement,
    MarginMeasurement,
    Objective,
    PerExampleFn,
    margin_measurement,
)
from infl.solvers import ConjugateGradient, Solver

__all__ = ["Ranker", "measurement_sign"]


def measurement_sign(measurement: PerExampleFn, objective: Objective) -> int:
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


class Ranker:
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
            sign = measurement_sign(fn, objective)
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
