"""InfluenceCalculator: test gradients → inverse-HVPs → scores against streamed train gradients.

The calculator owns no mathematics of its own: gradients come from :class:`ModelWrapper`, the
Hessian from :class:`HessianOperator`, inverse-HVPs from a :class:`Solver`.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
from torch import nn

from infl import (
    calculator_setup,
    group_influence,
    persistence,
    score_store,
    scoring,
    streaming,
    train_gradients,
)
from infl.calculator_setup import CURVATURES as CURVATURES  # re-exported
from infl.chunking import ChunkSize, resolve_chunk_size
from infl.data import IndexedData
from infl.distributed import ProcessGroup, Shard
from infl.export import Ids
from infl.mixed_precision import check_curvature_dtype
from infl.model import ModelWrapper, Stationarity, as_training_data
from infl.objective import Objective, PerExampleFn, loss_measurement
from infl.operators import LinearOperator
from infl.solvers.base import FittedSolver, Solver, SolveResult, check_damping
from infl.train_gradients import TrainGradCache

if TYPE_CHECKING:
    import pandas as pd

    from infl.diagnostics import Spectrum
    from infl.spectral import SolverAdvice

DEFAULT_CACHE_BYTES = 1 << 30


class InfluenceCalculator:
    """Influence of training examples on test measurements.

    With :math:`A = H + \\lambda I` (:math:`H` the Hessian of the training objective,
    :math:`\\lambda` the solver's damping), training gradients :math:`g_i` (see
    :class:`~infl.objective.Objective`) and measurement :math:`f`:

    * ``influence(test)[j, i]`` :math:`= -\\nabla f(z_j)^T A^{-1} g_i` (Koh & Liang's
      :math:`\\mathcal I_{up,loss}`);
    * ``removal_effect(test)[j, i]`` :math:`= -\\text{influence}[j, i] / n`, the predicted change
      of :math:`f(z_j)` when training example :math:`i` is removed and the model retrained —
      the quantity :func:`infl.retrain_ground_truth` measures.

    Parameters
    ----------
    model
        The trained module, in eval mode. It is not modified.
    objective
        The training objective (per-example loss and the ``weight_decay`` trained with).
    train_data
        The training data, in a fixed order: tensors such as ``(X, y)``, a map-style
        ``Dataset``, or a non-shuffling ``DataLoader``. ``n`` = its length.
    solver
        An inverse-HVP solver: ``ExactHessian``, ``ConjugateGradient``, ``LiSSA``, ...
    measurement
        ``(model, batch) -> Tensor[b]``, what the scores explain; default: the loss.
    chunk_size
        Examples per chunk for gradients, HVPs and the solvers' passes (memory vs. speed;
        results do not depend on it beyond round-off). ``"auto"`` (default): on a CPU, the
        largest power of two up to 256 whose largest module output (measured on the first
        examples) stays within 16 MiB, since larger blocks get fresh, kernel-zeroed pages
        from glibc on every allocation (:mod:`infl.chunking`: on a 1.2M-parameter ResNet,
        64 examples per chunk instead of 256 took a fifth less time and half the memory);
        elsewhere 256. With a ``memory_budget``, never more than one chunk of gradients that fits.
        The resolved number is :attr:`chunk_size`.
    cache_bytes
        Keep the ``[n, p]`` training-gradient matrix in memory when it takes at most this many
        bytes (default 1 GiB); otherwise stream it chunk by chunk on every call. A model of
        plain ``nn.Linear`` layers keeps them factored instead (each layer's inputs and output
        gradients, :math:`\\sum_l (in_l + out_l)` numbers per example,
        :mod:`infl.factor_cache`) within the same bytes: kept by the minimum check, a K-FAC /
        EK-FAC fit with ``fisher="empirical"`` or the first scoring pass, they let every later
        scoring pass run with no forward or backward pass.
    memory_budget
        Bytes for the working tensors that would otherwise grow with ``n`` or ``m`` (default
        ``None``: no limit beyond ``cache_bytes``). With a budget :math:`B`, the gradient
        cache is kept only within ``min(cache_bytes, B/2)`` and test examples are scored in
        row blocks sized to the other half (:func:`infl.streaming.row_block_size`; each
        block one solve and one pass over the training gradients), so the peak of
        :meth:`influence` (beyond the ``[m, n]`` it returns), of :meth:`influence` with
        ``out=``, :meth:`top_k` and :meth:`self_influence` is set by ``chunk_size`` and
        :math:`B`, never by ``n`` or ``m``. A low-rank solver (``Arnoldi``) still keeps its
        ``[n, r]`` projections; :class:`infl.GradientStore` keeps them on disk instead.
        The model's own activations for ``chunk_size`` examples are not counted: lower
        ``chunk_size`` for a large model. A budget that cannot hold one chunk of gradients
        is an ``InputError`` naming the ``chunk_size`` that fits.
    progress
        Show tqdm progress bars over data and solver iterations (on rank 0 only under
        ``torch.distributed``).
    curvature
        The curvature :math:`H` in :math:`A = H + \\lambda I`: ``"hessian"`` (default, the
        Hessian of the objective) or ``"gauss_newton"`` (the generalised Gauss-Newton matrix
        :math:`G`, positive semi-definite for the built-in losses; it needs a loss with an
        output-space Hessian, see :func:`~infl.objective.supervised_loss`). Both include
        :math:`\\lambda_{wd} I`.
    curvature_dtype
        ``None`` (default): curvature products in the model's dtype. ``torch.float32`` on a
        float64 model: products on a float32 copy of the model and data (several times
        cheaper on a CPU), returned in float64 (:mod:`infl.mixed_precision`); CG refines to
        its float64 tolerance, LiSSA/Arnoldi use the float32 products, exact stays float64.
        See ``docs/mixed_precision.md``. Lower precisions and ``torch.distributed`` are
        refused; the model's own dtype means ``None``.
    check_minimum
        Check at construction that the model is at a minimum of the objective (default
        ``True``): one pass of training gradients (the ones the calculator caches, whole or
        factored, when they fit in ``cache_bytes``, so no extra pass then) gives
        :math:`\\|\\nabla J(\\theta)\\|` and the RMS per-example gradient norm, stored in
        :attr:`stationarity`; an :class:`~infl.errors.InflWarning` says what a non-minimum
        does to the scores.
    distributed
        Share the work with the other ranks of a ``torch.distributed`` job (see
        :mod:`infl.distributed` and ``docs/distributed.md``): ``None`` (default) when
        ``torch.distributed`` is initialised with more than one rank, ``True`` to require it,
        ``False`` to compute everything in this process. Every rank passes the same model,
        objective, solver and the *whole* training set; rank ``r`` works on its contiguous
        shard, curvature products are all-reduced and scores are gathered, so every rank gets
        the results of one process (``[m, n]`` in global order). Every call that computes is
        then collective: call it on every rank, with the same arguments.

    Attributes
    ----------
    stationarity : Stationarity or None
        The result of the minimum check (``None`` with ``check_minimum=False``).
    group : infl.distributed.ProcessGroup
        The ranks the work is shared with (one rank without ``torch.distributed``).
    shard : infl.distributed.Shard
        This rank's examples ``shard.start .. shard.stop - 1`` (all ``n`` in one process).
    local_train : IndexedData
        This rank's shard of the training data (all of it in one process).
    curvature_dtype : torch.dtype or None
        The dtype of the curvature products (``None``: the model's).

    Notes
    -----
    Construction also evaluates the first few training examples once (two small forward
    passes) and refuses, naming the example and the fix, data the model or the loss cannot
    take (feature width, integer inputs, ``[b, 1]`` or out-of-range labels, ``-100`` labels)
    and a random forward pass (functional dropout); see :meth:`ModelWrapper.check_data`.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from infl import ConjugateGradient, InfluenceCalculator, Objective
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    >>> calc = InfluenceCalculator(
    ...     nn.Linear(3, 2), Objective("cross_entropy", weight_decay=0.1), (X, y),
    ...     ConjugateGradient(), progress=False)
    >>> calc.removal_effect((X[:2], y[:2])).shape
    torch.Size([2, 20])
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        train_data: Any,
        solver: Solver,
        *,
        measurement: PerExampleFn | None = None,
        chunk_size: ChunkSize = "auto",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        memory_budget: int | None = None,
        progress: bool = True,
        curvature: str = "hessian",
        curvature_dtype: torch.dtype | None = None,
        check_minimum: bool = True,
        distributed: bool | None = None,
    ) -> None:
        calculator_setup.check_arguments(objective, solver, chunk_size, curvature)
        self.wrapper = ModelWrapper(model, objective)
        self.curvature_dtype = check_curvature_dtype(curvature_dtype, self.wrapper.dtype)
        self.objective = objective
        self.train = as_training_data(train_data, "training data")
        on_cpu = self.wrapper.device.type == "cpu"
        self.wrapper.check_data(self.train, measure_activations=chunk_size == "auto" and on_cpu)
        self.group: ProcessGroup
        self.shard: Shard
        self.local_train: IndexedData
        self.group, self.shard, self.local_train = calculator_setup.distribute(
            self.wrapper, objective, self.train, solver, curvature, distributed
        )
        self.solver = solver
        self.measurement = measurement if measurement is not None else loss_measurement(objective)
        dtype = self.wrapper.dtype
        chunk = resolve_chunk_size(chunk_size, self.wrapper.activation_bytes, self.wrapper.device)
        fits = streaming.budget_chunk_size(memory_budget, self.num_params, dtype)
        if chunk_size == "auto" and fits is not None:
            chunk = max(1, min(chunk, fits))
        self.chunk_size = chunk
        streaming.check_memory_budget(memory_budget, chunk, self.num_params, dtype)
        self.memory_budget = memory_budget
        self.cache_bytes = (
            cache_bytes if memory_budget is None else min(cache_bytes, memory_budget // 2)
        )
        self.progress = progress and self.group.rank == 0  # one set of bars per job
        self.curvature = curvature
        self.operator: LinearOperator = calculator_setup.curvature_operator(
            curvature, self.wrapper, self.local_train, chunk, self.group, self.curvature_dtype
        )
        self._fitted: FittedSolver | None = None
        self._grad_cache = TrainGradCache()
        self._ihvp_cache: OrderedDict[str, SolveResult] = OrderedDict()
        self.stationarity: Stationarity | None = None
        if check_minimum:
            self.stationarity = calculator_setup.check_minimum(self)

    @property
    def num_train(self) -> int:
        """``n``, the number of training examples."""
        return len(self.train)

    @property
    def num_params(self) -> int:
        """``p``, the number of trainable parameters."""
        return self.wrapper.num_params

    # ------------------------------------------------------------------ variants
    def with_solver(self, solver: Solver) -> InfluenceCalculator:
        """The same model, objective and data with another inverse-HVP solver.

        The new calculator shares this one's curvature operator and cached training gradients
        (computed at most once for both). When ``solver`` differs from the current solver only
        in ``damping`` and the current one is already fitted, the fit is carried over through
        :meth:`FittedSolver.with_damping`: the exact eigendecomposition, LiSSA's spectrum
        estimate (and any other factorisation) are reused, so no HVP is spent on the change.
        Inverse-HVPs depend on the solver and are not shared.
        """
        return calculator_setup.with_solver(self, solver)

    def with_damping(self, damping: float | Literal["auto"]) -> InfluenceCalculator:
        """The same calculator at damping :math:`\\lambda` = ``damping`` (see :meth:`with_solver`).

        ``"auto"`` (solvers that support it) refits, choosing :math:`\\lambda` from the
        spectrum; a number reuses the fit. ``calc.fitted_solver().damping`` is always the
        number in use.

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> from infl import ExactHessian, InfluenceCalculator, Objective
        >>> X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
        >>> calc = InfluenceCalculator(nn.Linear(3, 2), Objective("cross_entropy"), (X, y),
        ...                            ExactHessian(damping=0.1), progress=False)
        >>> stiffer = calc.with_damping(1.0)  # reuses the eigendecomposition once fitted
        >>> stiffer.solver.damping
        1.0
        """
        check_damping(damping, allow_auto=True)
        value: float | str = damping if isinstance(damping, str) else float(damping)
        solver: Any = self.solver  # every solver is a frozen dataclass with a damping field
        return self.with_solver(dataclasses.replace(solver, damping=value))

    # ------------------------------------------------------------------ curvature
    def spectrum(self, k: int = 10, **kwargs: Any) -> Spectrum:
        """Eigenvalues of this calculator's curvature :math:`H` (``curvature=``: the Hessian or
        the Gauss-Newton matrix, weight decay included, undamped unless ``damping=`` is given).

        A thin wrapper: ``infl.diagnostics.hessian_spectrum(calc.operator, k=k, **kwargs)``
        (dense and exact for ``p <= 2000``, else Lanczos for the ``k`` extreme eigenvalues at
        each end; ``method``, ``max_iter``, ``tol``, ``seed``, ``damping`` are passed through).

        Cost: ``p`` HVPs (dense) or one Lanczos run (about ``max(80, 8k)`` HVPs at most).

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> from infl import ConjugateGradient, InfluenceCalculator, Objective
        >>> X, y = torch.randn(30, 3), torch.randint(0, 2, (30,))
        >>> calc = InfluenceCalculator(nn.Linear(3, 2), Objective("cross_entropy", 0.1),
        ...                            (X, y), ConjugateGradient(), progress=False,
        ...                            check_minimum=False)
        >>> s = calc.spectrum(k=3)
        >>> s.full, s.lambda_min > 0   # p = 8: the whole spectrum; L2 makes it positive
        (True, True)
        """
        from infl.diagnostics import hessian_spectrum

        return hessian_spectrum(self.operator, k=k, **kwargs)

    def advise(
        self, tol: float = 1e-3, damping: float | None = None, **kwargs: Any
    ) -> SolverAdvice:
        """Damping, LiSSA scale/depth and CG iterations for this calculator's curvature.

        A thin wrapper: ``infl.diagnostics.advise(calc.operator, tol=tol, damping=damping,
        **kwargs)``. ``advice.min_damping`` / ``suggested_damping`` is the damping that makes
        :math:`H + \\lambda I` positive definite (from a Lanczos estimate of
        :math:`\\lambda_{\\min}(H)` for large ``p``: an upper bound, so the damping is a lower
        bound; ``damping="auto"`` on the solver adds a margin); ``advice.summary()`` says it in
        words.

        Cost: as :meth:`spectrum` (``k=5``).

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> from infl import ConjugateGradient, InfluenceCalculator, Objective
        >>> X, y = torch.randn(30, 3), torch.randint(0, 2, (30,))
        >>> calc = InfluenceCalculator(nn.Linear(3, 2), Objective("cross_entropy", 0.1),
        ...                            (X, y), ConjugateGradient(), progress=False,
        ...                            check_minimum=False)
        >>> a = calc.advise(tol=1e-6)
        >>> a.positive_definite, a.min_damping
        (True, 0.0)
        >>> calc = calc.with_damping(a.suggested_damping)
        """
        from infl.diagnostics import advise

        return advise(self.operator, tol=tol, damping=damping, **kwargs)

    # ------------------------------------------------------------------ building blocks
    def fitted_solver(self) -> FittedSolver:
        """The solver fitted to this model's Hessian (factorised once, then reused)."""
        if self._fitted is None:
            self._fitted = self.solver.fit(self.operator, progress=self.progress)
            train_gradients.adopt_fit_factors(self, self._fitted)
        return self._fitted

    def test_grads(self, test_data: Any) -> torch.Tensor:
        """:math:`\\nabla f(z_j)` for every test example: ``[m, p]``."""
        return scoring.measurement_grads(self, test_data)

    def train_grads(self, indices: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Training gradients :math:`g_i` of the examples at ``indices`` (all if ``None``).

        Returns ``[k, p]``; for all ``n`` examples this materialises ``[n, p]``.
        """
        return scoring.train_grads(self, indices)

    def inverse_hvp(self, test_data: Any) -> SolveResult:
        """:math:`A^{-1}\\nabla f(z_j)` for each test example (``value`` is ``[m, p]``).

        Computed once per distinct test batch and reused by :meth:`influence`,
        :meth:`removal_effect` and :meth:`top_k` (the cache keeps the 8 latest batches).
        """
        return scoring.inverse_hvp(self, test_data)

    # ------------------------------------------------------------------ scores
    @overload
    def influence(
        self, test_data: Any, *, per_layer: Literal[False] = ..., out: None = ...
    ) -> torch.Tensor: ...

    @overload
    def influence(
        self, test_data: Any, *, per_layer: Literal[True], out: None = ...
    ) -> dict[str, torch.Tensor]: ...

    @overload
    def influence(
        self, test_data: Any, *, per_layer: Literal[False] = ..., out: str | os.PathLike[str]
    ) -> score_store.ScoreStore: ...

    def influence(
        self,
        test_data: Any,
        *,
        per_layer: bool = False,
        out: str | os.PathLike[str] | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor] | score_store.ScoreStore:
        """:math:`-\\nabla f(z_j)^T (H+\\lambda I)^{-1} g_i`: ``[m, n]`` (test-major).

        Sign (loss measurement): negative = training example ``i`` is *helpful* to test example
        ``j`` (up-weighting it lowers the test loss), positive = *harmful*.

        With ``per_layer=True`` and a block-diagonal solver (``KFAC``, ``EKFAC``), the scores
        split exactly into one term per block, :math:`-\\nabla_l f(z_j)^T (A_l)^{-1} g_{i,l}`:
        ``{layer name: [m, n]}``, summing to the total (same sign convention: negative =
        helpful through that layer); other solvers raise ``InputError``.

        Cost: one solve for the ``m`` test gradients and one pass over the training data. With a
        low-rank solver (``Arnoldi``), the training gradients are projected onto its ``r``
        directions once (``[n, r]``, kept) and each test batch then costs its test gradients and
        an ``[m, r] x [r, n]`` product: no solve and no HVP. With a ``memory_budget`` that
        cannot hold all ``m`` test rows, they are scored in row blocks (one solve and one
        training pass each).

        ``out="scores.npy"`` writes the scores to disk instead of returning them: a
        :class:`infl.ScoreStore` (a memory-mapped ``.npy`` file and its ``scores.npy.store/``
        directory), filled tile by tile (``[b_r, chunk_size]``), each tile flushed and then
        recorded atomically, so an interrupted call (Ctrl-C, a crash, a full disk) resumes
        where it stopped when called again with the same settings, and a store made with
        other settings (model, objective, data, test data, measurement, solver, damping,
        curvature, layout) is refused with :class:`~infl.StoreMismatchError`. Read it back
        with ``store.scores()`` or export it with ``store.to_frame()`` / ``store.save(...)``.
        Memory: the row block, a chunk and a tile (see ``memory_budget``), not ``[m, n]``.
        """
        return scoring.influence(self, test_data, per_layer, out)

    def removal_effect(self, test_data: Any) -> torch.Tensor:
        """Predicted change of each test measurement when training example ``i`` is removed.

        ``[m, n]``, equal to ``-influence / n``: positive means removing ``i`` increases
        :math:`f(z_j)` (for the default loss measurement: removing ``i`` hurts test example
        ``j``, so ``i`` is *helpful* to it).
        """
        return -self.influence(test_data) / self.num_train

    def group_removal_effect(self, test_data: Any, groups: Any, *, order: int = 1) -> torch.Tensor:
        """Predicted change of each test measurement when a whole group is removed.

        For a group :math:`U` of :math:`u` training examples (:math:`p_U = u/n`), retraining
        without it minimises :math:`J_{-U} = \\frac1{n-u}\\sum_{i\\notin U} r_i` with
        :math:`r_i(\\theta) = \\ell(z_i;\\theta) + \\frac{\\lambda_{wd}}2\\|\\theta\\|^2`, i.e.
        :math:`F_U(\\theta) = J(\\theta) - \\frac1n\\sum_{i\\in U} r_i(\\theta)` up to the factor
        :math:`1/(1-p_U)`, which does not move the minimiser. Expanding
        :math:`\\nabla F_U(\\theta^*+\\Delta_U) = 0` in powers of :math:`p_U` (Basu, You & Feizi
        2020), with :math:`A = H + \\lambda I` in place of :math:`H`:

        .. math::

            \\Delta_U \\approx \\underbrace{\\frac1n A^{-1} s_U}_{\\text{order 1}}
            + \\underbrace{p_U\\, A^{-1} H_U\\, \\frac1n A^{-1} s_U}_{\\text{order 2}},
            \\qquad s_U = \\sum_{i\\in U} g_i,\\quad
            H_U = \\frac1u\\sum_{i\\in U}\\nabla^2\\ell(z_i) + \\lambda_{wd} I,

        and ``group_removal_effect(test, groups)[j, g]`` :math:`= \\nabla f(z_j)^T\\Delta_{U_g}`
        (:math:`\\approx f(z_j;\\theta_{-U_g}) - f(z_j;\\theta^*)`, the units of
        :meth:`removal_effect` and of :func:`infl.retrain_ground_truth` with
        ``removals=groups``). Order 1 is exactly the sum of the members' :meth:`removal_effect`.
        Order 2 adds the group's own share of the curvature, :math:`p_U H_U`: the first two
        terms of the Neumann series of :math:`(A - p_U H_U)^{-1}\\frac1n s_U`, one Newton step on
        the remaining objective (:math:`nF_U`'s Hessian is :math:`\\sum_{i\\notin U}
        \\nabla^2 r_i`). For a quadratic objective (least squares, ``damping=0``) the series is
        exact, so order 2 is off by :math:`O(p_U^3)` where order 1 is off by
        :math:`O(p_U^2)`; otherwise the third derivative of :math:`J` and the measurement's own
        curvature :math:`\\frac12\\Delta^T\\nabla^2 f\\Delta` also enter at :math:`O(p_U^2)` and
        are *not* included (as in Basu et al.). :math:`H_U` is the calculator's curvature on
        the group's examples: the Hessian (``curvature="hessian"``) or the Gauss-Newton matrix
        (``"gauss_newton"``), each with :math:`\\lambda_{wd} I`; the damping :math:`\\lambda`
        is not part of any example's term and stays in :math:`A` only.

        Parameters
        ----------
        test_data
            The ``m`` test examples.
        groups
            A list of ``G`` groups, each a list (or 1-d tensor) of distinct training indices;
            or a label array ``[n]`` (tensor, array or flat list), each distinct label one
            group, in sorted label order (``numpy.unique``).
        order
            ``1`` (sum of the members' removal effects) or ``2`` (with the group-curvature
            correction).

        Returns
        -------
        Tensor ``[m, G]``
            Positive: removing the group increases :math:`f(z_j)`.

        Raises
        ------
        InputError
            An empty group, a non-integer or out-of-range index, an index repeated within a
            group, a group of all ``n`` examples, a label array whose length is not ``n``, or
            ``order`` not 1 or 2 (the message names the group, index or value).

        Notes
        -----
        Cost, order 1: the test inverse-HVP (one solve, cached, shared with :meth:`influence`)
        and the training gradients of the group members (from the cache when it is filled).
        Order 2 adds one solve with ``G`` right-hand sides (:math:`A^{-1}s_U/n`) and one
        curvature-vector product per group over its :math:`u_g` examples (about two forward
        and two backward passes per member); memory ``[G, p]``.

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> from infl import ExactHessian, InfluenceCalculator, Objective
        >>> X, y = torch.randn(30, 3), torch.randint(0, 2, (30,))
        >>> calc = InfluenceCalculator(nn.Linear(3, 2), Objective("cross_entropy", 0.1), (X, y),
        ...                            ExactHessian(), progress=False, check_minimum=False)
        >>> calc.group_removal_effect((X[:4], y[:4]), [[0, 1, 2], [5, 6]], order=2).shape
        torch.Size([4, 2])
        """
        return group_influence.group_removal_effect(self, test_data, groups, order)

    def self_influence(self, indices: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Influence of each training example on its own measurement.

        :math:`-\\nabla f(z_i)^T (H+\\lambda I)^{-1} g_i`, the diagonal of
        ``influence(train_data)`` (Koh & Liang's :math:`\\mathcal I_{up,loss}(z_i, z_i)`).
        Returns ``[k]`` for ``indices`` (all ``n`` if ``None``).
        Cost: one inverse-HVP per training example, solved ``chunk_size`` at a time.

        Sign (loss measurement, positive definite :math:`A`): negative; *more negative* = more
        unusual. Without weight decay it is :math:`-g_i^T A^{-1} g_i \\le 0` exactly; with
        weight decay :math:`g_i` carries :math:`\\lambda_{wd}\\theta` and well-fit examples
        can score slightly above 0. For the positive "higher = more likely mislabelled" score
        that Captum, pyDVL and TracIn report, use :meth:`self_influence_score`.
        """
        return train_gradients.self_influence(self, indices)

    def self_influence_score(
        self, indices: Sequence[int] | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Self-influence as an outlier score: :math:`\\nabla f(z_i)^T (H+\\lambda I)^{-1} g_i`.

        Equal to ``-self_influence(indices)`` (same cost, same low-rank path), ``[k]``.

        Sign (loss measurement, positive definite :math:`A`): positive (exactly
        :math:`g_i^T A^{-1} g_i \\ge 0` without weight decay); *higher* = more unusual / more
        likely mislabelled — rank by it, descending, to inspect labels.

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> from infl import ExactHessian, InfluenceCalculator, Objective
        >>> X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
        >>> calc = InfluenceCalculator(nn.Linear(3, 2), Objective("cross_entropy"), (X, y),
        ...     ExactHessian(damping=0.1), progress=False, check_minimum=False)
        >>> suspects = calc.self_influence_score().argsort(descending=True)[:5]
        """
        return -self.self_influence(indices)

    def param_change(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Predicted parameter change :math:`\\theta_{-i} - \\theta^*` when removing each ``i``.

        ``[k, p]``: row ``r`` is :math:`(H+\\lambda I)^{-1} g_{i_r} / n`, i.e.
        :math:`-\\mathcal I_{up,params}(z_{i_r}) / n`, in the units of the parameter-change
        norms that :func:`infl.retrain_ground_truth` reports.
        """
        grads = self.train_grads(indices)
        return self.fitted_solver().solve(grads, progress=self.progress).value / self.num_train

    def top_k(
        self, test_data: Any, k: int, *, by: str = "abs"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` training examples with the largest influence on each test example.

        Parameters
        ----------
        k
            How many (at most ``n``).
        by
            ``"abs"`` (largest :math:`|\\text{influence}|`), ``"helpful"`` (most negative
            influence: up-weighting them lowers the test loss) or ``"harmful"`` (most
            positive).

        Returns
        -------
        indices, scores
            Both ``[m, k]``; ``scores`` are the influence values at ``indices`` (sign as in
            :meth:`influence`: negative = helpful, positive = harmful).

        Notes
        -----
        ``[m, n]`` is never formed: the scores stream past a running top-``k`` per test
        example (``[b_r, k + chunk_size]``), test examples in row blocks set by
        ``memory_budget`` (see :mod:`infl.streaming`). Cost as :meth:`influence`. Under
        ``torch.distributed`` the gathered :meth:`influence` is ranked instead.
        """
        return scoring.top_k(self, test_data, k, by)

    # ------------------------------------------------------------------ export, save, load
    def influence_frame(
        self,
        test_data: Any,
        test_ids: Ids = None,
        train_ids: Ids = None,
        *,
        kind: str = "influence",
        long: bool = True,
    ) -> pd.DataFrame:
        """:meth:`influence` (or :meth:`removal_effect`) as a pandas ``DataFrame``.

        ``kind`` is ``"influence"`` (negative = helpful, positive = harmful) or
        ``"removal_effect"`` (positive = removing the example raises the test loss: helpful);
        the ids and ``long`` are those of :func:`infl.export.scores_to_frame` (long form:
        columns ``test_id``, ``train_id``, ``kind``). Needs ``pip install infl[export]``.
        """
        return scoring.influence_frame(self, test_data, test_ids, train_ids, kind, long)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save the fitted solver, so that :meth:`load` rebuilds this calculator with no HVP.

        The file holds the fitted state (eigenpairs, Arnoldi basis, K-FAC factors, LiSSA's
        scale and spectrum estimate, PCG's preconditioner; nothing for CG), the solver's
        hyperparameters, ``curvature``, ``chunk_size`` and fingerprints of the model's
        parameters and buffers, the objective and the training data. It is written atomically
        (one ``torch.save`` file, tensors on the CPU, a JSON header). Fits the solver first if
        it is not fitted yet. Cached gradients and inverse-HVPs are not saved.
        """
        persistence.save_calculator(self, path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module,
        objective: Objective,
        train_data: Any,
        *,
        measurement: PerExampleFn | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        progress: bool = True,
        check_minimum: bool = True,
    ) -> InfluenceCalculator:
        """A calculator whose solver is the fit saved by :meth:`save`: no HVP, no data pass
        for the curvature.

        ``model``, ``objective`` and ``train_data`` must be those the fit was made with; the
        solver, ``curvature`` and ``chunk_size`` come from the file; the other arguments are
        those of the constructor. Cost: one pass over the training data to fingerprint it
        (plus the constructor's minimum check, ``check_minimum=False`` to skip it).

        Raises
        ------
        StoreMismatchError
            The model parameters, objective or training data differ from the saved ones
            (named in the message), or the file is corrupted or of another format version.

        Examples
        --------
        >>> import tempfile, torch
        >>> from torch import nn
        >>> from infl import ExactHessian, InfluenceCalculator, Objective
        >>> X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
        >>> model, objective = nn.Linear(3, 2), Objective("cross_entropy")
        >>> calc = InfluenceCalculator(model, objective, (X, y), ExactHessian(damping=0.1),
        ...                            progress=False, check_minimum=False)
        >>> path = tempfile.mkdtemp() + "/fit.pt"
        >>> calc.save(path)
        >>> again = InfluenceCalculator.load(path, model, objective, (X, y), progress=False,
        ...                                  check_minimum=False)
        >>> same = bool((again.influence((X, y)) == calc.influence((X, y))).all())
        >>> again.operator.num_matvecs, same
        (0, True)
        """
        return persistence.load_calculator(
            cls,
            path,
            model,
            objective,
            train_data,
            measurement=measurement,
            cache_bytes=cache_bytes,
            progress=progress,
            check_minimum=check_minimum,
        )
