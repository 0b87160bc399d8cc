"""Kronecker factors of the Fisher, per layer, from streamed passes over the training data.

For a layer with weight :math:`W` (``[out, in]``; a bias is an extra column fed a constant 1)
and an example :math:`i` whose layer input/output at location :math:`t` (a sequence position,
a convolution patch; one location for a plain ``nn.Linear`` on ``[b, in]``) are :math:`a_{i,t}`
(``[in]``) and :math:`s_{i,t}` (``[out]``), the per-example gradient is

.. math::

    G_i = \\nabla_W \\ell_i = \\sum_t g_{i,t} a_{i,t}^T, \\qquad
    g_{i,t} = \\partial \\ell_i / \\partial s_{i,t},

and its Fisher block :math:`F = \\frac1n\\sum_i \\mathrm{vec}(G_i)\\mathrm{vec}(G_i)^T` is
approximated by :math:`S \\otimes A` (row-major ``vec``, the order of ``W.flatten()``) with

.. math::

    A = \\frac1n\\sum_i \\sum_t a_{i,t}a_{i,t}^T, \\qquad
    S = \\frac1n\\sum_i \\frac1{T}\\sum_t g_{i,t}g_{i,t}^T

— the *spatial-sum convention* of Grosse & Martens (2016): activations summed over the
:math:`T` locations, gradients averaged, so that :math:`S\\otimes A = T\\,E_t[gg^T]\\otimes
E_t[aa^T]`, the Fisher block when derivatives at different locations are uncorrelated and
statistics do not depend on the location. For a single location it is the plain K-FAC of
Martens & Grosse (2015). Convolutions use ``unfold`` patches as :math:`a_{i,t}` (``in`` =
``C·kh·kw`` in the order of ``weight.reshape(out, -1)``) and the output pixels as locations.

Labels: ``fisher="true"`` draws :math:`y \\sim p(y|f(x))` from the model's predictive
distribution with a seeded generator (so :math:`E[gg^T]` is the Gauss-Newton matrix in
expectation); ``"empirical"`` uses the data's own labels. ``mc_samples="exact"`` replaces the
draws by the expectation itself: with :math:`J` the Jacobian of example :math:`i`'s outputs and
:math:`H_f = E_y[\\nabla_f\\ell\\,\\nabla_f\\ell^T]` the loss's output Hessian (``diag(p) - p
p^T`` for cross-entropy), :math:`E_y[gg^T] = \\sum_j (J^T r_j)(J^T r_j)^T` for any columns
:math:`r_j` with :math:`\\sum_j r_j r_j^T = H_f`, so one backward pass per column gives the
factors with no sampling noise (:func:`~infl.solvers.fisher_labels.fisher_root`).

This module only computes, over the passes of :mod:`infl.solvers.kronecker_stream`;
:mod:`infl.solvers.kfac` turns the factors into a solver.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from infl.data import Batch, IndexedData, tree_map_tensors
from infl.errors import InputError, NonFiniteError
from infl.finite import all_finite
from infl.layer_grads import (
    LayerPerExampleGradients,
    SliceBuffers,
    conv_padding,
    conv_weight_grads,
    example_slices,
)
from infl.losses import PerExampleFn
from infl.model import ModelWrapper
from infl.solvers import conv_gram
from infl.solvers.kronecker_stream import ChunkRecord, Replay, stream

SUPPORTED = "nn.Linear, nn.Conv2d (groups=1, zero padding)"


@dataclass
class LayerBlock:
    """One supported layer: where its parameters sit in the flat vector, and its factors.

    Attributes
    ----------
    name
        The module's name in ``model.named_modules()`` (``"<root>"`` for the model itself).
    module
        The layer (used only to register temporary forward hooks).
    weight, bias
        Names of its *trainable* weight / bias parameters (``None`` if absent or frozen).
    weight_slice, bias_slice
        Their slices of the flat ``[p]`` parameter vector.
    out_dim, in_dim
        :math:`W` as a matrix is ``[out_dim, in_dim]`` (``in_dim`` counts the bias column).
    A, S
        ``[in_dim, in_dim]`` and ``[out_dim, out_dim]`` factors (set by :func:`collect_factors`).
    """

    name: str
    module: nn.Module
    weight: str | None
    bias: str | None
    weight_slice: slice | None
    bias_slice: slice | None
    out_dim: int
    in_dim: int
    A: torch.Tensor | None = None
    S: torch.Tensor | None = None
    eig_A: torch.Tensor | None = None
    Q_A: torch.Tensor | None = None
    eig_S: torch.Tensor | None = None
    Q_S: torch.Tensor | None = None
    eigen_diag: torch.Tensor | None = None  # EK-FAC's refit, [out_dim, in_dim]

    @property
    def slices(self) -> list[slice]:
        """The parameter slices of this block, in flat-vector order."""
        return [s for s in (self.weight_slice, self.bias_slice) if s is not None]

    def gather(self, vectors: torch.Tensor) -> torch.Tensor:
        """``[k, p]`` → ``[k, out_dim, in_dim]``: this layer's part as matrices (bias last)."""
        k = vectors.shape[0]
        parts = []
        if self.weight_slice is not None:
            parts.append(vectors[:, self.weight_slice].reshape(k, self.out_dim, -1))
        if self.bias_slice is not None:
            parts.append(vectors[:, self.bias_slice].reshape(k, self.out_dim, 1))
        return torch.cat(parts, dim=2)

    def scatter(self, matrices: torch.Tensor, out: torch.Tensor) -> None:
        """Write ``[k, out_dim, in_dim]`` back into this layer's slices of ``out`` ``[k, p]``."""
        k = matrices.shape[0]
        col = 0
        if self.weight_slice is not None:
            width = self.in_dim - (1 if self.bias_slice is not None else 0)
            out[:, self.weight_slice] = matrices[:, :, :width].reshape(k, -1)
            col = width
        if self.bias_slice is not None:
            out[:, self.bias_slice] = matrices[:, :, col]

    def activations(self, inputs: torch.Tensor) -> torch.Tensor:
        """The layer input as ``[b, T, in_dim]`` (patches for a convolution, bias column 1).

        A convolution's is a transposed view of ``[b, in_dim, T]`` memory (``unfold``'s
        layout): copying it into ``[b, T, in_dim]`` order would be a strided transpose of the
        largest tensor of the pass, so the consumers take the view as it is.
        """
        b = inputs.shape[0]
        if isinstance(self.module, nn.Conv2d):
            conv = self.module
            patches = F.unfold(
                inputs,
                conv.kernel_size,
                dilation=conv.dilation,
                padding=conv_padding(conv),  # type: ignore[arg-type]
                stride=conv.stride,
            )  # [b, C*kh*kw, L]
            parts = [patches] if self.weight is not None else []
            if self.bias is not None:
                parts.append(patches.new_ones(b, 1, patches.shape[2]))
            return (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]).transpose(1, 2)
        acts = inputs.reshape(b, -1, inputs.shape[-1])
        if self.bias is None:
            return acts
        ones = acts.new_ones(*acts.shape[:2], 1)
        return torch.cat([acts, ones], dim=2) if self.weight is not None else ones

    def output_grads(self, grads: torch.Tensor) -> torch.Tensor:
        """:math:`\\partial\\ell/\\partial s` as ``[b, T, out_dim]``."""
        b = grads.shape[0]
        if isinstance(self.module, nn.Conv2d):
            return grads.reshape(b, self.out_dim, -1).transpose(1, 2)
        return grads.reshape(b, -1, self.out_dim)


