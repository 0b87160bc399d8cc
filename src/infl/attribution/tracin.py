"""TracIn-CP (Pruthi, Liu, Kale & Sundararajan, NeurIPS 2020) over user-given checkpoints."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from infl.attribution._common import setup, test_grads, train_grads
from infl.chunking import ChunkSize, check_chunk_size
from infl.errors import InputError
from infl.objective import Objective, PerExampleFn


def _as_module(checkpoint: Any, model: nn.Module | None, index: int) -> nn.Module:
    """A module holding checkpoint ``index``; a state_dict is loaded into a copy of ``model``."""
    if isinstance(checkpoint, nn.Module):
        return checkpoint
    if not isinstance(checkpoint, Mapping):
        raise InputError(
            f"checkpoint {index} is a {type(checkpoint).__name__}; each checkpoint must be an "
            "nn.Module or a state_dict (a mapping of parameter names to tensors)"
        )
    if model is None:
        raise InputError(
            f"checkpoint {index} is a state_dict, which needs an architecture: pass model= "
            "(a module of the same architecture; it is copied, never modified)"
        )
    module = copy.deepcopy(model)
    try:
        module.load_state_dict(checkpoint)
    except (RuntimeError, KeyError) as err:
        first = str(err).splitlines()[0]
        raise InputError(
            f"checkpoint {index} does not fit model=: {first}. Pass state_dicts saved from "
            "this architecture (model.state_dict())"
        ) from err
    return module.eval()


def tracin_cp(
    checkpoints: Sequence[Any],
    learning_rates: Sequence[float] | float,
    objective: Objective,
    train: Any,
    test: Any,
    *,
    model: nn.Module | None = None,
    measurement: PerExampleFn | None = None,
    chunk_size: ChunkSize = "auto",
) -> torch.Tensor:
    """TracIn-CP: gradient dot products summed over training checkpoints.

    .. math::

        s_{ji} = -\\sum_{c=1}^{C} \\eta_c\\, \\nabla f(z_j;\\theta_c)^T g_i(\\theta_c),
        \\qquad g_i(\\theta) = \\nabla\\ell(z_i;\\theta) + \\lambda_{wd}\\theta

    (Pruthi et al. 2020, eq. 3, with infl's training gradient). With one checkpoint and
    :math:`\\eta = 1` it is :func:`~infl.attribution.grad_dot` at that checkpoint.

    Sign: the same as :meth:`infl.InfluenceCalculator.influence` (Pruthi et al.'s TracIn
    with the sign flipped). **Negative = helpful** (proponent: the SGD steps on :math:`z_i`
    lowered :math:`f(z_j)`), positive = harmful (opponent).

    Parameters
    ----------
    checkpoints
        :math:`\\theta_1..\\theta_C`: ``nn.Module`` objects (eval mode, never modified) or
        ``state_dict`` mappings (then ``model`` gives the architecture).
    learning_rates
        :math:`\\eta_c`, one finite positive number per checkpoint, or one number for all.
        Pruthi et al. use the learning rate in force between checkpoints (times the number of
        steps between them, when the checkpoints are sparse).
    objective
        The training objective (loss and ``weight_decay``).
    train, test
        ``n`` training and ``m`` test examples (as for :func:`~infl.attribution.grad_dot`).
    model
        The architecture for ``state_dict`` checkpoints (deep-copied, never modified).
    measurement
        ``(model, batch) -> Tensor[b]``, :math:`f`; default: the per-example loss.
    chunk_size
        Examples per gradient chunk (memory vs. speed, not the result); ``"auto"`` (default)
        as :class:`~infl.InfluenceCalculator` picks it (:mod:`infl.chunking`).

    Returns
    -------
    Tensor ``[m, n]``
        Test-major scores in the dtype and device of the checkpoints.

    Notes
    -----
    Cost: ``C`` times that of :func:`~infl.attribution.grad_dot` (a test and a streamed
    training gradient pass per checkpoint; ``[n, p]`` is never formed) and no HVP. It needs
    the training trajectory, not only the final model; it explains the *training run* (what
    each step did) rather than the final optimum, so it does not predict leave-one-out
    retraining at convergence. Useful for mislabel detection (its self-scores
    :math:`-\\sum_c \\eta_c\\|g_i(\\theta_c)\\|^2`, negated, are large for hard examples).
    """
    check_chunk_size(chunk_size)
    if isinstance(checkpoints, (nn.Module, Mapping)) or not isinstance(checkpoints, Sequence):
        raise InputError(
            f"checkpoints must be a list of modules or state_dicts, got "
            f"{type(checkpoints).__name__}; wrap a single one in a list"
        )
    if len(checkpoints) == 0:
        raise InputError("checkpoints is empty; TracIn-CP needs at least one checkpoint")
    rates = (
        [float(learning_rates)] * len(checkpoints)
        if isinstance(learning_rates, (int, float))
        else [float(r) for r in learning_rates]
    )
    if len(rates) != len(checkpoints):
        raise InputError(
            f"got {len(rates)} learning rates for {len(checkpoints)} checkpoints; pass one "
            "per checkpoint (or a single number for all)"
        )
    for c, rate in enumerate(rates):
        if not (math.isfinite(rate) and rate > 0):
            raise InputError(
                f"learning rate {c} is {rate}; each must be a finite number > 0 (the step "
                "size in force at that checkpoint)"
            )
    scores: torch.Tensor | None = None
    for c, (checkpoint, rate) in enumerate(zip(checkpoints, rates, strict=True)):
        module = _as_module(checkpoint, model, c)
        wrapper, train_data, test_data, fn = setup(module, objective, train, test, measurement)
        t = test_grads(wrapper, fn, test_data, chunk_size)
        if scores is None:
            scores = torch.zeros(t.shape[0], len(train_data), dtype=t.dtype, device=t.device)
        elif (t.dtype, t.device) != (scores.dtype, scores.device):
            raise InputError(
                f"checkpoint {c} has dtype {t.dtype} on {t.device} but checkpoint 0 had "
                f"{scores.dtype} on {scores.device}; convert all checkpoints alike"
            )
        for start, g in train_grads(wrapper, train_data, chunk_size):
            scores[:, start : start + g.shape[0]] -= rate * (t @ g.T)
    assert scores is not None
    return scores
