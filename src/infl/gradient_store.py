"""Projected per-example training gradients on disk: computed once, reused by every query.

A :class:`GradientStore` holds :math:`\\Phi = G Q^T` (``[n, k]``): the ``n`` training gradients
:math:`g_i = \\nabla\\ell(z_i) + \\Lambda\\theta` projected by a ``[k, p]`` matrix :math:`Q`,
``k`` much smaller than ``p``. Two projections:

* ``basis="random"``: a seeded Johnson-Lindenstrauss matrix :math:`Q = P` with i.i.d.
  :math:`\\mathcal N(0, 1/k)` (or :math:`\\pm 1/\\sqrt k`) entries, the matrix of
  :func:`infl.attribution.projection.projection_blocks` (regenerated from the seed, never
  stored). A query projects the *inverse-HVP of each test point* with the same :math:`P`:

  .. math::

      \\widehat{\\text{influence}}[j, i] = -(P A^{-1}\\nabla f(z_j))^T (P g_i),

  an unbiased estimate of ``influence[j, i]`` :math:`= -\\nabla f(z_j)^T A^{-1} g_i`, because
  :math:`\\mathbb E[P^TP] = I_p`; for Gaussian entries its variance is
  :math:`((u^Tv)^2 + \\|u\\|^2\\|v\\|^2)/k` (:math:`u = A^{-1}\\nabla f(z_j)`, :math:`v = g_i`),
  so the error falls like :math:`1/\\sqrt k`. The store does not depend on the solver or the
  damping: one store serves every :math:`A`.
* ``basis="arnoldi"``: the calculator's fitted low-rank inverse :math:`U^T\\operatorname{diag}(w)U`
  (``Arnoldi``), :math:`Q = U` (``[r, p]``, orthonormal rows); a query costs the test
  gradients only, :math:`-((\\nabla f(z_j) U^T) \\odot w)(G U^T)^T`, *exactly* the
  calculator's scores for that solver (no solve, no sampling error). The store is tied to
  that fit (its basis is fingerprinted).

On disk, a directory: ``config.json`` (settings, compared on reopen: model parameters,
objective, training data, projection and its seed, storage dtype, mixed precision, chunk
size; for ``"arnoldi"`` the solver and a digest of its basis), ``grads.npy`` (``[n, k]``,
memory-mapped, float16, bfloat16 (as raw int16 bits), float32 or float64) and
``progress.json`` (finished chunks). Rows are written chunk by chunk, flushed, then recorded
atomically: an interrupted build (Ctrl-C, a crash, a full disk) resumes at the first
unfinished chunk.

``mixed_precision="bfloat16"`` / ``"float16"`` computes the training gradients under
:func:`torch.autocast` on the model's device (matrix products in the low precision,
accumulation and the gradients themselves in float32), a float32 model needed; results are
deterministic for a given seed and device.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from infl import persistence, streaming
from infl.attribution.projection import ProjectionKind, _Projector
from infl.data import as_indexed
from infl.errors import InputError, StoreMismatchError
from infl.score_store import _numpy_dtype, _write_failed, create_npy
from infl.solvers.base import solver_spec
from infl.store import Store, write_atomic

if TYPE_CHECKING:
    from infl.calculator import InfluenceCalculator

__all__ = ["STORE_DTYPES", "GradientStore"]

STORE_FORMAT = "infl.gradient-store"
STORE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
"""Storage dtypes of the projected gradients, by name."""
AUTOCAST: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_PROJECTION_BYTES = 1 << 28

Basis = Literal["random", "arnoldi"]


def _dtype(value: str | torch.dtype, what: str, table: dict[str, torch.dtype]) -> str:
    name = str(value).removeprefix("torch.")
    if name not in table:
        raise InputError(f"{what} must be one of {sorted(table)}, got {value!r}")
    return name


class GradientStore:
    """Projected training gradients ``[n, k]`` on disk, bound to a calculator for queries.

    Build (or resume) one with :meth:`build`; then :meth:`influence` and :meth:`top_k` score
    any test batch against all ``n`` training examples at the cost of one test-gradient pass
    (plus, for ``basis="random"``, one solve of the test gradients) and an ``[m, k] x [k, n]``
    product streamed from disk. See the module docstring for the estimators.

    Attributes
    ----------
    calc : InfluenceCalculator
        The calculator whose model, objective, data (and, for ``"arnoldi"``, fitted solver)
        the store was built from.
    path : Path
        The store directory.
    settings : dict
        What the store was built with (``config.json``).
    num_train, dim : int
        ``n`` and ``k``.

    Examples
    --------
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from infl import ExactHessian, GradientStore, InfluenceCalculator, Objective
    >>> X, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    >>> calc = InfluenceCalculator(nn.Linear(3, 2), Objective("cross_entropy"), (X, y),
    ...     ExactHessian(damping=0.1), progress=False, check_minimum=False)
    >>> store = GradientStore.build(calc, tempfile.mkdtemp(), dim=64, seed=0)
    >>> store.influence((X[:4], y[:4])).shape
    torch.Size([4, 40])
    """

    def __init__(
        self, calc: InfluenceCalculator, path: Path, settings: dict[str, Any], store: Store
    ) -> None:
        self.calc = calc
        self.path = path
        self.settings = settings
        self._store = store
        self.num_train = int(settings["shape"][0])
        self.dim = int(settings["shape"][1])
        self.basis: Basis = settings["basis"]
        self.storage_dtype = STORE_DTYPES[settings["storage_dtype"]]
        self._projector: _Projector | None = None
        self._projection_bytes = DEFAULT_PROJECTION_BYTES

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        calc: InfluenceCalculator,
        path: str | os.PathLike[str],
        *,
        dim: int | None = None,
        basis: Basis = "random",
        seed: int = 0,
        kind: ProjectionKind = "gaussian",
        dtype: str | torch.dtype = "float32",
        mixed_precision: str | torch.dtype | None = None,
        projection_bytes: int | None = None,
    ) -> GradientStore:
        """Project and store every training gradient of ``calc`` (resuming a partial store).

        Parameters
        ----------
        calc
            The calculator: its model, objective, training data, chunk size (and, for
            ``basis="arnoldi"``, its fitted low-rank solver).
        path
            The store directory (created if missing; resumed if it holds the same settings).
        dim
            :math:`k`, the projection dimension (``basis="random"``; required there).
            Larger is closer to the unprojected scores (error about :math:`\\propto 1/\\sqrt
            k`).
        basis
            ``"random"`` (seeded Johnson-Lindenstrauss :math:`P`, any solver at query time)
            or ``"arnoldi"`` (the calculator's fitted ``Arnoldi`` basis, exact for it).
        seed, kind
            The seed and entry distribution (``"gaussian"`` or ``"rademacher"``) of
            :math:`P`.
        dtype
            Storage dtype of the ``[n, k]`` rows: ``"float16"``, ``"bfloat16"``,
            ``"float32"`` (default) or ``"float64"``. Queries compute in the model's dtype.
        mixed_precision
            ``None`` (default), ``"bfloat16"`` or ``"float16"``: compute the per-example
            gradients under :func:`torch.autocast` in that precision (float32 model only).
        projection_bytes
            Keep :math:`P` (``k * p`` numbers) in memory when it fits this many bytes
            (default: a quarter of the calculator's ``memory_budget``, else 256 MiB);
            otherwise regenerate it block by block for each chunk.

        Returns
        -------
        GradientStore

        Raises
        ------
        InputError
            A bad ``dim``, ``basis``, ``kind`` or dtype; ``"arnoldi"`` without a low-rank
            solver; mixed precision for a model that is not float32.
        StoreMismatchError
            ``path`` holds a store of other settings (the message names the setting).
        StoreWriteError
            A write failed (a full disk); the finished chunks are kept for the next call.

        Notes
        -----
        Cost: one pass over the training gradients (``chunk_size`` at a time), each chunk
        projected (:math:`O(b k p)`), written and flushed; memory one chunk of gradients, its
        projection and :math:`P` (when kept). ``"arnoldi"`` first fits the solver if needed.
        """
        # every rank would write the same files: under torch.distributed one process builds it
        streaming._refuse_distributed(calc, "building a gradient store")
        storage = _dtype(dtype, "dtype", STORE_DTYPES)
        amp = (
            None
            if mixed_precision is None
            else _dtype(mixed_precision, "mixed_precision", AUTOCAST)
        )
        wrapper = calc.wrapper
        if amp is not None and wrapper.dtype != torch.float32:
            raise InputError(
                f"mixed_precision={amp!r} computes float32 models' gradients in lower precision; "
                f"this model is {wrapper.dtype}: convert it with model.float() or drop "
                "mixed_precision"
            )
        if kind not in ("gaussian", "rademacher"):
            raise InputError(f"kind must be 'gaussian' or 'rademacher', got {kind!r}")
        settings: dict[str, Any] = {
            "format": STORE_FORMAT,
            "version": 1,
            "basis": basis,
            "storage_dtype": storage,
            "mixed_precision": amp,
            "chunk_size": calc.chunk_size,
            **persistence._identity(wrapper.model, calc.objective, calc.train),
        }
        if basis == "random":
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise InputError(
                    f"dim must be a positive integer (the projection dimension k), got {dim!r}"
                )
            settings.update({"projection": kind, "seed": int(seed), "shape": [calc.num_train, dim]})
        elif basis == "arnoldi":
            low = calc.fitted_solver().low_rank()
            if low is None:
                raise InputError(
                    f"basis='arnoldi' needs a low-rank solver (infl.Arnoldi) in the calculator, "
                    f"got {type(calc.solver).__name__}; use basis='random' for any solver"
                )
            settings.update(
                {
                    "solver": solver_spec(calc.solver),
                    "damping": calc.fitted_solver().damping,
                    "curvature": calc.curvature,
                    "basis digest": _digest(low[0]),
                    "shape": [calc.num_train, int(low[0].shape[0])],
                }
            )
        else:
            raise InputError(f"basis must be 'random' or 'arnoldi', got {basis!r}")
        root = Path(path)
        try:
            store = Store(root, settings)
        except OSError as err:
            raise _write_failed("the store's settings", root, err) from err
        built = cls(calc, root, store.settings, store)
        budget = projection_bytes
        if budget is None:
            budget = (
                calc.memory_budget // 4
                if calc.memory_budget is not None
                else DEFAULT_PROJECTION_BYTES
            )
        built._projection_bytes = budget
        built._fill(amp)
        return built

    def _project(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ Q.T`` (``[b, p] -> [b, k]``) in the rows' dtype."""
        if self.basis == "arnoldi":
            low = self.calc.fitted_solver().low_rank()
            assert low is not None
            return rows.to(low[0]) @ low[0].T
        if self._projector is None:
            self._projector = _Projector(
                self.dim,
                self.calc.num_params,
                int(self.settings["seed"]),
                self.settings["projection"],
                self.calc.wrapper.dtype,
                self.calc.wrapper.device,
                self._projection_bytes,
            )
        return self._projector(rows.to(self.calc.wrapper.dtype))

    def _fill(self, amp: str | None) -> None:
        """Write every unfinished chunk of projected training gradients."""
        npy = self.path / "grads.npy"
        done = self.chunks_done
        n, chunk = self.num_train, self.calc.chunk_size
        total = -(-n // chunk)
        if done == total:
            return
        if not npy.exists():
            if done:
                raise StoreMismatchError(
                    f"{self.path} records {done} finished chunks but grads.npy is missing; "
                    "delete the directory to start over"
                )
            create_npy(npy, (n, self.dim), self.storage_dtype)
        array = self._memmap("r+")
        wrapper = self.calc.wrapper
        bar = tqdm(
            total=total,
            initial=done,
            desc="gradient store",
            disable=not self.calc.progress,
            leave=False,
            unit="chunk",
        )
        try:
            for start, batch in self.calc.train.chunks(chunk, skip=done):
                wrapper.check_targets(batch, offset=start, what=self.calc.train.name)
                if amp is not None:
                    with torch.autocast(device_type=wrapper.device.type, dtype=AUTOCAST[amp]):
                        grads = wrapper.train_grads(batch)
                    grads = grads.float()
                else:
                    grads = wrapper.train_grads(batch)
                rows = self._project(grads).to("cpu", self.storage_dtype)
                if self.storage_dtype == torch.bfloat16:
                    rows = rows.view(torch.int16)
                try:
                    array[start : start + rows.shape[0]] = rows.numpy()
                    array.flush()
                except OSError as err:
                    raise _write_failed("projected gradients", npy, err) from err
                self._save_progress(start // chunk + 1)
                bar.update(1)
        finally:
            bar.close()
            del array

    def _save_progress(self, chunks: int) -> None:
        target = self._store.path("progress", "json")
        try:
            write_atomic(target, json.dumps({"chunks_done": chunks}))
        except OSError as err:
            raise _write_failed("the progress record", target, err) from err

    @property
    def chunks_done(self) -> int:
        """Finished chunks of ``chunk_size`` training examples."""
        record = self._store.load_json("progress")
        return int(record["chunks_done"]) if isinstance(record, dict) else 0

    @property
    def complete(self) -> bool:
        """Whether every training example's projected gradient is stored."""
        return self.chunks_done * self.calc.chunk_size >= self.num_train

    def _memmap(self, mode: Literal["r", "r+"]) -> np.memmap[Any, Any]:
        npy = self.path / "grads.npy"
        array = np.load(npy, mmap_mode=mode)
        if not isinstance(array, np.memmap) or tuple(array.shape) != (self.num_train, self.dim):
            raise StoreMismatchError(
                f"{npy} is not the [{self.num_train}, {self.dim}] array this store records; "
                "delete the directory to start over"
            )
        if array.dtype != _numpy_dtype(self.storage_dtype):
            raise StoreMismatchError(f"{npy} holds {array.dtype}, not {self.storage_dtype}")
        return array

    # ------------------------------------------------------------------ reading
    def gradients(self, rows: slice | None = None) -> torch.Tensor:
        """The stored projections :math:`\\Phi` (``[n, k]``, or ``rows`` of it), in the
        storage dtype, on the CPU."""
        self._require_complete()
        block = np.array(self._memmap("r")[rows if rows is not None else slice(None)])
        values = torch.from_numpy(block)
        return values.view(torch.bfloat16) if self.storage_dtype == torch.bfloat16 else values

    def _require_complete(self) -> None:
        if not self.complete:
            raise InputError(
                f"the gradient store {self.path} is not complete ({self.chunks_done} chunks): "
                "call GradientStore.build again with the same settings to finish it"
            )

    def _query(self, grads: torch.Tensor) -> torch.Tensor:
        """``[b, k]`` query rows: :math:`P A^{-1}\\nabla f` (random) or
        :math:`(\\nabla f U^T) \\odot w` (arnoldi)."""
        if self.basis == "arnoldi":
            low = self.calc.fitted_solver().low_rank()
            if low is None or _digest(low[0]) != self.settings["basis digest"]:
                raise StoreMismatchError(
                    f"{self.path} was built on another Arnoldi basis than the calculator's "
                    "fitted one; build a new store for this fit"
                )
            return (grads.to(low[0]) @ low[0].T) * low[1]
        ihvp = self.calc.fitted_solver().solve(grads, progress=False).value
        return self._project(ihvp)

    def iter_tiles(self, test_data: Any) -> Any:
        """``(row_start, col_start, tile)`` over the estimated ``[m, n]`` scores: row blocks
        of test examples (``memory_budget``), column chunks of ``chunk_size`` read from disk."""
        self._require_complete()
        calc = self.calc
        test = as_indexed(test_data, "test data")
        rows = streaming.row_block_size(calc, len(test))
        array = self._memmap("r")
        chunk = calc.chunk_size
        for row_start, batch in test.chunks(rows):
            query = self._query(calc.wrapper.per_example_grads(calc.measurement, batch))
            for col in range(0, self.num_train, chunk):
                stored = torch.from_numpy(np.array(array[col : col + chunk]))
                if self.storage_dtype == torch.bfloat16:
                    stored = stored.view(torch.bfloat16)
                phi = stored.to(query.device, query.dtype)
                yield row_start, col, -(query @ phi.T)

    def influence(self, test_data: Any) -> torch.Tensor:
        """Estimated ``influence(test)``: ``[m, n]``, sign as
        :meth:`InfluenceCalculator.influence` (negative = helpful, positive = harmful).

        ``"random"``: :math:`-(P A^{-1}\\nabla f(z_j))^T \\phi_i` (unbiased, error
        :math:`\\propto 1/\\sqrt k`); ``"arnoldi"``: the calculator's Arnoldi scores exactly
        (up to the storage dtype's rounding).

        Cost: one test-gradient pass, one solve of the ``m`` test gradients (``"random"``
        only), the projection (:math:`O(mkp)`) and an :math:`O(mkn)` product over the stored
        rows read chunk by chunk; no training gradient.
        """
        test = as_indexed(test_data, "test data")
        dtype, device = self.calc.wrapper.dtype, self.calc.wrapper.device
        scores = torch.empty(len(test), self.num_train, dtype=dtype, device=device)
        for r, c, tile in self.iter_tiles(test):
            scores[r : r + tile.shape[0], c : c + tile.shape[1]] = tile
        return scores

    def top_k(
        self, test_data: Any, k: int, *, by: str = "abs"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most influential training examples per test example, from the store:
        ``[m, k]`` indices and estimated scores (``by`` as :meth:`InfluenceCalculator.top_k`),
        never forming ``[m, n]``."""
        if not 1 <= k <= self.num_train:
            raise InputError(f"k must be in 1..{self.num_train}, got {k}")
        test = as_indexed(test_data, "test data")
        m = len(test)
        out_idx = torch.empty(m, k, dtype=torch.long)
        out_val = torch.empty(m, k, dtype=self.calc.wrapper.dtype)
        current: streaming.RunningTopK | None = None
        row = -1
        for r, c, tile in self.iter_tiles(test):
            if r != row:
                if current is not None:
                    out_idx[row : row + current.indices.shape[0]] = current.indices.cpu()
                    out_val[row : row + current.indices.shape[0]] = current.values.cpu()
                current = streaming.RunningTopK(tile.shape[0], k, by, tile.dtype, tile.device)
                row = r
            assert current is not None
            current.update(c, tile)
        if current is not None:
            out_idx[row : row + current.indices.shape[0]] = current.indices.cpu()
            out_val[row : row + current.indices.shape[0]] = current.values.cpu()
        return out_idx, out_val


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(str((data.dtype, tuple(data.shape))).encode())
    digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
