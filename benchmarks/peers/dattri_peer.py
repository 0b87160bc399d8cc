"""dattri (``dattri.algorithm.influence_function``, tested with 0.3.0).

Attributors: ``IFAttributorExplicit`` (dense Hessian, ``regularization`` = lambda),
``IFAttributorCG`` (``max_iter``; ``tol``, absolute: ``rtol`` x the smallest test gradient norm),
``IFAttributorLiSSA`` (Koh & Liang's recursion ``x <- v + (1 - d) x - H x / s``; its fixed point
is ``(H + d s I)^{-1} v``, so ``d = lambda / sigma`` and ``s = sigma``), ``IFAttributorArnoldi``
(``proj_dim`` = rank, ``max_iter`` = Krylov steps) and ``IFAttributorEKFAC`` (``nn.Linear``
layers only; ``damping`` = lambda). The task's loss is the mean cross-entropy of a batch.

Sign: ``attribute(train, test)`` returns ``[n, m]`` = ``+grad l(train)^T (H + lambda I)^{-1}
grad l(test)``; ``infl = -dattri.T``. The training loader is one batch of all ``n`` examples:
dattri recomputes the test inverse-HVPs once per training batch, and its explicit/CG/LiSSA
Hessians are those of each full-data batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .common import Problem, Setting

NAME = "dattri"
METHODS = frozenset({"exact", "cg", "lissa", "arnoldi", "ekfac"})


def available() -> str | None:
    """``None`` when importable, else why not."""
    try:
        import dattri.algorithm.influence_function  # noqa: F401
    except Exception as err:
        return f"not importable ({type(err).__name__}: {err})"
    return None


def supports(problem: Problem, setting: Setting) -> str | None:
    """``None`` when dattri has ``setting.method`` for this model, else why not."""
    if setting.method not in METHODS:
        return "no such method in dattri"
    if setting.method == "ekfac" and problem.name == "cnn":
        return "dattri's EK-FAC covers nn.Linear layers only (it would leave the convolutions out)"
    full_batch = setting.method in ("cg", "arnoldi") or (
        setting.method == "lissa" and setting.batch_size is None
    )
    if full_batch and (problem.p > 20_000 or problem.n > 1_000):
        # measured: IFAttributorCG on the 85k-parameter MLP (n = 1,438, one batch, as its
        # per-batch sum of inverse-HVPs requires) passed 21 GB and was OOM-killed; on the CNN
        # (n = 1,438) the CG row passed 12 GB and was stopped
        return f"its one-batch HVPs over n = {problem.n:,} examples passed 12-21 GB of memory"
    if setting.method == "lissa" and problem.p > 20_000:
        return "not measured at this size (its full-batch HVPs passed 21 GB on this model)"
    if setting.method == "exact" and problem.p > 1_000:
        # measured: IFAttributorExplicit (torch.func.hessian of the batch loss) on the digits
        # CNN, p = 2,514, n = 200, passed 13 GB of memory and was stopped
        return f"dense Hessian by torch.func.hessian does not fit in memory at p = {problem.p:,}"
    return None


def scores(problem: Problem, setting: Setting) -> torch.Tensor:
    """Scores ``[m, n]`` in infl's sign (see the module docstring)."""
    from dattri.algorithm import influence_function as dif
    from dattri.task import AttributionTask

    model = problem.fresh_model()
    dtype = problem.dtype

    def loss_func(params: dict[str, torch.Tensor], data: Any) -> torch.Tensor:
        x, y = data
        # LiSSA's collate casts inputs to float32: bring them back to the model's dtype
        out = torch.func.functional_call(model, params, (x.to(dtype),))
        return nn.functional.cross_entropy(out, y.long())

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    lam = setting.damping
    attributor: Any
    if setting.method == "exact":
        attributor = dif.IFAttributorExplicit(task=task, regularization=lam)
    elif setting.method == "cg":
        attributor = dif.IFAttributorCG(
            task=task,
            max_iter=setting.max_iter,
            # dattri's tol is absolute on ||r||: the relative rtol of the smallest rhs
            tol=setting.rtol * float(problem.test_grad_norms().min()),
            regularization=lam,
        )
    elif setting.method == "lissa":
        attributor = dif.IFAttributorLiSSA(
            task=task,
            batch_size=setting.batch_size or problem.n,
            recursion_depth=setting.depth,
            damping=lam / setting.scale,
            scaling=setting.scale,
        )
    elif setting.method == "arnoldi":
        attributor = dif.IFAttributorArnoldi(
            task=task, proj_dim=setting.rank, max_iter=setting.krylov, regularization=lam
        )
    elif setting.method == "ekfac":
        attributor = dif.IFAttributorEKFAC(task=task, damping=lam)
    else:  # pragma: no cover - guarded by supports()
        raise ValueError(setting.method)
    train = DataLoader(
        TensorDataset(problem.x_train, problem.y_train), batch_size=problem.n, shuffle=False
    )
    test = DataLoader(
        TensorDataset(problem.x_test, problem.y_test), batch_size=problem.m, shuffle=False
    )
    attributor.cache(train)
    values = attributor.attribute(train, test)
    return -values.detach().T.to(dtype)
