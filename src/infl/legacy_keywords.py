"""One rule for settings objects that replaced keyword arguments (one release of overlap).

``retrain_ground_truth(..., config=RetrainConfig(...))`` and ``compare_rankings(...,
config=CorrectionConfig(...))`` used to take their settings as separate keywords. For one
release those keywords still work, with a :class:`DeprecationWarning`; passing both is an error.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, TypeVar

from infl.errors import InputError

C = TypeVar("C")


def config_from_keywords(
    cls: type[C],
    config: C | None,
    keywords: dict[str, Any],
    caller: str,
    *,
    kind: str,
    public_name: str,
) -> C:
    """``config``, or (deprecated) a ``cls`` built from the settings passed as ``keywords``.

    Parameters
    ----------
    cls
        The frozen settings dataclass (``RetrainConfig``, ``CorrectionConfig``).
    config
        What the caller passed as ``config=`` (``None``: the defaults).
    keywords
        The settings passed the old way; an unknown name is a ``TypeError``, as Python would
        raise for a function that never took it.
    caller
        The public function's name, for the messages.
    kind
        What the keywords are called in the messages ("protocol", "settings").
    public_name
        How the user spells ``cls`` (``infl.RetrainConfig``), for the messages.
    """
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(keywords) - fields)
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    if config is not None and not isinstance(config, cls):
        raise InputError(f"config must be an {public_name}, got {type(config).__name__}")
    if not keywords:
        return cls() if config is None else config
    names = ", ".join(sorted(keywords))
    if config is not None:
        raise InputError(
            f"{caller}() got config= and the {kind} keywords {names}; put them into the "
            f"config (config={public_name}(...)) or use dataclasses.replace(config, ...)"
        )
    warnings.warn(
        f"passing the {kind} {names} to {caller}() as keywords is deprecated and will be "
        f"removed in the next release; pass config={public_name}(...) instead",
        DeprecationWarning,
        stacklevel=4,
    )
    return cls(**keywords)
