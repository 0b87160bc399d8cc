"""The calculator's default chunk size: as many examples as keep each activation small.

``InfluenceCalculator(chunk_size="auto")`` (the default) runs the model on ``chunk_size``
examples at a time in every pass. On a CPU, a larger chunk is not always faster. PyTorch takes
each tensor's memory from the C library's allocator, and glibc serves a block of 32 MiB or more
(its largest dynamic ``mmap`` threshold on 64-bit systems) by a fresh ``mmap`` that it unmaps
again on free. Every activation of that size, in every chunk and pass, then lands on fresh
pages that the kernel must fault in and zero; smaller blocks are reused from the heap, already
mapped. On ``small_resnet(width=64)`` (a ``[64, 32, 32]`` float32 activation, 256 KiB per
example) with ``n = 1024``, one thread, K-FAC took 59.7 s at 256 examples per chunk (13.4 s of
it in the kernel, 2.5 GB peak) and 48.6 s at 64 (4.0 s, 1.1 GB); EK-FAC 100.2 s against
81.4 s (``benchmarks/README.md``).

So on a CPU the chunk is the largest power of two, at most :data:`MAX_AUTO_CHUNK`, whose
largest module output stays within :data:`AUTO_CHUNK_BYTES` (half of glibc's threshold: a
pass also makes temporaries a few times an activation's size, such as a strided
convolution's patches). The sizes come from the forward pass that
:meth:`ModelWrapper.check_data <infl.model.ModelWrapper.check_data>` makes anyway
(:class:`ActivationProbe`). Off the CPU (CUDA's caching allocator reuses its blocks) and for
models whose activations are small, the chunk is :data:`MAX_AUTO_CHUNK`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from infl.errors import InputError

__all__ = [
    "AUTO_CHUNK_BYTES",
    "MAX_AUTO_CHUNK",
    "ActivationProbe",
    "ChunkSize",
    "auto_chunk_size",
    "check_chunk_size",
    "resolve_chunk_size",
]

ChunkSize = int | Literal["auto"]

AUTO_CHUNK_BYTES = 16 << 20
"""On a CPU, ``chunk_size="auto"`` keeps the largest module output of a chunk within this many
bytes (16 MiB)."""

MAX_AUTO_CHUNK = 256
"""The largest chunk ``chunk_size="auto"`` picks (and its pick off the CPU)."""


def check_chunk_size(chunk_size: Any) -> None:
    """Refuse a ``chunk_size`` that is neither a positive integer nor ``"auto"``.

    Raises
    ------
    InputError
        Saying what to pass.
    """
    if isinstance(chunk_size, str) and chunk_size == "auto":
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(
            f"chunk_size must be a positive integer or 'auto' (as many examples as keep each "
            f"activation within {AUTO_CHUNK_BYTES >> 20} MiB on a CPU, at most "
            f"{MAX_AUTO_CHUNK}), got {chunk_size!r}"
        )


def auto_chunk_size(activation_bytes: int | None, device: torch.device) -> int:
    """``chunk_size="auto"``: examples per chunk for a model whose largest module output takes
    ``activation_bytes`` per example (``None``: not measured).

    On a CPU, the largest power of two ``b <= MAX_AUTO_CHUNK`` with ``b * activation_bytes <=
    AUTO_CHUNK_BYTES`` (at least 1); elsewhere, or unmeasured, :data:`MAX_AUTO_CHUNK`.
    """
    if device.type != "cpu" or not activation_bytes:
        return MAX_AUTO_CHUNK
    fits = AUTO_CHUNK_BYTES // activation_bytes
    if fits >= MAX_AUTO_CHUNK:
        return MAX_AUTO_CHUNK
    return 1 << (max(fits, 1).bit_length() - 1)


def resolve_chunk_size(
    chunk_size: ChunkSize, activation_bytes: int | None, device: torch.device
) -> int:
    """``chunk_size`` as a number: :func:`auto_chunk_size` for ``"auto"``, else itself."""
    return auto_chunk_size(activation_bytes, device) if chunk_size == "auto" else int(chunk_size)


class ActivationProbe:
    """The largest tensor any submodule of a model outputs, per example, over the calls made
    while :meth:`watching`.

    Attributes
    ----------
    largest : int
        Bytes of the largest output tensor seen (of any tensor nested in an output that is
        a tuple, list or dict), divided by the examples of the call; 0 before any call.
    """

    def __init__(self) -> None:
        self.largest = 0

    @contextmanager
    def watching(self, model: nn.Module, examples: int) -> Iterator[ActivationProbe]:
        """Forward hooks on every submodule of ``model`` (the model itself included) for the
        duration, each call's outputs counted as the work of ``examples`` examples."""
        per = max(examples, 1)

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            for t in _tensors(output):
                self.largest = max(self.largest, t.numel() * t.element_size() // per)

        handles = [m.register_forward_hook(hook) for m in model.modules()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def _tensors(output: Any) -> Iterator[torch.Tensor]:
    """The tensors nested in a module's output (tuples, lists, mappings), read in place: no
    container is rebuilt, so any output type a forward hook can see is accepted."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, Mapping):
        for item in output.values():
            yield from _tensors(item)
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)
