"""Adapters that run other influence libraries on infl's benchmark problems.

Each module exposes ``NAME``, ``METHODS``, ``available() -> str | None`` (why it cannot run),
``supports(problem, setting) -> str | None`` and ``scores(problem, setting) -> Tensor [m, n]``
in infl's sign convention. Peers are never infl dependencies: install them in a separate
virtualenv (see ``benchmarks/README.md``, "Side by side with peers").
"""

from __future__ import annotations

from types import ModuleType

from . import captum_peer, dattri_peer, kronfluence_peer, pydvl_peer

ALL: tuple[ModuleType, ...] = (pydvl_peer, captum_peer, dattri_peer, kronfluence_peer)