@dataclass
class DiagonalBlock:
    """A parameter outside any supported layer, approximated by its Fisher diagonal."""

    name: str
    param_slice: slice
    diag: torch.Tensor | None = None  # [numel]

    @property
    def slices(self) -> list[slice]:
        return [self.param_slice]


@dataclass
class Partition:
    """The flat parameter vector split into Kronecker layers and diagonal leftovers."""

    layers: list[LayerBlock]
    diagonal: list[DiagonalBlock] = field(default_factory=list)


def _unsupported_reason(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups}"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r}"
        if conv_padding(module) is None:
            return "Conv2d with asymmetric 'same' padding"
        return None
    if isinstance(module, nn.Linear):
        return None
    return type(module).__name__


def partition(wrapper: ModelWrapper, *, allow_diagonal: bool) -> Partition:
    """Assign every trainable parameter to a supported layer or, if allowed, a diagonal block.

    Raises
    ------
    InputError
        Naming the trainable parameters outside a supported layer (and their module types)
        when ``allow_diagonal`` is false.
    """
    offsets: dict[str, slice] = {}
    start = 0
    for name, numel in zip(wrapper.names, wrapper.numels, strict=True):
        offsets[name] = slice(start, start + numel)
        start += numel
    by_id = {id(p): n for n, p in wrapper.model.named_parameters() if n in offsets}
    claimed: dict[str, str] = {}
    layers: list[LayerBlock] = []
    problems: dict[str, str] = {}
    for mname, module in wrapper.model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        weight = by_id.get(id(module.weight))
        bias = by_id.get(id(module.bias)) if module.bias is not None else None
        if weight is None and bias is None:
            continue
        reason = _unsupported_reason(module)
        label = mname or "<root>"
        shared = [n for n in (weight, bias) if n is not None and n in claimed]
        if shared:
            reason = f"parameter shared with layer {claimed[shared[0]]!r}"
        if reason is not None:
            for n in (weight, bias):
                if n is not None:
                    problems[n] = f"{label} ({reason})"
            continue
        for n in (weight, bias):
            if n is not None:
                claimed[n] = label
        out_dim = module.weight.shape[0]
        in_dim = (module.weight[0].numel() if weight is not None else 0) + (bias is not None)
        layers.append(
            LayerBlock(
                name=label,
                module=module,
                weight=weight,
                bias=bias,
                weight_slice=offsets[weight] if weight is not None else None,
                bias_slice=offsets[bias] if bias is not None else None,
                out_dim=out_dim,
                in_dim=in_dim,
            )
        )
    modules = dict(wrapper.model.named_modules())
    for name in wrapper.names:
        if name in claimed or name in problems:
            continue
        owner = name.rpartition(".")[0]
        kind = type(modules.get(owner, wrapper.model)).__name__
        problems[name] = f"{owner or '<root>'} ({kind})"
    if problems and not allow_diagonal:
        listed = "; ".join(f"{n!r} in {where}" for n, where in problems.items())
        raise InputError(
            f"K-FAC/EK-FAC approximate only trainable parameters of {SUPPORTED} layers; these "
            f"are outside one: {listed}. Freeze them (requires_grad=False), or pass "
            "unsupported='diagonal' to approximate them by their Fisher diagonal."
        )
    diagonal = [DiagonalBlock(n, offsets[n]) for n in wrapper.names if n in problems]
    return Partition(layers, diagonal)


