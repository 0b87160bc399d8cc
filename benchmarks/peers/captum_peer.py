"""Captum (``captum.influence``, tested with 0.9.0).

``NaiveInfluenceFunction`` forms the Hessian explicitly (``torch.autograd.functional.hessian`` on
each batch's loss), adds ``hessian_reg`` = lambda to its diagonal and keeps the top
``projection_dim`` eigenpairs; with ``projection_dim = p`` and a tiny ``hessian_inverse_tol`` it
is the exact damped inverse ("exact" here). ``ArnoldiInfluenceFunction`` keeps ``projection_dim``
= rank eigenpairs of an ``arnoldi_dim`` = Krylov-dimension Arnoldi run ("arnoldi").

Units and sign: Captum's Hessian is that of the *summed* loss, ``n H`` (checked: with
``hessian_reg = n lambda`` its scores are exactly ``1/n`` times infl's dense answer), so the
adapter passes ``hessian_reg = n lambda`` and multiplies by ``n``. Its ``influence((x, y))``
returns ``+grad l(test)^T (n H + n lambda I)^{-1} grad l(train)``; ``infl = -n Captum``. The
training set is one batch of all ``n`` examples.
"""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

from .common import Problem, Setting

NAME = "Captum"
METHODS = frozenset({"exact", "arnoldi"})


def available() -> str | None:
    """``None`` when importable, else why not."""
    try:
        import captum.influence  # noqa: F401
    except Exception as err:
        return f"not importable ({type(err).__name__}: {err})"
    return None


def supports(problem: Problem, setting: Setting) -> str | None:
    """``None`` when Captum has ``setting.method`` for this model, else why not."""
    if setting.method not in METHODS:
        return "no such method in Captum"
    if setting.method == "exact" and problem.p > 20_000:
        return f"dense p x p Hessian (p = {problem.p:,}) does not fit"
    return None


def scores(problem: Problem, setting: Setting) -> torch.Tensor:
    """Scores ``[m, n]`` in infl's sign (see the module docstring)."""
    from captum.influence import NaiveInfluenceFunction
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction
    from torch.utils.data import DataLoader, TensorDataset

    model = problem.fresh_model()
    loader = DataLoader(
        TensorDataset(problem.x_train, problem.y_train), batch_size=problem.n, shuffle=False
    )
    loss = nn.CrossEntropyLoss(reduction="mean")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "model.pt")
        torch.save(model.state_dict(), checkpoint)
        common = {
            "model": model,
            "train_dataset": loader,
            "checkpoint": checkpoint,
            "loss_fn": loss,
            "batch_size": problem.n,
            "sample_wise_grads_per_batch": True,
            "hessian_reg": setting.damping * problem.n,
        }
        if setting.method == "exact":
            tracker = NaiveInfluenceFunction(
                **common, projection_dim=problem.p, hessian_inverse_tol=1e-30
            )
        else:
            tracker = ArnoldiInfluenceFunction(
                **common,
                projection_dim=setting.rank,
                arnoldi_dim=setting.krylov,
                hessian_inverse_tol=1e-30,
            )
        values = tracker.influence((problem.x_test, problem.y_test))
    return -problem.n * values.detach()
