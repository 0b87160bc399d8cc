"""A module evaluated at other tensors than its own parameters, with little per-call cost.

:func:`torch.func.functional_call` evaluates any module at given tensors. Its generic path
works out the tied names, walks the module tree twice and goes through ``nn.Module``'s
``setattr`` and ``delattr`` for every tensor, on every call: 56 µs per call on the Iris MLP
(4-5-3), whose forward pass itself takes 30 µs. :class:`ModuleCall` finds once where each
named tensor lives (an entry of the ``_parameters`` or ``_buffers`` dict of its submodule,
and every alias of a tied tensor), and on each call writes the given tensors into those
entries, runs the module and puts its own tensors back: 18 µs for the same call. (Plain
tensors in place of ``nn.Parameter`` objects are also what ``functional_call`` leaves the
module holding while it runs.)

Modules whose attribute access is not ``nn.Module``'s get ``functional_call`` itself: a class
that overrides ``__setattr__``, ``__getattr__`` or ``__delattr__`` (``nn.RNNBase`` keeps its
``_flat_weights`` in step with its weights there, ``torch.compile``'s wrapper forwards
attributes), a parametrized module (``torch.nn.utils.parametrize``), names that are not all
found, or two given names for one tied tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

__all__ = ["ModuleCall"]

Slot = tuple[dict[str, Any], str]
"""Where one tensor lives: a submodule's ``_parameters`` or ``_buffers`` dict and the key."""


class ModuleCall:
    """``call(tensors, args, kwargs)`` is ``module(*args, **kwargs)`` with each of its
    parameters and buffers named in ``names`` replaced by ``tensors[name]`` for that call
    (tied aliases of a named tensor too), as :func:`torch.func.functional_call` computes it.

    Parameters
    ----------
    module
        The module; never changed outside a call, and restored when a call raises.
    names
        The names (as ``module.named_parameters()`` / ``named_buffers()`` give them) that
        every call supplies; a call's ``tensors`` must hold all of them.

    Notes
    -----
    Like ``functional_call``, a call swaps tensors into the module while it runs, so one
    module must not be called from two threads at once. :attr:`direct` says whether calls
    take the cheap path (``False``: ``functional_call``, for the modules listed in the
    module's docstring).

    Examples
    --------
    >>> lin = nn.Linear(2, 1)
    >>> call = ModuleCall(lin, ["weight", "bias"])
    >>> zeros = {"weight": torch.zeros(1, 2), "bias": torch.ones(1)}
    >>> call(zeros, (torch.ones(3, 2),)).flatten().tolist()
    [1.0, 1.0, 1.0]
    """

    def __init__(self, module: nn.Module, names: Iterable[str]) -> None:
        self.module = module
        self.names = tuple(names)
        self._slots = _locate(module, self.names)

    @property
    def direct(self) -> bool:
        """Whether calls write into the module's own tensor dicts (else ``functional_call``)."""
        return self._slots is not None

    def __call__(
        self,
        tensors: Mapping[str, torch.Tensor],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        slots = self._slots
        if slots is None:
            own = _entries(self.module)
            try:
                return functional_call(self.module, dict(tensors), args, kwargs)
            finally:
                _restore(own)
        saved: list[Any] = []
        try:
            for (table, key), name in slots:
                saved.append(table[key])
                table[key] = tensors[name]
            return self.module(*args, **(kwargs or {}))
        finally:
            swapped = slots[: len(saved)]
            for ((table, key), _), own in zip(reversed(swapped), reversed(saved), strict=True):
                table[key] = own

    def __getstate__(self) -> dict[str, Any]:
        # the slots are the module's own dicts: found again on the unpickled module
        return {"module": self.module, "names": self.names}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.module = state["module"]
        self.names = state["names"]
        self._slots = _locate(self.module, self.names)


Entry = tuple[nn.Module, str, str, Any]
"""A submodule, ``"_parameters"`` or ``"_buffers"``, the key, and the tensor held there."""


def _entries(module: nn.Module) -> list[Entry]:
    return [
        (owner, kind, key, tensor)
        for owner in module.modules()
        for kind in ("_parameters", "_buffers")
        for key, tensor in getattr(owner, kind).items()
    ]


def _restore(entries: list[Entry]) -> None:
    """Put back what ``functional_call`` leaves behind: an entry of a submodule registered
    under two names (swapped twice, restored in the wrong order), and the state a module
    keeps in its own ``__setattr__`` (``nn.RNNBase``'s ``_flat_weights``, left pointing at
    the swapped tensors until its next forward pass): parameters of such modules are set
    again through it."""
    for owner, kind, key, tensor in entries:
        table = getattr(owner, kind)
        if key in table and table[key] is tensor and _plain_attributes(owner):
            continue
        owner.__dict__.pop(key, None)  # a plain attribute the swap left behind
        if kind == "_parameters" and tensor is not None:
            setattr(owner, key, tensor)
        else:
            table[key] = tensor


def _plain_attributes(module: nn.Module) -> bool:
    cls = type(module)
    return (
        cls.__setattr__ is nn.Module.__setattr__
        and cls.__getattr__ is nn.Module.__getattr__
        and cls.__delattr__ is nn.Module.__delattr__
        and not parametrize.is_parametrized(module)
    )


def _locate(module: nn.Module, names: tuple[str, ...]) -> list[tuple[Slot, str]] | None:
    """Each entry to overwrite and the given name that supplies it; ``None`` when the module
    needs ``functional_call`` (see the module docstring)."""
    if not all(_plain_attributes(m) for m in module.modules()):
        return None
    wanted = set(names)
    aliases: dict[int, list[tuple[str, Slot]]] = {}
    for owner_path, owner in module.named_modules(remove_duplicate=False):
        prefix = f"{owner_path}." if owner_path else ""
        for table in (owner._parameters, owner._buffers):
            for key, tensor in table.items():
                if tensor is not None:
                    aliases.setdefault(id(tensor), []).append((prefix + key, (table, key)))
    slots: list[tuple[Slot, str]] = []
    seen: set[tuple[int, str]] = set()
    found: set[str] = set()
    for group in aliases.values():
        given = {name for name, _ in group if name in wanted}
        if len(given) > 1:
            return None
        if not given:
            continue
        (name,) = given
        found.add(name)
        for _, (table, key) in group:
            if (id(table), key) not in seen:  # a module registered twice has one dict
                seen.add((id(table), key))
                slots.append(((table, key), name))
    return slots if found == wanted else None
