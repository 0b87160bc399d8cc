"""K-FAC and EK-FAC: block-diagonal Kronecker-factored curvature, inverted per layer.

Per supported layer (``nn.Linear``, ``nn.Conv2d``; a bias is an extra input column fed a 1)
the Fisher block is approximated from the factors of :mod:`infl.solvers.kronecker`,

.. math::

    F_l \\approx S_l \\otimes A_l = (Q_S \\otimes Q_A)\\,\\mathrm{diag}(\\Lambda)\\,
    (Q_S \\otimes Q_A)^T, \\qquad
    \\Lambda_{oi} = \\begin{cases} \\lambda^S_o\\lambda^A_i & \\text{K-FAC}\\\\
    E_n[(Q_S^T G_n Q_A)^2_{oi}] & \\text{EK-FAC}\\end{cases}

(Martens & Grosse 2015; George et al. 2018; Grosse et al. 2023). Weight decay is added to the
curvature as :math:`\\lambda_{wd} I` (it is the objective's exact Hessian term), and the
damping :math:`\\lambda` at solve time, so the inverse of one block applied to the layer's
part :math:`V` (``[out, in]``) of a vector is

.. math::

    Q_S\\,\\big[(Q_S^T V Q_A) \\oslash (\\Lambda + \\lambda_{wd} + \\lambda)\\big]\\,Q_A^T,

matrix products only: no Kronecker product is ever formed.

**Weight decay per parameter** (:class:`~infl.objective.WeightDecayGroups`): the decay term
:math:`\\Lambda` is diagonal, and when a layer's weight and bias share :math:`\\lambda_j` it
is a constant added to every eigenvalue, as above. When they differ (e.g. no decay on the
bias), in the eigenbasis the decay of that block is :math:`\\lambda_W I + \\delta\\, q q^T`
on each output row, with :math:`\\delta = \\lambda_b - \\lambda_W` and :math:`q = Q_A^T
e_{bias}` (the bias row of :math:`Q_A`): a rank-one correction, inverted *exactly* by
Sherman-Morrison at :math:`O(out\\cdot in)` per vector. So the decay term is never
approximated: K-FAC/EK-FAC approximate only the Fisher. ``info["weight_decay"]`` is the number,
or ``{parameter name: λ_j}`` with groups.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from infl import distributed
from infl.data import IndexedData
from infl.errors import InputError, NotPositiveDefiniteError
from infl.factor_cache import FitFactors
from infl.linear_grads import Factors
from infl.model import ModelWrapper
from infl.operators import LinearOperator
from infl.solvers.base import (
    SPEC_OMIT_DEFAULT,
    FittedSolver,
    Solver,
    SolveResult,
    as_rhs,
    check_damping,
    state_tensor,
)
from infl.solvers.fisher_labels import builtin_loss_name
from infl.solvers.kronecker import (
    Partition,
    collect_eigen_diagonal,
    collect_factors,
    eigendecompose,
    partition,
)
from infl.solvers.kronecker_stream import Replay

FisherType = Literal["true", "empirical"]
DEFAULT_REPLAY_BYTES = 1 << 30
""":class:`EKFAC`'s default ``replay_bytes``: pass 1's records kept for pass 2 (1 GiB)."""
HEURISTIC_FACTOR = 0.1
"""``damping="heuristic"`` uses this times the mean eigenvalue of the (EK-)FAC curvature."""


def _check_kronecker_damping(damping: Any) -> None:
    if isinstance(damping, str):
        if damping == "auto":
            raise InputError(
                "damping='auto' is not available for K-FAC/EK-FAC: it chooses lambda above "
                "-lambda_min(H) from a Lanczos estimate, but the (EK-)FAC curvature is positive "
                "semi-definite by construction, so that rule would give 0. Use "
                "damping='heuristic' (0.1 x the mean eigenvalue of the K-FAC curvature) or a "
                "number >= 0."
            )
        if damping != "heuristic":
            raise InputError(
                f"damping must be a number >= 0 or 'heuristic' (0.1 x the mean eigenvalue of "
                f"the K-FAC curvature), got {damping!r}"
            )
        return
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise InputError(f"damping must be a number >= 0 or 'heuristic', got {damping!r}")
    check_damping(float(damping))


@dataclass(frozen=True)
class _Kronecker(Solver):
    """Hyperparameters shared by :class:`KFAC` and :class:`EKFAC` (see their docstrings)."""

    damping: float | Literal["heuristic"] = "heuristic"  # type: ignore[assignment]
    fisher: FisherType = "true"
    unsupported: Literal["error", "diagonal"] = "error"
    mc_samples: int | Literal["exact"] = 1
    seed: int = 0
    chunk_size: int | None = None

    _eigen_refit: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_kronecker_damping(self.damping)
        if self.fisher not in ("true", "empirical"):
            raise InputError(
                f"fisher must be 'true' (labels sampled from the model) or 'empirical' (the "
                f"data's labels), got {self.fisher!r}"
            )
        if self.unsupported not in ("error", "diagonal"):
            raise InputError(
                f"unsupported must be 'error' or 'diagonal' (Fisher diagonal for parameters "
                f"outside nn.Linear/nn.Conv2d), got {self.unsupported!r}"
            )
        mc = self.mc_samples
        if mc != "exact" and (isinstance(mc, bool) or not isinstance(mc, int) or mc < 1):
            raise InputError(
                f"mc_samples must be a positive integer or 'exact' (the expectation over the "
                f"labels, one backward pass per model output), got {mc!r}"
            )
        if self.chunk_size is not None and self.chunk_size < 1:
            raise InputError(
                f"chunk_size must be a positive integer or None, got {self.chunk_size}"
            )

    def fit(self, operator: LinearOperator, *, progress: bool = False) -> FittedKronecker:
        """Compute the factors in one streamed pass (EK-FAC: two) and eigendecompose them.

        Parameters
        ----------
        operator
            An undamped curvature operator over training data that carries ``.wrapper``
            (:class:`~infl.model.ModelWrapper`) and ``.data`` (such as
            :class:`~infl.operators.HessianOperator`). Only its model, objective and data
            are used: the factors approximate the Fisher / Gauss-Newton matrix whatever
            curvature the operator applies.
        """
        wrapper, data, chunk = _operator_parts(operator, self.chunk_size)
        if self.fisher == "true" and builtin_loss_name(wrapper) is None:
            raise InputError(
                "fisher='true' samples labels from the model's predictive distribution, which "
                "needs a built-in loss ('cross_entropy', 'bce_with_logits' or 'mse'); this "
                "objective's loss is a custom callable. Use fisher='empirical' (the data's "
                "own labels), or a built-in loss."
            )
        part = partition(wrapper, allow_diagonal=self.unsupported == "diagonal")
        common: dict[str, Any] = {
            "fisher": self.fisher,
            "chunk_size": chunk,
            "mc_samples": self.mc_samples,
            "progress": progress,
        }
        # under torch.distributed `data` is this rank's shard: the per-shard means are
        # averaged over the ranks (weights n_r / n) before the eigendecompositions
        seed = distributed.shard_seed(operator, self.seed)
        gen = torch.Generator(device=wrapper.device).manual_seed(seed)
        kept = self._replay(torch.Generator(device=wrapper.device).manual_seed(seed + 1))
        hands_over = _hands_over_factors(wrapper, part, self.fisher)
        if kept is None and hands_over:
            kept = Replay(DEFAULT_REPLAY_BYTES)  # pass 1's records, for the first scoring pass
        collect_factors(wrapper, data, part, generator=gen, keep=kept, **common)
        factors = _train_factors(wrapper, data, part, chunk, kept) if hands_over else None
        distributed.average_partition(operator, part, "factors")
        eigendecompose(part)
        passes = 1
        if self._eigen_refit:
            # pass 2's own draws (seed + 1): replayed, made in pass 1 from the same seed
            gen = torch.Generator(device=wrapper.device).manual_seed(seed + 1)
            collect_eigen_diagonal(wrapper, data, part, generator=gen, replay=kept, **common)
            distributed.average_partition(operator, part, "eigenvalues")
            passes = 2
        uniform = wrapper.objective.uniform_weight_decay
        decay = (
            uniform
            if uniform is not None
            else dict(zip(wrapper.names, wrapper.decays, strict=True))
        )
        n = distributed.num_examples(operator, len(data))
        replayed = self._eigen_refit and kept is not None and kept.complete
        fitted = FittedKronecker(self, operator, part, decay, passes, n, replayed=replayed)
        fitted.train_factors = factors
        return fitted

    def _replay(self, generator: torch.Generator) -> Replay | None:
        """Where pass 1 keeps pass 2's records, drawn from ``generator`` (EK-FAC; K-FAC has
        no pass 2)."""
        return None

    def restore(self, operator: LinearOperator, state: dict[str, Any]) -> FittedKronecker:
        """:class:`FittedKronecker` from saved factors and eigenbases: no data pass.

        The layers are found again in the operator's model (:func:`partition`, no forward
        pass) and must be the ones the state was saved for.
        """
        wrapper, _, _ = _operator_parts(operator, self.chunk_size)
        part = partition(wrapper, allow_diagonal=self.unsupported == "diagonal")
        layers, diagonal = state.get("layers"), state.get("diagonal")
        if not isinstance(layers, dict) or not isinstance(diagonal, dict):
            raise InputError(
                "the saved K-FAC/EK-FAC state has no 'layers'/'diagonal' dicts: it was written "
                "by another version of infl. Refit the solver and save it again."
            )
        saved_names = (sorted(layers), sorted(diagonal))
        names = (sorted(ly.name for ly in part.layers), sorted(blk.name for blk in part.diagonal))
        if saved_names != names:
            raise InputError(
                f"the saved K-FAC/EK-FAC state has (layers, diagonal blocks) {saved_names}, this "
                f"model {names}: it was fitted to another model. Refit and save again."
            )
        eigenvalues: dict[str, torch.Tensor] = {}
        for ly in part.layers:
            saved = layers[ly.name]
            shapes = {"A": (ly.in_dim,) * 2, "S": (ly.out_dim,) * 2, "eig_A": (ly.in_dim,),
                      "Q_A": (ly.in_dim,) * 2, "eig_S": (ly.out_dim,), "Q_S": (ly.out_dim,) * 2,
                      "eigenvalues": (ly.out_dim, ly.in_dim)}  # fmt: skip
            values = {key: state_tensor(saved, key, operator, sh) for key, sh in shapes.items()}
            ly.A, ly.S, ly.eig_A, ly.Q_A = values["A"], values["S"], values["eig_A"], values["Q_A"]
            ly.eig_S, ly.Q_S = values["eig_S"], values["Q_S"]
            if saved.get("eigen_diag") is not None:
                ly.eigen_diag = state_tensor(saved, "eigen_diag", operator, shapes["eigenvalues"])
            eigenvalues[ly.name] = values["eigenvalues"]
        for blk in part.diagonal:
            numel = blk.param_slice.stop - blk.param_slice.start
            blk.diag = state_tensor(diagonal, blk.name, operator, (numel,))
        return FittedKronecker(
            self,
            operator,
            part,
            float(state.get("weight_decay", 0.0)),
            int(state.get("data_passes", 0)),
            int(state.get("num_examples", len(getattr(operator, "data", ())))),
            eigenvalues,
        )


@dataclass(frozen=True)
class KFAC(_Kronecker):
    """Kronecker-factored approximate curvature (Martens & Grosse 2015), block-diagonal per layer.

    :math:`(F + \\lambda_{wd}I + \\lambda I)^{-1} v` with the Fisher :math:`F` approximated per
    layer by :math:`S \\otimes A` (input-activation and output-gradient covariances, see
    :mod:`infl.solvers.kronecker`) and inverted in the eigenbases of :math:`A` and :math:`S`.

    Parameters
    ----------
    damping
        :math:`\\lambda \\ge 0`, added at solve time (``with_damping`` reuses the factors), or
        ``"heuristic"`` (default): :math:`0.1\\times` the mean eigenvalue of the K-FAC
        Fisher (without weight decay), the default of kronfluence; the value used is in
        ``info["damping"]``.
    fisher
        ``"true"`` (default): labels drawn from the model's predictive distribution
        (categorical for ``cross_entropy``, Bernoulli for ``bce_with_logits``, Gaussian
        :math:`N(f, I/2)` for ``mse``), so :math:`E[gg^T]` is the Gauss-Newton matrix in
        expectation; ``"empirical"``: the data's own labels (the empirical Fisher, which is
        small where the model fits well and is a poor curvature estimate there).
    unsupported
        Trainable parameters outside ``nn.Linear``/``nn.Conv2d`` layers: ``"error"`` (default)
        raises :class:`~infl.errors.InputError` naming them; ``"diagonal"`` approximates each
        of them by its Fisher diagonal :math:`E[(\\partial\\ell/\\partial\\theta_j)^2]` (same
        label choice as ``fisher``).
    mc_samples
        Label draws per example for ``fisher="true"`` (ignored for ``"empirical"``), or
        ``"exact"``: the expectation over the labels computed exactly, :math:`E_y[gg^T] =
        \\sum_j (J^T r_j)(J^T r_j)^T` with :math:`\\sum_j r_j r_j^T` the loss's output Hessian
        (``diag(p) - p p^T`` for ``cross_entropy``): one backward pass per output of an example
        (``C`` for ``C`` classes) and no sampling noise, so ``seed`` is unused.
    seed
        Seeds the label draws (pass 1 uses ``seed``, EK-FAC's pass 2 ``seed + 1``).
    chunk_size
        Examples per chunk; ``None`` takes the operator's. Results do not depend on it.

    Notes
    -----
    Cost: ``fit`` is one forward and ``mc_samples`` backward passes over the data (``"exact"``:
    one per output of an example, e.g. ``C``), then one eigendecomposition per factor
    (:math:`O(in^3 + out^3)` per layer); memory is the factors, :math:`\\sum_l in_l^2 +
    out_l^2` numbers. A solve of ``k`` vectors costs
    :math:`O(k \\sum_l (out_l^2 in_l + out_l in_l^2))`. ``residual_norms`` are NaN: the
    approximate system is solved exactly, and the residual against the true operator
    would cost a pass over the data (compute it with
    :func:`infl.solvers.base.relative_residuals` on ``fitted.operator`` if needed).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from infl import HessianOperator, IndexedData, ModelWrapper, Objective
    >>> X, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    >>> w = ModelWrapper(nn.Linear(3, 2), Objective("cross_entropy", weight_decay=0.01))
    >>> fitted = KFAC(damping=0.1).fit(HessianOperator(w, IndexedData((X, y))))
    >>> fitted.solve(torch.ones(2, 8)).value.shape
    torch.Size([2, 8])
    """


@dataclass(frozen=True)
class EKFAC(_Kronecker):
    """Eigenvalue-corrected K-FAC (George et al. 2018; Grosse et al. 2023).

    K-FAC's eigenbasis :math:`Q_S \\otimes Q_A` with the eigenvalues refit in a second pass:
    :math:`\\Lambda_{oi} = \\frac1n\\sum_n (Q_S^T G_n Q_A)_{oi}^2` from the per-example weight
    gradients :math:`G_n` — the best diagonal in that basis (Frobenius norm), so EK-FAC is
    never further from the Fisher than K-FAC. Parameters as :class:`KFAC`; ``"heuristic"``
    damping uses the mean refit eigenvalue (the Fisher's trace over ``p``).

    Parameters
    ----------
    replay_bytes
        Memory for pass 2's layer inputs and output gradients, made during pass 1 when all of
        them fit (default 1 GiB; ``0``: never). Pass 2 needs pass 1's layer inputs and the
        output gradients of its own label draws (``seed + 1``): while the records fit, pass 1
        makes those draws too (one more backward pass per draw; none with ``"empirical"`` or
        ``"exact"``, whose output gradients are pass 1's), and pass 2 then runs no forward or
        backward pass and reads no data (``info["replayed"]``). All or nothing: keeping part
        of a larger pass saved no time on a CIFAR ResNet. The result does not depend on it.
        Per example the records take :math:`\\sum_l` (input + output gradient sizes of layer
        :math:`l`) numbers, with ``mc_samples`` output gradients for ``fisher="true"`` (``C``
        for ``"exact"``): about 0.63M float32 numbers (2.5 MB) for a width-64 CIFAR ResNet,
        so 1 GiB holds about 430 examples.

    Notes
    -----
    Cost: two passes over the data (factors, then eigenvalues), the second from memory when
    the first fits in ``replay_bytes``; pass 2 forms the ``[b, out, in]`` per-example
    gradients of a chunk only for layers with several locations per example (convolutions,
    sequences). Memory: the factors plus one ``[out, in]`` eigenvalue matrix per layer, and
    up to ``replay_bytes`` between the passes. Solves cost what K-FAC's do.
    """

    replay_bytes: int = field(default=DEFAULT_REPLAY_BYTES, metadata={SPEC_OMIT_DEFAULT: True})

    _eigen_refit: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.replay_bytes
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(
                f"replay_bytes must be a number of bytes >= 0 (0: pass 2 always runs the "
                f"model again), got {value!r}"
            )

    def _replay(self, generator: torch.Generator) -> Replay | None:
        return Replay(self.replay_bytes, generator)


def _hands_over_factors(wrapper: ModelWrapper, part: Partition, fisher: str) -> bool:
    """Whether pass 1's records are the training gradients' factors (the data's labels, every
    parameter in an ``nn.Linear``: :meth:`FittedSolver.take_train_factors`)."""
    return fisher == "empirical" and wrapper._linear_grads.applicable and not part.diagonal


def _train_factors(
    wrapper: ModelWrapper, data: IndexedData, part: Partition, chunk: int, kept: Replay | None
) -> FitFactors | None:
    """Pass 1's kept records as :class:`~infl.factor_cache.FitFactors`, when every chunk was
    kept and every layer called once on ``[b, in]`` inputs (else ``None``)."""
    if kept is None or not kept.complete:
        return None
    chunks: dict[int, Factors] = {}
    batches = {}
    for i, rec in enumerate(kept.records):
        factors = {}
        for ly in part.layers:
            calls, g = rec.inputs[ly.name], rec.grads[ly.name]
            if len(calls) != 1 or calls[0].dim() != 2 or g.shape[1] != 1:
                return None
            factors["" if ly.name == "<root>" else ly.name] = (calls[0], g[:, 0])
        chunks[i * chunk], batches[i * chunk] = factors, rec.loss_batch
    return FitFactors(chunk, data, wrapper, chunks, batches)


def _operator_parts(
    operator: LinearOperator, chunk_size: int | None
) -> tuple[ModelWrapper, IndexedData, int]:
    wrapper = getattr(operator, "wrapper", None)
    data = getattr(operator, "data", None)
    if not isinstance(wrapper, ModelWrapper) or data is None:
        raise InputError(
            f"K-FAC/EK-FAC build their factors from the model and the training data, but the "
            f"operator {type(operator).__name__} carries neither (.wrapper, .data). Fit them "
            "on a HessianOperator (or another operator over training data), as "
            "InfluenceCalculator does."
        )
    indexed = data if isinstance(data, IndexedData) else IndexedData(data, "training data")
    chunk = chunk_size if chunk_size is not None else int(getattr(operator, "chunk_size", 256))
    return wrapper, indexed, chunk


class KroneckerCurvature(LinearOperator):
    """The (EK-)FAC curvature :math:`\\hat F + \\lambda_{wd} I` as an operator (undamped)."""

    def __init__(self, fitted: FittedKronecker) -> None:
        super().__init__(fitted.base.size, fitted.base.dtype, fitted.base.device)
        self.fitted = fitted

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        fitted = self.fitted
        # exact for any per-parameter decay: the decay term is diagonal in parameter space
        return fitted.apply_spectral(vectors, lambda ev: ev) + fitted.decay_vector() * vectors


class FittedKronecker(FittedSolver):
    """:class:`KFAC` / :class:`EKFAC` with the factors computed and eigendecomposed.

    Attributes
    ----------
    partition
        The layers (factors ``A``, ``S``, eigenbases, EK-FAC eigenvalues) and diagonal blocks.
    eigenvalues
        ``{layer: [out, in]}``: :math:`\\Lambda` of each layer (without weight decay).
    weight_decay
        :math:`\\lambda_{wd}`, added to every eigenvalue; or ``{parameter name: λ_j}`` for
        weight decay per parameter (a layer whose weight and bias differ gets an exact
        rank-one correction, see the module docstring).
    """

    def __init__(
        self,
        solver: _Kronecker,
        base: LinearOperator,
        part: Partition,
        weight_decay: float | Mapping[str, float],
        data_passes: int,
        num_examples: int,
        eigenvalues: dict[str, torch.Tensor] | None = None,
        replayed: bool = False,
    ) -> None:
        self.partition = part
        self.replayed = replayed
        self.train_factors: FitFactors | None = None
        self.weight_decay: float | dict[str, float] = (
            {n: float(v) for n, v in weight_decay.items()}
            if isinstance(weight_decay, Mapping)
            else float(weight_decay)
        )
        self.data_passes = data_passes
        self.num_examples = num_examples
        if eigenvalues is None:
            eigenvalues = {}
            for ly in part.layers:
                if ly.eigen_diag is not None:
                    eigenvalues[ly.name] = ly.eigen_diag
                else:
                    assert ly.eig_S is not None
                    assert ly.eig_A is not None
                    eigenvalues[ly.name] = torch.outer(ly.eig_S, ly.eig_A)
        self.eigenvalues = eigenvalues
        every = [ev.reshape(-1) for ev in eigenvalues.values()]
        every += [blk.diag.reshape(-1) for blk in part.diagonal if blk.diag is not None]
        flat = torch.cat(every)
        self._mean_eig = float(flat.mean())
        self._min_eig = float(flat.min())
        self._max_eig = float(flat.max())
        self.damping_rule = "heuristic" if solver.damping == "heuristic" else "fixed"
        value = (
            HEURISTIC_FACTOR * self._mean_eig
            if solver.damping == "heuristic"
            else float(solver.damping)
        )
        super().__init__(dataclasses.replace(solver, damping=value), base)
        self.solver: _Kronecker = self.solver
        least_decay = min(self._decays().values(), default=0.0)
        smallest = self._min_eig + least_decay + value  # a lower bound with groups
        if not smallest > 0:
            raise NotPositiveDefiniteError(
                f"the {type(solver).__name__} curvature has eigenvalue {self._min_eig:.4g} and "
                f"weight decay {least_decay:g}, so with damping={value:g} it is singular "
                "(smallest eigenvalue of the damped curvature "
                f"{smallest:.4g}). Use damping > 0, for example damping='heuristic' "
                f"({HEURISTIC_FACTOR * self._mean_eig:.3g} here)."
            )

    @property
    def curvature(self) -> KroneckerCurvature:
        """:math:`\\hat F + \\lambda_{wd} I` as an undamped operator (no data pass)."""
        return KroneckerCurvature(self)

    def apply_spectral(
        self, vectors: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """:math:`(Q_S\\otimes Q_A)\\,\\mathrm{diag}(fn(\\Lambda))\\,(Q_S\\otimes Q_A)^T` per block.

        ``vectors`` is ``[k, p]``; diagonal blocks multiply by ``fn(diag)``.
        """
        out = torch.empty_like(vectors)
        for ly in self.partition.layers:
            assert ly.Q_A is not None
            assert ly.Q_S is not None
            v = ly.gather(vectors)  # [k, out, in]
            rotated = ly.Q_S.T @ v @ ly.Q_A
            ly.scatter(ly.Q_S @ (rotated * fn(self.eigenvalues[ly.name])) @ ly.Q_A.T, out)
        for blk in self.partition.diagonal:
            assert blk.diag is not None
            out[:, blk.param_slice] = vectors[:, blk.param_slice] * fn(blk.diag)
        return out

    def _decays(self) -> dict[str, float]:
        """:math:`\\lambda_j` of every parameter of the blocks."""
        names = [n for ly in self.partition.layers for n in (ly.weight, ly.bias) if n]
        names += [blk.name for blk in self.partition.diagonal]
        wd = self.weight_decay
        return {n: (wd[n] if isinstance(wd, dict) else wd) for n in names}

    def decay_vector(self) -> torch.Tensor:
        """The diagonal of :math:`\\Lambda` on the flat parameter space: ``[p]``."""
        decays = self._decays()
        out = torch.zeros(self.base.size, dtype=self.base.dtype, device=self.base.device)
        for ly in self.partition.layers:
            for name, sl in ((ly.weight, ly.weight_slice), (ly.bias, ly.bias_slice)):
                if name is not None and sl is not None:
                    out[sl] = decays[name]
        for blk in self.partition.diagonal:
            out[blk.param_slice] = decays[blk.name]
        return out

    def _inverse(self, vectors: torch.Tensor, damping: float) -> torch.Tensor:
        """:math:`(\\hat F + \\Lambda + \\lambda I)^{-1}` per block, exactly in the decay."""
        decays = self._decays()
        out = torch.empty_like(vectors)
        for ly in self.partition.layers:
            assert ly.Q_A is not None
            assert ly.Q_S is not None
            wd_w = decays[ly.weight] if ly.weight else None
            wd_b = decays[ly.bias] if ly.bias else None
            base = wd_w if wd_w is not None else wd_b
            assert base is not None
            d = self.eigenvalues[ly.name] + (base + damping)  # [out, in]
            y = (ly.Q_S.T @ ly.gather(vectors) @ ly.Q_A) / d
            if wd_w is not None and wd_b is not None and wd_b != wd_w:
                # rows o: (diag(d_o) + delta q q^T)^{-1}, Sherman-Morrison
                delta = wd_b - wd_w
                q = ly.Q_A[-1]  # the bias row: Q_A^T e_bias
                qd = q / d
                den = 1.0 + delta * (q * qd).sum(dim=-1, keepdim=True)  # [out, 1]
                y = y - delta * (y * q).sum(dim=-1, keepdim=True) / den * qd
            ly.scatter(ly.Q_S @ y @ ly.Q_A.T, out)
        for blk in self.partition.diagonal:
            assert blk.diag is not None
            shift = decays[blk.name] + damping
            out[:, blk.param_slice] = vectors[:, blk.param_slice] / (blk.diag + shift)
        return out

    def take_train_factors(self) -> FitFactors | None:
        """Pass 1's layer inputs and output gradients, once (see
        :meth:`FittedSolver.take_train_factors`; only with ``fisher="empirical"``)."""
        factors, self.train_factors = self.train_factors, None
        return factors

    def solve(self, rhs: torch.Tensor, *, progress: bool = False) -> SolveResult:
        """:math:`(\\hat F + \\Lambda + \\lambda I)^{-1}` applied to each row of ``rhs``.

        No data pass; ``residual_norms`` are NaN (see :class:`KFAC`).
        """
        b = as_rhs(rhs, self.operator)
        value = self._inverse(b, self.damping)
        nan = torch.full((b.shape[0],), math.nan, dtype=b.dtype, device=b.device)
        return SolveResult(
            value=value, converged=True, iterations=0, residual_norms=nan, info=self.info
        )

    def with_damping(self, damping: float | str) -> FittedKronecker:
        """The same factors at another :math:`\\lambda` (or ``"heuristic"``): no data pass."""
        _check_kronecker_damping(damping)
        value: Any = damping if isinstance(damping, str) else float(damping)
        solver = dataclasses.replace(self.solver, damping=value)
        return FittedKronecker(
            solver,
            self.base,
            self.partition,
            self.weight_decay,
            self.data_passes,
            self.num_examples,
            self.eigenvalues,
            self.replayed,
        )

    def state(self) -> dict[str, Any]:
        """Per layer the factors, their eigenpairs and :math:`\\Lambda`; per diagonal block its
        Fisher diagonal; the weight decay and the fit's counts."""
        layers: dict[str, Any] = {}
        for ly in self.partition.layers:
            layers[ly.name] = {
                "A": ly.A, "S": ly.S, "eig_A": ly.eig_A, "Q_A": ly.Q_A, "eig_S": ly.eig_S,
                "Q_S": ly.Q_S, "eigen_diag": ly.eigen_diag,
                "eigenvalues": self.eigenvalues[ly.name],
            }  # fmt: skip
        return {
            "layers": layers,
            "diagonal": {blk.name: blk.diag for blk in self.partition.diagonal},
            "weight_decay": self.weight_decay,
            "data_passes": self.data_passes,
            "num_examples": self.num_examples,
        }

    def blocks(self) -> dict[str, list[slice]]:
        """``{layer or parameter name: slices of the flat parameter vector}`` per block."""
        out = {ly.name: ly.slices for ly in self.partition.layers}
        out.update({blk.name: blk.slices for blk in self.partition.diagonal})
        return out

    @property
    def info(self) -> dict[str, Any]:
        return {
            **super().info,
            "damping_rule": self.damping_rule,
            "fisher": self.solver.fisher,
            "mc_samples": self.solver.mc_samples,
            "weight_decay": self.weight_decay,
            "mean_eigenvalue": self._mean_eig,
            "min_eigenvalue": self._min_eig,
            "max_eigenvalue": self._max_eig,
            "layers": [ly.name for ly in self.partition.layers],
            "diagonal_params": [blk.name for blk in self.partition.diagonal],
            "data_passes": self.data_passes,
            "replayed": self.replayed,
            "num_examples": self.num_examples,
        }
