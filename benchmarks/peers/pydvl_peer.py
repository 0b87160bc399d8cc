"""pyDVL (``pydvl.influence.torch``, tested with 0.10.0).

Sign: pyDVL's ``influences(..., mode=InfluenceMode.Up)`` returns
``+grad l(test)^T (H + lambda I)^{-1} grad l(train)``; infl's score is its negative, so
``infl = -pyDVL``. ``regularization`` is lambda for every method (EK-FAC:
``hessian_regularization``, added to the EK-FAC eigenvalues). The Hessian is of the mean loss
over the DataLoader's batches; LiSSA draws one shuffled batch of the loader per step
(``batch_size`` = the loader's).
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader, TensorDataset

from .common import Problem, Setting, mean_cross_entropy

NAME = "pyDVL"
METHODS = frozenset({"exact", "cg", "lissa", "arnoldi", "ekfac"})
CHUNK = 256  # examples per batch of the loader for Hessian / HVP passes
# DirectInfluence builds each batch's Hessian with torch.func (p tangents at once): its memory
# grows with batch x p; 32 examples per batch keeps the digits CNN (p = 2,514) near 2 GB
EXACT_CHUNK_LARGE_P = 32


def _pydvl_rtol(rtol: float) -> float:
    """pyDVL's ``rtol`` for a relative residual ``rtol``: it stops at ``||r|| <= rtol^2 ||b||``.

    At the comparison's default 1e-10 ("run every iteration") pyDVL gets 1e-10 itself (a
    tolerance of 1e-20 ||b||), as in earlier runs: with ``sqrt(1e-10)`` its block CG, which tests
    its recursively updated residual, stopped on the digits CNN and MLP after about half the
    iterations at a true relative error of 0.1.
    """
    return rtol if rtol <= 1e-10 else rtol**0.5


def available() -> str | None:
    """``None`` when importable, else why not."""
    try:
        import pydvl.influence.torch  # noqa: F401
    except Exception as err:  # ImportError, or a broken dependency
        return f"not importable ({type(err).__name__}: {err})"
    return None


def supports(problem: Problem, setting: Setting) -> str | None:
    """``None`` when pyDVL has ``setting.method`` for this model, else why not."""
    if setting.method not in METHODS:
        return "no such method in pyDVL"
    if setting.method == "ekfac" and problem.name == "cnn":
        return "pyDVL's EK-FAC supports nn.Linear layers only"
    return None


def scores(problem: Problem, setting: Setting) -> torch.Tensor:
    """Scores ``[m, n]`` in infl's sign (see the module docstring)."""
    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import (
        ArnoldiInfluence,
        CgInfluence,
        DirectInfluence,
        EkfacInfluence,
        LissaInfluence,
    )

    logging.getLogger("pydvl").setLevel(logging.ERROR)
    model = problem.fresh_model()
    data = TensorDataset(problem.x_train, problem.y_train)
    lam = setting.damping
    method = setting.method
    batch = CHUNK
    model_obj: object
    if method == "exact":
        batch = CHUNK if problem.p <= 1_000 else EXACT_CHUNK_LARGE_P
        model_obj = DirectInfluence(model, mean_cross_entropy, regularization=lam)
    elif method == "cg":
        model_obj = CgInfluence(
            model,
            mean_cross_entropy,
            regularization=lam,
            rtol=_pydvl_rtol(setting.rtol),
            atol=0.0,
            maxiter=setting.max_iter,
            solve_simultaneously=True,  # block CG over the m right-hand sides: its fastest mode
            warn_on_max_iteration=False,
        )
    elif method == "lissa":
        batch = setting.batch_size or problem.n
        model_obj = LissaInfluence(
            model,
            mean_cross_entropy,
            regularization=lam,
            maxiter=setting.depth,
            dampen=0.0,
            scale=setting.scale,
            rtol=0.0,  # run the full depth, as infl is asked to
            warn_on_max_iteration=False,
        )
    elif method == "arnoldi":
        model_obj = ArnoldiInfluence(
            model,
            mean_cross_entropy,
            regularization=lam,
            rank=setting.rank,
            krylov_dimension=setting.krylov,
        )
    elif method == "ekfac":
        model_obj = EkfacInfluence(model, update_diagonal=True, hessian_regularization=lam)
    else:  # pragma: no cover - guarded by supports()
        raise ValueError(method)
    loader = DataLoader(data, batch_size=batch, shuffle=False)
    fitted = model_obj.fit(loader)  # type: ignore[attr-defined]
    values = fitted.influences(
        problem.x_test, problem.y_test, problem.x_train, problem.y_train, mode=InfluenceMode.Up
    )
    return -values.detach()
