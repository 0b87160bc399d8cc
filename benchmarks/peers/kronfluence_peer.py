"""kronfluence (tested with 1.0.1): K-FAC and EK-FAC (``FactorArguments(strategy=...)``).

The task's training loss is the *summed* cross-entropy of a batch (kronfluence's convention; its
factors are averages over examples, so the curvature is the mean-loss Fisher), with labels drawn
from the model's predictive distribution when ``sample=True`` (the true Fisher, as infl's
``fisher="true"``). ``ScoreArguments(damping_factor=lambda)`` adds lambda to the (EK-)FAC
eigenvalues. Factors and scores are written to a temporary folder (kronfluence's design) that is
part of the timed run. All dtypes are set to the model's.

Sign: pairwise scores are ``+grad l(test)^T (F + lambda I)^{-1} grad l(train)`` (``[m, n]``);
``infl = -kronfluence``.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .common import Problem, Setting

NAME = "kronfluence"
METHODS = frozenset({"kfac", "ekfac"})
BATCH = 512
"""kronfluence's ``per_device_batch_size`` for the factors and the training side of the scores
(at most ``n``)."""


def available() -> str | None:
    """``None`` when importable, else why not."""
    try:
        import kronfluence  # noqa: F401
    except Exception as err:
        return f"not importable ({type(err).__name__}: {err})"
    return None


def supports(problem: Problem, setting: Setting) -> str | None:
    """``None`` when kronfluence has ``setting.method``, else why not."""
    return None if setting.method in METHODS else "no such method in kronfluence"


def _task() -> Any:
    from kronfluence.task import Task

    class ClassificationTask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Any:
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.distributions.Categorical(logits=logits.detach()).sample()
            return nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Any:
            x, y = batch
            return nn.functional.cross_entropy(model(x), y, reduction="sum")

    return ClassificationTask()


def scores(problem: Problem, setting: Setting) -> torch.Tensor:
    """Scores ``[m, n]`` in infl's sign (see the module docstring)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    dtype = problem.dtype
    task = _task()
    model = prepare_model(problem.fresh_model(), task)
    train = TensorDataset(problem.x_train, problem.y_train)
    query = TensorDataset(problem.x_test, problem.y_test)
    factor_args = FactorArguments(
        strategy=setting.method,
        activation_covariance_dtype=dtype,
        gradient_covariance_dtype=dtype,
        per_sample_gradient_dtype=dtype,
        lambda_dtype=dtype,
    )
    score_args = ScoreArguments(
        damping_factor=setting.damping,
        per_sample_gradient_dtype=dtype,
        precondition_dtype=dtype,
        score_dtype=dtype,
    )
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(
            analysis_name="peers",
            model=model,
            task=task,
            cpu=True,
            disable_tqdm=True,
            output_dir=tmp,
            log_level=logging.ERROR,
        )
        batch = min(problem.n, BATCH)
        analyzer.fit_all_factors(
            factors_name="f",
            dataset=train,
            per_device_batch_size=batch,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            scores_name="s",
            factors_name="f",
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=problem.m,
            per_device_train_batch_size=batch,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        values = analyzer.load_pairwise_scores("s")["all_modules"]
    return -values.detach().to(dtype)
