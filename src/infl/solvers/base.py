"""The interface every inverse-HVP solver shares.

A solver is a frozen dataclass of hyperparameters, validated at construction. It solves
:math:`(H + \\lambda I) X^T = B^T` for ``k`` right-hand sides at once (``B`` is ``[k, p]``),
where :math:`\\lambda` = ``damping`` is added as operator algebra and means the same for every
solver. ``solver.fit(operator)`` does any one-time work (factorising, estimating a scale) and
returns a :class:`FittedSolver` whose ``solve(rhs)`` can be called many times;
``solver.solve(operator, rhs)`` is the one-shot shortcut.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from infl.errors import InputError, NonFiniteError
from infl.finite import all_finite
from infl.operators import LinearOperator
from infl.spectral.damping import AutoDamping

if TYPE_CHECKING:
    from infl.factor_cache import FitFactors


@dataclass(frozen=True)
class SolveResult:
    """The outcome of one inverse-HVP solve.

    Attributes
    ----------
    value
        ``[k, p]``: row ``j`` approximates :math:`(H+\\lambda I)^{-1} b_j`.
    converged
        Whether every right-hand side met the solver's tolerance.
    iterations
        Iterations (CG), recursion steps (LiSSA, summed over repeats) or 0 (direct solvers).
    residual_norms
        ``[k]``: relative residuals :math:`\\|(H+\\lambda I)x_j - b_j\\| / \\|b_j\\|`.
    trace
        Per-iteration history, ``[iterations, k]`` (CG: relative residual; LiSSA: norm of the
        iterate's increment relative to :math:`\\|b_j\\|`); empty for direct solvers.
    info
        Solver-specific facts (eigenvalue range, scale used, ...).
    """

    value: torch.Tensor
    converged: bool
    iterations: int
    residual_norms: torch.Tensor
    trace: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0))
    info: dict[str, Any] = field(default_factory=dict)


class FittedSolver(ABC):
    """A solver fitted to one curvature operator :math:`H`, solving with :math:`H + \\lambda I`.

    Attributes
    ----------
    solver
        The hyperparameters it was fitted with (``solver.damping`` is :math:`\\lambda`).
    base
        :math:`H`, the undamped operator it was fitted to.
    operator
        :math:`A = H + \\lambda I`, the operator every ``solve`` inverts.
    auto_damping
        With ``solver.damping == "auto"``: the :class:`~infl.spectral.AutoDamping` record of how
        :math:`\\lambda` was chosen (``None`` for an explicit damping).
    """

    def __init__(
        self, solver: Solver, base: LinearOperator, *, auto_damping: AutoDamping | None = None
    ) -> None:
        if solver.damping == "auto" and auto_damping is None:
            raise InputError(
                f"{type(solver).__name__}(damping='auto') must resolve the damping at fit time; "
                "fit the solver with solver.fit(operator) instead of building a FittedSolver"
            )
        self.solver = solver
        self.base = base
        self.auto_damping = auto_damping if solver.damping == "auto" else None
        self.operator = base.damped(self.damping)

    @property
    def damping(self) -> float:
        """:math:`\\lambda`, always a number (the resolved one for ``damping="auto"``)."""
        if self.auto_damping is not None:
            return float(self.auto_damping.damping)
        return float(self.solver.damping)

    @property
    def info(self) -> dict[str, Any]:
        """Facts about the fit, as plain numbers and strings (damping, spectrum estimates, ...).

        Solvers add their own keys; every ``SolveResult.info`` starts from this dictionary.
        With ``damping="auto"`` it holds the resolved ``damping``, ``damping_auto=True``, the
        eigenvalue estimates, the margin and the rule (:meth:`AutoDamping.facts`).
        ``operator_dense`` says whether the operator now answers products from its assembled
        ``[p, p]`` matrix (:meth:`~infl.operators.LinearOperator.expect_products`).
        """
        out: dict[str, Any] = {"solver": type(self.solver).__name__, "damping": self.damping}
        out["operator_dense"] = self.base.answers_dense
        if self.auto_damping is not None:
            out.update(self.auto_damping.facts())
        else:
            out["damping_auto"] = False
        return out

    def with_damping(self, damping: float) -> FittedSolver:
        """The same solver at another :math:`\\lambda`, reusing whatever the fit computed.

        The default refits ``replace(solver, damping=damping)`` on :attr:`base`; solvers whose
        fit does not depend on :math:`\\lambda`, or yields every :math:`\\lambda` at once
        (eigenpairs, Kronecker factors, an estimated spectrum), override it to cost no HVP.
        """
        check_damping(damping)
        solver: Any = self.solver  # a frozen dataclass, as every Solver is
        refitted: FittedSolver = dataclasses.replace(solver, damping=float(damping)).fit(self.base)
        return refitted

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The inverse as a low-rank product, when that is exactly what :meth:`solve` applies.

        Returns ``(U, w)`` with ``U`` ``[r, p]`` (orthonormal rows) and ``w`` ``[r]`` such that
        ``solve(b).value == (b @ U.T * w) @ U``, i.e. :math:`A^{-1} \\approx U^T
        \\operatorname{diag}(w) U`, or ``None`` (the default) for solvers that are not of that
        form. :class:`~infl.InfluenceCalculator` uses it to project training gradients onto
        the ``r`` directions once (``[n, r]``) and score later test batches without a solve.
        """
        return None

    def blocks(self) -> dict[str, list[slice]] | None:
        """Parameter blocks of a block-diagonal solver: ``{name: slices of the flat vector}``.

        A solver whose inverse is block-diagonal (K-FAC, EK-FAC: one block per layer) returns
        the slices of each block, so that scores split exactly into per-block terms that sum
        to the total; ``None`` (the default) means the solver couples all parameters.
        """
        return None

    def take_train_factors(self) -> FitFactors | None:
        """The training gradients' factors the fit computed anyway, handed over once.

        A fit whose data pass differentiates the training losses themselves keeps each
        chunk's layer inputs and output gradients when they fit in its byte budget; the
        calculator adopts them (:class:`~infl.factor_cache.FactorCache`) so that its first
        scoring pass reads neither the data nor the model. By default these are the factors of
        the operator's closed-form Hessian assembly
        (:meth:`HessianOperator.take_train_factors
        <infl.operators.HessianOperator.take_train_factors>`), which the exact solver always
        makes and CG or Arnoldi make on a small model whose products come from the dense matrix
        (``dense="auto"``); K-FAC / EK-FAC with the empirical Fisher keep their own. ``None``
        when there are none, and after the first call.
        """
        take = getattr(self.base, "take_train_factors", None)
        return take() if callable(take) else None

    def state(self) -> dict[str, Any]:
        """What the fit learned, as a dict of tensors and plain values (for saving).

        Together with the solver's hyperparameters it rebuilds this fitted solver on the same
        operator through :meth:`Solver.restore`, at no HVP and no data pass. Nested dicts,
        lists, strings, numbers, ``None`` and tensors only, so that
        ``torch.load(weights_only=True)`` reads it back. Solvers that cannot be saved keep
        this default, which raises :class:`~infl.errors.InputError`.
        """
        raise InputError(
            f"{type(self.solver).__name__} does not support saving its fitted state; refit it "
            "after loading instead (fit it on the same operator), or use one of the built-in "
            "solvers, which all can be saved"
        )

    @abstractmethod
    def solve(self, rhs: torch.Tensor, *, progress: bool = False) -> SolveResult:
        """Solve for ``rhs`` of shape ``[k, p]`` (or ``[p]``, treated as ``k = 1``)."""


class Solver(ABC):
    """Base class of the inverse-HVP solvers (frozen dataclasses with a ``damping`` field)."""

    damping: float | Literal["auto"]

    @property
    def low_rank_scoring(self) -> bool:
        """Whether the fitted solver will be a low-rank inverse (see :meth:`FittedSolver.low_rank`).

        Known before fitting, so that the calculator never builds the ``[n, p]`` training
        gradients for a solver that scores from ``[n, r]`` projections.
        """
        return False

    @abstractmethod
    def fit(self, operator: LinearOperator, *, progress: bool = False) -> FittedSolver:
        """Prepare to solve with ``operator + damping * I`` (``operator`` is undamped)."""

    def solve(
        self, operator: LinearOperator, rhs: torch.Tensor, *, progress: bool = False
    ) -> SolveResult:
        """:math:`(A + \\lambda I)^{-1}` applied to each row of ``rhs``: fit, then solve."""
        return self.fit(operator, progress=progress).solve(rhs, progress=progress)

    def restore(self, operator: LinearOperator, state: dict[str, Any]) -> FittedSolver:
        """The fitted solver that :meth:`FittedSolver.state` described, rebuilt on ``operator``.

        ``operator`` is the undamped curvature the state was fitted to; no HVP is spent (the
        calculator checks that model and data are the same before calling this). Solvers that
        cannot be saved keep this default, which raises :class:`~infl.errors.InputError`.
        """
        raise InputError(
            f"{type(self).__name__} cannot restore a saved fitted state; fit it instead "
            "(solver.fit(operator))"
        )


def state_tensor(
    state: dict[str, Any], key: str, operator: LinearOperator, shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """``state[key]`` as a tensor on the operator's device, checked (for :meth:`Solver.restore`).

    Raises
    ------
    InputError
        The entry is missing, not a tensor, or not of ``shape`` (a state of another model).
    """
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        found = "missing" if value is None else f"a {type(value).__name__}"
        raise InputError(
            f"the saved solver state has no tensor {key!r} ({found}): the file was written by "
            "another solver or another version of infl. Refit the solver and save it again."
        )
    if shape is not None and tuple(value.shape) != shape:
        raise InputError(
            f"the saved solver state's {key!r} has shape {tuple(value.shape)}, expected {shape} "
            "for this model: it was fitted to another model. Refit the solver and save it again."
        )
    return value.to(device=operator.device)


SPEC_OMIT_DEFAULT = "spec_omit_default"
"""Field metadata key: the field is left out of :func:`solver_spec` while it has its default.

For fields added after stores and saved fits recorded their solver's spec: at the default
(the behaviour before the field existed) the spec stays the one those files hold, so they
still match; :func:`solver_from_spec` fills the default back in."""


def solver_spec(solver: Solver) -> dict[str, Any]:
    """A solver's class name and hyperparameters as plain JSON values (nested solvers too)."""
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(solver):  # type: ignore[arg-type]
        value = getattr(solver, f.name)
        if f.metadata.get(SPEC_OMIT_DEFAULT) and value == f.default:
            continue
        fields[f.name] = solver_spec(value) if isinstance(value, Solver) else value
    return {"solver": type(solver).__name__, "fields": fields}


def _solver_classes() -> dict[str, type[Solver]]:
    found: dict[str, type[Solver]] = {}
    todo: list[type[Any]] = [Solver]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found.setdefault(sub.__name__, sub)
            todo.append(sub)
    return found


def solver_from_spec(spec: Any) -> Solver:
    """The solver that :func:`solver_spec` described (validated by its constructor).

    Raises
    ------
    InputError
        ``spec`` is not such a description, or names a solver class that is not defined.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("fields"), dict):
        raise InputError(f"not a solver description (expected {{solver, fields}}): {spec!r}")
    classes = _solver_classes()
    cls = classes.get(str(spec.get("solver")))
    if cls is None:
        raise InputError(
            f"the saved solver {spec.get('solver')!r} is not defined here (known: "
            f"{sorted(classes)}); import the module that defines it before loading"
        )
    fields = {
        key: solver_from_spec(value) if isinstance(value, dict) and "solver" in value else value
        for key, value in spec["fields"].items()
    }
    try:
        return cls(**fields)
    except TypeError as err:
        raise InputError(
            f"cannot rebuild {cls.__name__} from the saved hyperparameters {fields} ({err}): "
            "the file was written by another version of infl. Refit and save again."
        ) from err


def check_damping(damping: Any, *, allow_auto: bool = False) -> None:
    """Refuse a damping that is not a finite number >= 0 (or ``"auto"`` where allowed).

    Raises
    ------
    InputError
        Naming the value found and the fix (``damping="auto"`` for a misspelt string).
    """
    accepted = "a finite number >= 0" + (" or 'auto'" if allow_auto else "")
    if isinstance(damping, str):
        if allow_auto and damping == "auto":
            return
        hint = (
            " (damping='auto' chooses it from a Lanczos estimate of lambda_min(H) at fit time)"
            if allow_auto
            else "; for a solver that supports it, damping='auto' chooses one at fit time"
        )
        raise InputError(f"damping must be {accepted}, got {damping!r}{hint}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise InputError(f"damping must be {accepted}, got {type(damping).__name__} {damping!r}")
    if not math.isfinite(damping) or damping < 0:
        raise InputError(
            f"damping must be {accepted}, got {damping}: H + damping*I is made positive "
            "definite by raising damping, never by a negative one"
            + (" (or use damping='auto')" if allow_auto else "")
        )


def check_positive(name: str, value: float, *, integer: bool = False) -> None:
    ok = math.isfinite(value) and value > 0 and (not integer or float(value).is_integer())
    if not ok:
        kind = "a positive integer" if integer else "a positive finite number"
        raise InputError(f"{name} must be {kind}, got {value!r}")


def as_rhs(rhs: torch.Tensor, operator: LinearOperator) -> torch.Tensor:
    """Validate right-hand sides and return them as ``[k, p]`` in the operator's dtype."""
    if rhs.dim() == 1:
        rhs = rhs.reshape(1, -1)
    if rhs.dim() != 2 or rhs.shape[1] != operator.size:
        raise InputError(
            f"right-hand sides must have shape [k, p={operator.size}] or [p], "
            f"got {tuple(rhs.shape)}"
        )
    if rhs.shape[0] == 0:
        raise InputError("no right-hand sides to solve (k = 0)")
    if not all_finite(rhs):
        raise NonFiniteError("a right-hand side contains NaN or infinite values")
    return rhs.to(device=operator.device, dtype=operator.dtype)


def relative_residuals(
    operator: LinearOperator, value: torch.Tensor, rhs: torch.Tensor
) -> torch.Tensor:
    """:math:`\\|A x_j - b_j\\| / \\|b_j\\|` for each row (``0/0`` counts as 0)."""
    res = torch.linalg.vector_norm(operator.matmat(value) - rhs, dim=1)
    scale = torch.linalg.vector_norm(rhs, dim=1)
    return torch.where(scale > 0, res / scale.clamp_min(torch.finfo(rhs.dtype).tiny), res)