def diagonal_sq_grads(
    wrapper: ModelWrapper, blocks: list[DiagonalBlock], loss_batch: Batch, loss_fn: PerExampleFn
) -> dict[str, torch.Tensor]:
    """:math:`\\sum_i (\\nabla_{\\theta_j}\\ell_i)^2` over a chunk, for the diagonal blocks,
    by ``vmap(grad)``: the fallback of :func:`_recorded_sq_grads` for parameters outside the
    layers of :mod:`infl.layer_grads` or a forward pass their hooks cannot read (the same
    conditions under which one batched pass of those layers would fail too).

    ``loss_fn(model, batch) -> [b]`` is the per-example loss the chunk's draw differentiated.
    """
    names = [blk.name for blk in blocks]
    sub = {n: wrapper.params[n] for n in names}
    others = {n: p for n, p in wrapper.params.items() if n not in sub}

    def single(sub_params: dict[str, torch.Tensor], example: Batch) -> torch.Tensor:
        one = tree_map_tensors(lambda t: t.unsqueeze(0), example)
        return loss_fn(wrapper.functional_model({**others, **sub_params}), one).sum()

    grads = vmap(grad(single), in_dims=(None, 0))(sub, loss_batch)
    return {n: (grads[n].detach() ** 2).sum(0).reshape(-1) for n in names}


def _recorded_sq_grads(
    batched: LayerPerExampleGradients | None, blocks: list[DiagonalBlock], rec: ChunkRecord
) -> dict[str, torch.Tensor] | None:
    """:math:`\\sum_i (\\nabla_{\\theta_j}\\ell_i)^2` of the diagonal blocks from their
    layers' inputs and output gradients recorded in the chunk's own backward pass (no pass
    of its own), or ``None`` where they were not recorded or a kernel refuses a layer."""
    if batched is None or rec.owners is None:
        return None
    inputs = {p: a for p, (a, _) in rec.owners.items()}
    out_grads = {p: g for p, (_, g) in rec.owners.items()}
    sizes = [blk.param_slice.stop - blk.param_slice.start for blk in blocks]
    rows = batched.from_recorded(inputs, out_grads, sizes)
    if rows is None:
        return None
    sums = (rows**2).sum(0)
    return dict(zip([blk.name for blk in blocks], torch.split(sums, sizes), strict=True))


