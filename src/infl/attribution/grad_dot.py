"""Gradient similarity baselines: the dot product and the cosine of test and train gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from infl.attribution._common import setup, test_grads, train_grads
from infl.chunking import ChunkSize, check_chunk_size
from infl.objective import Objective, PerExampleFn


def grad_dot(
    model: nn.Module,
    objective: Objective,
    train: Any,
    test: Any,
    *,
    measurement: PerExampleFn | None = None,
    chunk_size: ChunkSize = "auto",
) -> torch.Tensor:
    """Gradient dot product: influence with the curvature replaced by the identity.

    .. math::

        s_{ji} = -\\nabla f(z_j)^T g_i, \\qquad g_i = \\nabla\\ell(z_i) + \\lambda_{wd}\\theta

    the training gradient of :class:`~infl.objective.Objective` (as the calculator uses it).

    Sign: the same as :meth:`infl.InfluenceCalculator.influence`. **Negative = helpful**: one
    gradient step on :math:`z_i` (direction :math:`-g_i`) lowers :math:`f(z_j)` to first order
    by :math:`\\eta\\,\\nabla f(z_j)^T g_i`; positive = harmful. ``-scores / n`` is in the units
    of :meth:`~infl.InfluenceCalculator.removal_effect` up to the missing curvature.

    Parameters
    ----------
    model
        The trained module (eval mode); it is not modified.
    objective
        The training objective (per-example loss and ``weight_decay``).
    train
        The ``n`` training examples (tensors, a map-style ``Dataset``, a non-shuffling
        ``DataLoader`` or :class:`~infl.IndexedData`).
    test
        The ``m`` test examples.
    measurement
        ``(model, batch) -> Tensor[b]``, :math:`f`; default: the per-example loss.
    chunk_size
        Examples per gradient chunk (memory vs. speed, not the result); ``"auto"`` (default)
        as :class:`~infl.InfluenceCalculator` picks it (:mod:`infl.chunking`).

    Returns
    -------
    Tensor ``[m, n]``
        Test-major scores, in the model's dtype and device.

    Notes
    -----
    Cost: one gradient pass over the test data (``[m, p]`` kept) and one over the training
    data, streamed in chunks of ``chunk_size`` (``[chunk_size, p]`` at a time; ``[n, p]`` is
    never formed). No Hessian-vector product. Use it as the cheapest first-order baseline,
    or when the curvature is too ill-conditioned to invert; it over-weights examples with
    large gradients (outliers, mislabeled points), which :func:`grad_cosine` removes.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from infl import Objective
    >>> X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    >>> grad_dot(nn.Linear(3, 2).eval(), Objective("cross_entropy"), (X, y),
    ...          (X[:2], y[:2])).shape
    torch.Size([2, 20])
    """
    check_chunk_size(chunk_size)
    wrapper, train_data, test_data, fn = setup(model, objective, train, test, measurement)
    t = test_grads(wrapper, fn, test_data, chunk_size)
    scores = torch.empty(t.shape[0], len(train_data), dtype=t.dtype, device=t.device)
    for start, g in train_grads(wrapper, train_data, chunk_size):
        scores[:, start : start + g.shape[0]] = -(t @ g.T)
    return scores


def grad_cosine(
    model: nn.Module,
    objective: Objective,
    train: Any,
    test: Any,
    *,
    measurement: PerExampleFn | None = None,
    chunk_size: ChunkSize = "auto",
    eps: float = 1e-12,
) -> torch.Tensor:
    """Gradient cosine similarity, with the sign of influence.

    .. math::

        s_{ji} = -\\frac{\\nabla f(z_j)^T g_i}{\\max(\\|\\nabla f(z_j)\\|\\,\\|g_i\\|,\\ \\epsilon)}
        \\in [-1, 1]

    with :math:`g_i` the calculator's training gradient (see :func:`grad_dot`).

    Sign: as :meth:`infl.InfluenceCalculator.influence` — **negative = helpful** (the train
    gradient points the way the test gradient does, so a step on :math:`z_i` lowers
    :math:`f(z_j)`), positive = harmful. Invariant to rescaling either gradient; a zero
    gradient scores 0.

    Parameters
    ----------
    model, objective, train, test, measurement, chunk_size
        As in :func:`grad_dot`.
    eps
        :math:`\\epsilon`, the floor of the norm product (keeps a zero gradient finite).

    Returns
    -------
    Tensor ``[m, n]``
        Test-major scores in :math:`[-1, 1]`.

    Notes
    -----
    Cost: that of :func:`grad_dot` (the norms come from the same pass). Use it when gradient
    magnitudes vary wildly across training examples (Barshan et al. 2020's relative
    influence and Pruthi et al.'s cosine variant of TracIn follow the same idea): it ranks
    by direction only. Its self-scores :math:`-\\cos(\\nabla\\ell_i, \\nabla\\ell_i +
    \\lambda_{wd}\\theta)` are :math:`-1` without weight decay; with it they depend on how far
    the decay term tilts small gradients, so any mislabel-detection power they show comes
    from the gradient norm leaking through that term.
    """
    check_chunk_size(chunk_size)
    wrapper, train_data, test_data, fn = setup(model, objective, train, test, measurement)
    t = test_grads(wrapper, fn, test_data, chunk_size)
    t_norm = t.norm(dim=1)
    scores = torch.empty(t.shape[0], len(train_data), dtype=t.dtype, device=t.device)
    for start, g in train_grads(wrapper, train_data, chunk_size):
        denom = (t_norm[:, None] * g.norm(dim=1)[None, :]).clamp_min(eps)
        scores[:, start : start + g.shape[0]] = -(t @ g.T) / denom
    return scores.clamp_(-1.0, 1.0)
