"""One streamed pass over the training data for the Kronecker factors.

Per chunk and label draw, :func:`stream` hands a visitor each layer's inputs and the gradients
of the per-example losses at its outputs (:class:`ChunkRecord`), from one forward pass of the
chunk (temporary forward hooks on the layers) and one backward pass per draw. The factor pass,
EK-FAC's eigenvalue pass and the diagonal blocks' Fisher diagonal of
:mod:`infl.solvers.kronecker` are visitors of it. A pass can keep its chunks' records, with
the output gradients of the next pass's own label draws, when they all fit in a byte budget
(:class:`Replay`): the next pass then visits them without any forward or backward pass.
With the data's labels (``fisher="empirical"``) on a plain ``nn.Sequential`` of ``nn.Linear``
layers and element-wise activations, a chunk's record comes from one hand-run pass of that
chain instead (:func:`~infl.sequential_chain.chain_factors`: the same numbers, no hooks and no
autograd graph).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from infl.data import Batch, IndexedData, batch_size
from infl.errors import InputError, NonFiniteError
from infl.finite import all_finite
from infl.layer_grads import LayerPerExampleGradients
from infl.losses import PerExampleFn, _split_supervised
from infl.model import ModelWrapper
from infl.progress import progress_iter
from infl.sequential_chain import chain_factors, chain_layers
from infl.solvers.fisher_labels import Draw, builtin_loss_name, label_draws

if TYPE_CHECKING:
    from infl.solvers.kronecker import LayerBlock

__all__ = ["ChunkRecord", "Replay", "stream"]

Call = tuple[Any, torch.Tensor]
"""One recorded call of a hooked layer: its first positional argument (detached when a
tensor; ``None`` when it was called with keywords only) and its output."""


@dataclass
class ChunkRecord:
    """One chunk and one label draw: what every accumulator needs.

    ``inputs[name]`` holds the layer's input of each call (``[b, ...]``, as the layer saw it),
    ``acts[name]`` the same as ``[b, T, in_dim]`` (patches for a convolution: formed on first
    use and kept for the chunk's other draws, so a pass that reads only ``inputs`` never
    unfolds), ``grads[name]`` ``[b, T, out_dim]`` (gradients of the per-example losses),
    ``loss_batch`` the batch whose per-example ``loss_fn`` was differentiated (the labels
    used, sampled or true; for ``mc_samples="exact"`` the inputs and one column :math:`r_j` of
    the output Hessian's square root), ``weight`` the Monte-Carlo weight of this draw
    (``1 / mc_samples``; 1 for an exact column) and ``draw`` its index (the activations are
    the same for every draw of a chunk). ``owners[prefix]``, when :func:`stream` was given
    ``owners``, is that module's ``(input, output gradient)`` for this draw (``None`` for a
    chunk whose forward pass did not call each of them once on its examples).
    """

    size: int
    inputs: dict[str, list[torch.Tensor]]
    acts: Mapping[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    loss_batch: Batch
    weight: float
    draw: int
    loss_fn: PerExampleFn
    owners: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class Replay:
    """Every chunk's records of one pass, kept for the next pass to visit instead of the data.

    The keeping pass (:func:`stream` with ``keep=``) keeps each chunk's records (the layer
    inputs and every draw's output gradients, :func:`records_nbytes`) only while the whole
    pass fits in ``budget`` bytes: the first chunk's size times the number of chunks must,
    and so must the running total; otherwise every record is released and nothing more is
    kept (``complete`` stays ``False``). All or nothing, since keeping part of a large pass
    saved no time: on a CIFAR ResNet at n = 1000 the chunks after the kept ones ran slower
    by about what the kept ones saved.

    With ``generator`` (sampled labels), the kept output gradients are not the keeping
    pass's: they are those of the next pass's own draws, made from ``generator`` chunk after
    chunk as the next pass would make them (one more backward pass per draw while keeping).
    Without it (the data's labels, or the exact expectation) they are the keeping pass's.
    A complete replay is visited by the next pass (``replay=``) in the same order, releasing
    each record as it goes; kept records carry no ``owners``, and their ``acts`` are formed
    again on use.
    """

    budget: int
    generator: torch.Generator | None = None
    records: list[ChunkRecord] = field(default_factory=list)
    chunks: int = 0
    nbytes: int = 0
    complete: bool = False
    dropped: bool = False

    def admits(self, size: int, total_chunks: int) -> bool:
        """Whether one more chunk of ``size`` bytes keeps the whole pass within ``budget``;
        if not, everything kept is released and nothing more will be."""
        if self.dropped:
            return False
        first = self.chunks == 0
        if self.nbytes + size > self.budget or (first and size * total_chunks > self.budget):
            self.records.clear()
            self.chunks, self.nbytes, self.dropped = 0, 0, True
            return False
        return True

    def add(self, records: list[ChunkRecord], size: int, total_chunks: int) -> None:
        """Keep one admitted chunk's records (``size`` bytes)."""
        self.records += [replace(rec, acts={}, owners=None) for rec in records]
        self.nbytes += size
        self.chunks += 1
        self.complete = self.chunks == total_chunks


def records_nbytes(records: list[ChunkRecord]) -> int:
    """The bytes one chunk's records hold: each storage once, as much of it as its tensors
    span (``min(storage, numel * itemsize)``, so the view of the data set that a first
    layer's input often is counts the chunk's slice, and a broadcast gradient its storage)."""
    storages: dict[int, int] = {}
    for rec in records:
        for t in [*rec.grads.values(), *(a for calls in rec.inputs.values() for a in calls)]:
            storage = t.untyped_storage()
            span = min(storage.nbytes(), t.numel() * t.element_size())
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), span)
    return sum(storages.values())