def collect_factors(
    wrapper: ModelWrapper,
    data: IndexedData,
    part: Partition,
    *,
    fisher: str,
    chunk_size: int,
    generator: torch.Generator,
    mc_samples: int | str,
    progress: bool,
    keep: Replay | None = None,
) -> None:
    """Pass 1: fill ``A``, ``S`` of every layer and ``diag`` of every diagonal block (in place).

    Cost: one forward and ``mc_samples`` backward passes over the data (``"exact"``: one per
    output of an example); the diagonal blocks' per-example gradients come from the same
    passes where their parameters all sit in layers of :mod:`infl.layer_grads` (GroupNorm,
    LayerNorm, eval BatchNorm2d, grouped convolutions), else from one more per draw; memory
    :math:`O(\\sum_l in_l^2 + out_l^2)` for the factors, plus up to ``keep.budget`` bytes of
    the chunks' records when ``keep`` is given (:class:`~infl.solvers.kronecker_stream.Replay`).
    """
    dtype, device = wrapper.dtype, wrapper.device
    A = {
        ly.name: torch.zeros(ly.in_dim, ly.in_dim, dtype=dtype, device=device) for ly in part.layers
    }
    S = {
        ly.name: torch.zeros(ly.out_dim, ly.out_dim, dtype=dtype, device=device)
        for ly in part.layers
    }
    diag = {
        blk.name: torch.zeros(
            blk.param_slice.stop - blk.param_slice.start, dtype=dtype, device=device
        )
        for blk in part.diagonal
    }

    names = [blk.name for blk in part.diagonal]
    batched = LayerPerExampleGradients(wrapper.model, names) if names else None
    owners = batched.layers if batched is not None and batched.applicable else None

    def visit(rec: ChunkRecord) -> None:
        for ly in part.layers:
            g = rec.grads[ly.name]
            if rec.draw == 0 and _by_correlation(ly, rec.inputs[ly.name]):
                _add_conv_gram(A[ly.name], rec.inputs[ly.name], ly)
            elif rec.draw == 0:
                _add_gram(A[ly.name], rec.acts[ly.name])
            _add_gram(S[ly.name], g, rec.weight / g.shape[1])
        if part.diagonal:
            sq = _recorded_sq_grads(batched, part.diagonal, rec)
            if sq is None:
                sq = diagonal_sq_grads(wrapper, part.diagonal, rec.loss_batch, rec.loss_fn)
            for name, value in sq.items():
                diag[name] += value * rec.weight

    stream(
        wrapper,
        data,
        part.layers,
        visit,
        fisher=fisher,
        chunk_size=chunk_size,
        generator=generator,
        mc_samples=mc_samples,
        desc="K-FAC factors",
        progress=progress,
        owners=owners,
        keep=keep,
    )
    n = len(data)
    for ly in part.layers:
        ly.A = _mirrored(A[ly.name]) / n
        ly.S = _mirrored(S[ly.name]) / n
    for blk in part.diagonal:
        blk.diag = diag[blk.name] / n
    _check_finite(part)


def _gram_edges(d: int) -> list[int]:
    """Where :func:`_add_gram` cuts a ``d x d`` factor: 4 x 4 blocks from ``d = 1024``, 2 x 2
    from 256, none below (the products of a 2 x 2 cut were 20-30 % faster than one product on
    a CIFAR ResNet's factors, ``d = 576-2304``; of a 4 x 4 cut up to 42 %)."""
    parts = 4 if d >= 1024 else 2 if d >= 256 else 1
    return [d * k // parts for k in range(parts + 1)]


def _add_gram(out: torch.Tensor, x: torch.Tensor, alpha: float = 1.0) -> None:
    """``out += alpha * sum_{b,t} x[b,t] x[b,t]^T`` on and above the diagonal blocks of
    :func:`_gram_edges` (in place; :func:`_mirrored` fills the rest once at the end).

    ``x`` is ``[b, T, d]``. A convolution's is a transposed view
    (:meth:`LayerBlock.activations`): the sum is then a batched product over the examples,
    which reads that memory in its own order, instead of one product of ``[b T, d]`` rows that
    would first copy it into that order. Blocks below the diagonal would repeat those above it:
    skipping them saves up to 3/8 of the factor's multiply-adds."""
    batched = x.shape[1] > 1 and not x.is_contiguous()
    rows = x.transpose(1, 2) if batched else x.reshape(-1, x.shape[-1]).T  # [(b,) d, N]
    edges = _gram_edges(x.shape[-1])
    for r in range(len(edges) - 1):
        left = rows[..., edges[r] : edges[r + 1], :]
        for c in range(r, len(edges) - 1):
            block = out[edges[r] : edges[r + 1], edges[c] : edges[c + 1]]
            right = rows[..., edges[c] : edges[c + 1], :].transpose(-2, -1)
            if batched:
                block.addbmm_(left, right, alpha=alpha)
            else:
                block.addmm_(left, right, alpha=alpha)


def _by_correlation(layer: LayerBlock, inputs: list[torch.Tensor]) -> bool:
    """Whether the layer's ``A`` is summed by :mod:`~infl.solvers.conv_gram`: a stride-1
    convolution with a trainable weight, on ``[b, C, H, W]`` inputs where that is cheaper
    (:func:`~infl.solvers.conv_gram.prefer`)."""
    conv = layer.module
    return (
        layer.weight is not None
        and isinstance(conv, nn.Conv2d)
        and conv_gram.applies(conv)
        and all(x.dim() == 4 and conv_gram.prefer(x, conv) for x in inputs)
    )


def _add_conv_gram(out: torch.Tensor, inputs: list[torch.Tensor], layer: LayerBlock) -> None:
    """``out += sum_{b,t} a a^T`` for a stride-1 convolution from its calls' inputs, by
    :func:`~infl.solvers.conv_gram.patch_gram` (no ``unfold``); the bias column, when there
    is one, from the patches' sums."""
    conv = layer.module
    assert isinstance(conv, nn.Conv2d)
    d = out.shape[0] - (1 if layer.bias is not None else 0)
    for x in inputs:
        out[:d, :d] += conv_gram.patch_gram(x, conv)
        if layer.bias is not None:
            sums = conv_gram.patch_sums(x, conv)
            out[:d, d] += sums
            out[d, :d] += sums
            h_out, w_out = conv_gram.output_size(x, conv)
            out[d, d] += x.shape[0] * h_out * w_out


def _mirrored(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose blocks on and above the diagonal (:func:`_gram_edges`) are
    ``upper``'s (in place)."""
    edges = _gram_edges(upper.shape[0])
    for r in range(len(edges) - 1):
        for c in range(r + 1, len(edges) - 1):
            rows, cols = slice(edges[r], edges[r + 1]), slice(edges[c], edges[c + 1])
            upper[cols, rows] = upper[rows, cols].T
    return upper


def eigen_route(locations: int, out_dim: int, in_dim: int) -> str:
    """How :func:`collect_eigen_diagonal` forms :math:`Q_S^T G_i Q_A` for a layer.

    ``"rotate"``: rotate the ``T`` gradients and inputs first (:math:`T(o^2 + i^2 + o i)`
    multiply-adds per example), then sum their outer products; ``"form"``: form
    :math:`G_i = \\sum_t g_t a_t^T` first (:math:`T o i`), then rotate it
    (:math:`o^2 i + o i^2`). Many locations and small channels (the first stages of a
    convolutional network: ``T = 1024``, ``o = 64``, ``i = 576``, 6x fewer) favour
    ``"form"``; few locations and wide channels favour ``"rotate"``. One location always
    rotates (its square then factorises).
    """
    rotate = locations * (out_dim * out_dim + in_dim * in_dim + out_dim * in_dim)
    form = locations * out_dim * in_dim + out_dim * in_dim * (out_dim + in_dim)
    return "form" if locations > 1 and form < rotate else "rotate"


def eigendecompose(part: Partition) -> None:
    """Eigendecompose every layer's ``A`` and ``S`` (eigenvalues clamped at 0, in place)."""
    for ly in part.layers:
        assert ly.A is not None
        assert ly.S is not None
        eig_a, q_a = torch.linalg.eigh((ly.A + ly.A.T) / 2)
        eig_s, q_s = torch.linalg.eigh((ly.S + ly.S.T) / 2)
        ly.eig_A, ly.Q_A = eig_a.clamp_min(0), q_a
        ly.eig_S, ly.Q_S = eig_s.clamp_min(0), q_s


def collect_eigen_diagonal(
    wrapper: ModelWrapper,
    data: IndexedData,
    part: Partition,
    *,
    fisher: str,
    chunk_size: int,
    generator: torch.Generator,
    mc_samples: int | str,
    progress: bool,
    replay: Replay | None = None,
) -> None:
    """Pass 2 (EK-FAC): :math:`E_i[(Q_S^T G_i Q_A)^2]` per layer, into ``eigen_diag``.

    :math:`G_i = \\sum_t g_{i,t} a_{i,t}^T` is example ``i``'s exact gradient of the layer's
    weight matrix. With one location per example the square factorises,
    :math:`(Q_S^T g)^2 ((Q_A^T a)^2)^T`, and the chunk's sum is one matrix product; otherwise
    the ``[b, out, in]`` per-example gradients of the chunk are formed.

    With ``replay`` (complete: pass 1 kept every chunk's inputs and made this pass's draws
    from the generator it was given), no data is read: its records are visited instead.
    Otherwise ``generator``, seeded as that one was, makes the same draws here.
    """
    dtype, device = wrapper.dtype, wrapper.device
    acc = {
        ly.name: torch.zeros(ly.out_dim, ly.in_dim, dtype=dtype, device=device)
        for ly in part.layers
    }

    rotated_acts: dict[str, torch.Tensor] = {}  # Q_A^T a of the chunk, shared by its draws
    # the rotated per-example gradients of a few examples at a time, in two reused buffers:
    # at once, the last stage of a CIFAR ResNet summed the squares of 256 examples in 0.6-1.1 s
    # against 0.31 s 16 at a time (one thread)
    scratch = SliceBuffers(2, dtype, device)

    def visit(rec: ChunkRecord) -> None:
        for ly in part.layers:
            assert ly.Q_A is not None
            assert ly.Q_S is not None
            grads = rec.grads[ly.name]
            shape = (ly.out_dim, ly.in_dim)
            if eigen_route(grads.shape[1], ly.out_dim, ly.in_dim) == "form":
                # Q_S^T on the T output gradients first when that is cheaper than on G_i
                early = grads.shape[1] < ly.in_dim
                for rows in example_slices(rec.size, shape[0] * shape[1], dtype):
                    formed = _per_example_grads(
                        ly, rec, rows, scratch.get(0, rows, shape), ly.Q_S if early else None
                    )
                    rotated = torch.matmul(formed, ly.Q_A, out=scratch.get(1, rows, shape))
                    if not early:
                        rotated = torch.matmul(ly.Q_S.T, rotated, out=formed)
                    acc[ly.name].add_(rotated.square_().sum(0), alpha=rec.weight)
                continue
            if rec.draw == 0:
                a = _rotated_activations(ly, rec)
                rotated_acts[ly.name] = a[:, 0] ** 2 if a.shape[1] == 1 else a
            a = rotated_acts[ly.name]
            g = grads @ ly.Q_S  # [b, T, out]
            if a.dim() == 2:  # one location: a holds (Q_A^T a)^2, [b, in]
                acc[ly.name] += (g[:, 0] ** 2).T @ a * rec.weight
                continue
            for rows in example_slices(rec.size, shape[0] * shape[1], dtype):
                rotated = torch.bmm(
                    g[rows].transpose(1, 2), a[rows], out=scratch.get(0, rows, shape)
                )
                acc[ly.name].add_(rotated.square_().sum(0), alpha=rec.weight)

    stream(
        wrapper,
        data,
        part.layers,
        visit,
        fisher=fisher,
        chunk_size=chunk_size,
        generator=generator,
        mc_samples=mc_samples,
        desc="EK-FAC eigenvalues",
        progress=progress,
        replay=replay,
    )
    n = len(data)
    for ly in part.layers:
        ly.eigen_diag = acc[ly.name] / n
    _check_finite(part, eigenvalues_only=True)


def _rotated_activations(layer: LayerBlock, rec: ChunkRecord) -> torch.Tensor:
    """:math:`Q_A^T a_{i,t}` for the chunk's examples and locations, ``[b, T, in]``.

    For a convolution, one convolution of each call's input with the columns of :math:`Q_A`
    as filters (the bias coordinate's row of :math:`Q_A` as their bias), a transposed view of
    ``[b, in, T]``. The multiply-adds are those of the patches times :math:`Q_A`, but the
    patches are never unfolded nor copied into rows (on a CIFAR ResNet's last stage, 256
    channels of 8x8 and ``b = 256``: 151 MB and 0.5 s of one thread's copying). Otherwise (and
    in float64 on a CPU, where PyTorch's convolution unfolds the patches itself, with more
    overhead: 12 ms more per fit on the digits CNN) one product of the ``[b T, in]``
    activations.
    """
    assert layer.Q_A is not None
    conv, inputs = layer.module, rec.inputs[layer.name]
    # a float64 convolution on a CPU has no mkldnn kernel: it unfolds the patches itself
    fast = all(
        x.dim() == 4 and (x.dtype != torch.float64 or x.device.type != "cpu") for x in inputs
    )
    if isinstance(conv, nn.Conv2d) and layer.weight is not None and fast:
        taps = conv.weight[0].numel()
        filters = layer.Q_A[:taps].T.reshape(-1, *conv.weight.shape[1:]).contiguous()
        offset = layer.Q_A[taps] if layer.bias is not None else None
        padding = conv_padding(conv)
        assert padding is not None  # a Kronecker layer has zero padding that conv_padding reads
        calls = [
            F.conv2d(x, filters, offset, conv.stride, padding, conv.dilation).flatten(2)
            for x in inputs
        ]
        return (calls[0] if len(calls) == 1 else torch.cat(calls, dim=2)).transpose(1, 2)
    acts = rec.acts[layer.name]
    return (acts.reshape(-1, layer.in_dim) @ layer.Q_A).view(acts.shape)


def _per_example_grads(
    layer: LayerBlock,
    rec: ChunkRecord,
    rows: slice,
    out: torch.Tensor,
    out_basis: torch.Tensor | None = None,
) -> torch.Tensor:
    """:math:`G_i = \\sum_t g_{i,t} a_{i,t}^T` of the chunk's examples ``rows``, written into
    ``out`` (``[len(rows), out, in_dim]``, returned) (:math:`Q^T G_i` with ``out_basis``
    :math:`Q`, applied to the ``g``): for a convolution by PyTorch's weight-gradient kernel
    (:func:`~infl.layer_grads.conv_weight_grads`, no ``unfold``), else from the activations."""
    grads, inputs = rec.grads[layer.name][rows], rec.inputs[layer.name]
    conv = layer.module
    if not isinstance(conv, nn.Conv2d) or layer.weight is None or any(x.dim() != 4 for x in inputs):
        if out_basis is not None:
            grads = grads @ out_basis
        return torch.bmm(grads.transpose(1, 2), rec.acts[layer.name][rows], out=out)
    b, channels = grads.shape[0], layer.out_dim
    weights = out[:, :, : conv.weight[0].numel()]  # the bias column, when there is one, last
    start = 0
    for k, x in enumerate(inputs):  # one call's locations after another's (_joined)
        h_out, w_out = conv_gram.output_size(x, conv)
        g = grads[:, start : start + h_out * w_out].transpose(1, 2)  # [b, out, T_c]
        start += h_out * w_out
        if out_basis is not None:
            g = torch.matmul(out_basis.T, g)
        g = g.reshape(b, channels, h_out, w_out)
        if k == 0:
            conv_weight_grads(conv, x[rows], g, weights)
            if layer.bias is not None:
                out[:, :, -1] = g.sum((2, 3))
            continue
        call = grads.new_empty(weights.shape)
        conv_weight_grads(conv, x[rows], g, call)
        weights += call
        if layer.bias is not None:
            out[:, :, -1] += g.sum((2, 3))
    return out


def _check_finite(part: Partition, *, eigenvalues_only: bool = False) -> None:
    """Refuse a non-finite factor (pass 1's ``A``, ``S`` and diagonals; with
    ``eigenvalues_only``, pass 2's refitted eigenvalues alone: the rest was checked)."""
    for ly in part.layers:
        factors = (("A", ly.A), ("S", ly.S)) if not eigenvalues_only else ()
        for what, t in (*factors, ("eigenvalues", ly.eigen_diag)):
            if t is not None and not all_finite(t):
                raise NonFiniteError(
                    f"the K-FAC factor {what} of layer {ly.name!r} is not finite; the "
                    "activations or gradients overflow (check the inputs and the loss)"
                )
    for blk in [] if eigenvalues_only else part.diagonal:
        if blk.diag is not None and not all_finite(blk.diag):
            raise NonFiniteError(f"the Fisher diagonal of {blk.name!r} is not finite")