class _Activations(Mapping[str, torch.Tensor]):
    """``name -> [b, T, in_dim]`` from the recorded inputs, each formed on first use."""

    def __init__(self, layers: list[LayerBlock], inputs: dict[str, list[torch.Tensor]]) -> None:
        self._layers = {ly.name: ly for ly in layers}
        self._inputs = inputs
        self._formed: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._formed:
            layer = self._layers[name]
            self._formed[name] = _joined([layer.activations(a) for a in self._inputs[name]])
        return self._formed[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


def stream(
    wrapper: ModelWrapper,
    data: IndexedData,
    layers: list[LayerBlock],
    visit: Callable[[ChunkRecord], None],
    *,
    fisher: str,
    chunk_size: int,
    generator: torch.Generator,
    mc_samples: int | str,
    desc: str,
    progress: bool,
    owners: Mapping[str, nn.Module] | None = None,
    keep: Replay | None = None,
    replay: Replay | None = None,
) -> None:
    """One pass over ``data``: per chunk (and label draw), layer inputs and output gradients.

    ``mc_samples`` label draws per example for ``fisher="true"``, or ``"exact"``: one
    backward pass per column of :func:`~infl.solvers.fisher_labels.fisher_root` instead of
    the draws. A chunk's draws are made one at a time, each just before its backward pass.

    Temporary forward hooks on the layers record their inputs and outputs during a call of
    the user's module at infl's parameters; they are removed in ``finally``, and the module
    holds its own parameters again after the call. ``owners`` (module prefix
    to module: the layers owning the diagonal blocks' parameters, e.g. norms) are hooked the
    same way, and their output gradients come from the same backward passes
    (``ChunkRecord.owners``).

    ``keep``: keep each chunk's records in it while they fit (:class:`Replay`; with its
    ``generator``, the records of the next pass's label draws). ``replay``: when it is
    ``complete``, visit its records instead of reading the data (``replay.records`` is
    emptied); otherwise stream the data as without it.
    """
    if replay is not None and replay.complete:
        while replay.records:
            rec = replay.records.pop(0)
            visit(replace(rec, acts=_Activations(layers, rec.inputs)))
        return  # no data is read
    records: dict[str, list[Call]] = {ly.name: [] for ly in layers}
    owners = dict(owners or {})
    owner_calls: dict[str, list[Call]] = {p: [] for p in owners}
    active = [False]

    def make_hook(calls: dict[str, list[Call]], name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if active[0]:
                a = args[0] if args else None  # a layer called with keywords records None
                calls[name].append((a.detach() if isinstance(a, torch.Tensor) else a, output))

        return hook

    def hook_layers() -> list[torch.utils.hooks.RemovableHandle]:
        hooked = [ly.module.register_forward_hook(make_hook(records, ly.name)) for ly in layers]
        hooked += [m.register_forward_hook(make_hook(owner_calls, p)) for p, m in owners.items()]
        return hooked

    # the data's labels on a chain of linear layers and activations: run by hand, no hooks
    # (decided before any hook is added: the chain's proof requires a model without hooks)
    loss_fn = wrapper.objective.per_example_loss
    hand_run = fisher == "empirical" and not owners and chain_layers(wrapper, loss_fn) is not None
    handles = [] if hand_run else hook_layers()
    loss_name = builtin_loss_name(wrapper) if fisher == "true" else None
    if fisher == "true" and loss_name is None:
        raise InputError("fisher='true' needs a built-in loss; use fisher='empirical'")
    try:
        params = {n: p.detach().clone().requires_grad_(True) for n, p in wrapper.params.items()}
        model_fn = wrapper.functional_model(params)
        bar = progress_iter(
            data.chunks(chunk_size),
            total=data.num_chunks(chunk_size),
            desc=desc,
            enabled=progress,
        )
        for _, raw in bar:
            keeping = keep is not None and not keep.dropped
            kept: list[ChunkRecord] = []
            batch = wrapper.prepare(raw)
            b = batch_size(batch)
            by_hand = _chain_record(wrapper, layers, batch) if hand_run else None
            if hand_run and by_hand is None:  # not for this chunk: the hooked passes from here
                hand_run, handles = False, hook_layers()
            if by_hand is not None:
                visit(by_hand)
                if keeping:
                    assert keep is not None
                    total = data.num_chunks(chunk_size)
                    size = records_nbytes([by_hand])
                    if keep.admits(size, total):
                        keep.add([by_hand], size, total)
                continue
            for calls in (*records.values(), *owner_calls.values()):
                calls.clear()
            empirical: Draw | None = None
            with torch.enable_grad():
                active[0] = True
                try:
                    if loss_name is None:
                        loss_fn = wrapper.objective.per_example_loss
                        empirical = (loss_fn(model_fn, batch).sum(), batch, loss_fn)
                        num_draws, make_draw = 1, None
                    else:
                        model_inputs, _ = _split_supervised(batch)
                        outputs = model_fn(model_inputs)
                        num_draws, make_draw = label_draws(
                            loss_name, mc_samples, model_inputs, outputs, generator
                        )
                finally:
                    active[0] = False
                _check_calls(layers, records, b)
                outs = [o for ly in layers for _, o in records[ly.name]]
                owners_read = bool(owners) and all(
                    _one_call(owner_calls[p], module, b) for p, module in owners.items()
                )
                if owners_read:
                    outs += [owner_calls[p][0][1] for p in owners]
                inputs = {ly.name: [a for a, _ in records[ly.name]] for ly in layers}
                acts = _Activations(layers, inputs)
                exact = loss_name is not None and mc_samples == "exact"
                weight = 1.0 if exact else 1.0 / num_draws
                # sampled labels: the next pass draws its own, made here from keep.generator
                redraw = keeping and make_draw is not None and not exact
                chunk = _Backward(
                    layers, records, outs, owner_calls if owners_read else None, b, inputs, acts,
                    weight,
                )  # fmt: skip

                for r in range(num_draws):
                    draw = make_draw(r) if make_draw is not None else empirical
                    assert draw is not None
                    rec = chunk.record(draw, r, retain=r < num_draws - 1 or redraw)
                    visit(rec)
                    if keeping:
                        kept.append(rec)
                if keeping:
                    assert keep is not None
                    total = data.num_chunks(chunk_size)
                    size = records_nbytes(kept)  # the next pass's draws: the same shapes
                    if keep.admits(size, total):
                        if redraw:
                            assert loss_name is not None
                            assert keep.generator is not None
                            _, next_draw = label_draws(
                                loss_name, mc_samples, model_inputs, outputs, keep.generator
                            )
                            kept = [
                                chunk.record(next_draw(r), r, retain=r < num_draws - 1)
                                for r in range(num_draws)
                            ]
                        keep.add(kept, size, total)
    finally:
        for handle in handles:
            handle.remove()
        for calls in (*records.values(), *owner_calls.values()):
            calls.clear()


def _chain_record(
    wrapper: ModelWrapper, layers: list[LayerBlock], batch: Batch
) -> ChunkRecord | None:
    """The chunk's record for the data's labels from one hand-run pass of the chain
    (:func:`~infl.sequential_chain.chain_factors`: the same inputs and output gradients as the
    hooked forward and backward passes), or ``None`` where the model is not such a chain or
    the layers are not all of it."""
    loss_fn = wrapper.objective.per_example_loss
    factors = chain_factors(wrapper, loss_fn, batch)
    if factors is None:
        return None
    by_prefix = {"" if ly.name == "<root>" else ly.name: ly for ly in layers}
    if set(by_prefix) != set(factors):
        return None
    inputs = {ly.name: [factors[prefix][0]] for prefix, ly in by_prefix.items()}
    grads = {ly.name: ly.output_grads(factors[prefix][1]) for prefix, ly in by_prefix.items()}
    if not all(all_finite(g) for g in grads.values()):
        # a built-in loss is finite where its gradient in the outputs is
        raise NonFiniteError(_NOT_FINITE)
    size = next(iter(grads.values())).shape[0]
    acts = _Activations(layers, inputs)
    return ChunkRecord(size, inputs, acts, grads, batch, 1.0, 0, loss_fn)


_NOT_FINITE = (
    "the training loss of a chunk is not finite at the trained parameters; check the inputs "
    "for NaN/inf"
)


@dataclass
class _Backward:
    """One chunk after its forward pass: the backward pass of a draw gives its record.

    ``owner_calls``: the diagonal blocks' owners' calls when they were read (their output
    gradients follow the layers' in ``outs``), else ``None``."""

    layers: list[LayerBlock]
    calls: dict[str, list[Call]]
    outs: list[torch.Tensor]
    owner_calls: dict[str, list[Call]] | None
    size: int
    inputs: dict[str, list[torch.Tensor]]
    acts: Mapping[str, torch.Tensor]
    weight: float

    def record(self, draw: Draw, r: int, retain: bool) -> ChunkRecord:
        """Draw ``r``'s backward pass (``retain``: keep the graph for another)."""
        loss, loss_batch, loss_fn = draw
        if not torch.isfinite(loss):
            raise NonFiniteError(_NOT_FINITE)
        out_grads = torch.autograd.grad(loss, self.outs, retain_graph=retain, allow_unused=True)
        pos = 0
        grads = {}
        for ly in self.layers:
            per_call = []
            for _, o in self.calls[ly.name]:
                g = out_grads[pos]
                pos += 1
                per_call.append(ly.output_grads(torch.zeros_like(o) if g is None else g))
            grads[ly.name] = _joined(per_call).detach()
        owner_io = None
        if self.owner_calls is not None:
            owner_io = {
                p: (calls[0][0], _or_zeros(g, calls[0][1]))
                for (p, calls), g in zip(self.owner_calls.items(), out_grads[pos:], strict=True)
            }
        return ChunkRecord(
            self.size, self.inputs, self.acts, grads, loss_batch, self.weight, r, loss_fn,
            owners=owner_io,
        )  # fmt: skip


def _one_call(calls: list[Call], module: nn.Module, b: int) -> bool:
    """Whether an owner of diagonal blocks was called once, on the chunk's ``b`` examples,
    with a tensor output (what :meth:`LayerPerExampleGradients.from_recorded` reads)."""
    return (
        len(calls) == 1
        and isinstance(calls[0][0], torch.Tensor)
        and isinstance(calls[0][1], torch.Tensor)
        and LayerPerExampleGradients.accepts(module, calls[0][0], b)
    )


def _or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad.detach()


def _joined(per_call: list[torch.Tensor]) -> torch.Tensor:
    """The calls' ``[b, T_c, d]`` tensors along the locations; one call's is kept as it is
    (a view: no copy)."""
    return per_call[0] if len(per_call) == 1 else torch.cat(per_call, dim=1)


def _check_calls(
    layers: list[LayerBlock],
    records: dict[str, list[Call]],
    b: int,
) -> None:
    for ly in layers:
        calls = records[ly.name]
        if not calls:
            raise InputError(
                f"layer {ly.name!r} ({type(ly.module).__name__}) has trainable parameters but "
                "was not called in the forward pass (its parameters are used some other way, "
                "e.g. F.linear(x, layer.weight)); K-FAC needs the layer itself to be called. "
                "Freeze its parameters or call the layer as a module."
            )
        for a, _ in calls:
            if not isinstance(a, torch.Tensor):
                raise InputError(
                    f"layer {ly.name!r} was called without a positional tensor input; K-FAC "
                    "reads each layer's input from its first positional argument"
                )
            if a.dim() < 2 or a.shape[0] != b:
                raise InputError(
                    f"layer {ly.name!r} was called on an input of shape {tuple(a.shape)}, "
                    f"not on the chunk's {b} examples along dim 0; K-FAC needs every layer "
                    "to see the batch dimension first"
                )
