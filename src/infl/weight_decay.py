"""Weight decay that differs between parameters: groups, the name-matching rule, messages.

:class:`WeightDecayGroups` gives each named parameter tensor its own :math:`\\lambda_j`
(``default``, ``no_decay`` patterns, exact-name ``overrides``); :func:`name_matches` is the
one pattern rule. :class:`~infl.objective.Objective` normalises its ``weight_decay`` to a
number or a :class:`WeightDecayGroups`.

Every name here is also importable from :mod:`infl.objective`, and :class:`WeightDecayGroups`
keeps ``infl.objective`` as its ``__module__``: pickles and store fingerprints name the class
by that path, so results stored before this module existed stay valid.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from infl.errors import InputError


def _check_decay(value: Any, what: str) -> float:
    try:
        if isinstance(value, (bool, str)):
            raise TypeError
        wd = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number >= 0, got {value!r}") from None
    if not math.isfinite(wd) or wd < 0:
        raise InputError(f"{what} must be a finite number >= 0, got {value!r}")
    return wd


_GLOB_CHARS = frozenset("*?[")


def name_matches(pattern: str, name: str) -> bool:
    """Whether a ``no_decay`` pattern matches a parameter name (the one rule infl uses).

    A pattern with a glob character (``*``, ``?``, ``[``) matches when
    ``fnmatch.fnmatchcase(name, pattern)`` does (the whole name, case-sensitive). Any other
    pattern matches when it is a run of whole dot-separated components of the name:
    ``"bias"`` matches ``"fc.bias"`` and ``"fc.bias_ih"`` does not; ``"norm"`` matches
    ``"blocks.0.norm.weight"`` but not ``"blocks.0.layer_norm.weight"`` (write ``"*norm*"``
    for that); ``"LayerNorm.weight"`` matches ``"encoder.LayerNorm.weight"``.

    Examples
    --------
    >>> name_matches("bias", "layers.0.bias"), name_matches("norm", "ln_norm.weight")
    (True, False)
    >>> name_matches("*norm*", "ln_norm.weight")
    True
    """
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return f".{pattern}." in f".{name}."


@dataclass(frozen=True)
class WeightDecayGroups:
    """Weight decay that differs between parameters (picklable, hashable, stable repr).

    Parameter :math:`\\theta_j` (a named tensor) gets the coefficient :math:`\\lambda_j`:

    1. ``overrides[name]`` when its *full* name is a key of ``overrides``;
    2. else ``0`` when a ``no_decay`` pattern matches the name (:func:`name_matches`);
    3. else ``default``.

    Build it from a mapping through :class:`Objective` (``weight_decay={"default": 1e-2,
    "no_decay": ["bias", "norm"]}``) or from an optimizer (:meth:`Objective.from_optimizer`).

    Parameters
    ----------
    default
        :math:`\\lambda` of every parameter that no rule below names.
    no_decay
        Patterns of parameters without weight decay (biases, normalisation layers).
    overrides
        ``((full parameter name, λ), ...)``, sorted by name: exact names, no patterns.
    """

    # the path pickles and store fingerprints name (stores made before infl.weight_decay stay
    # valid)
    __module__ = "infl.objective"

    default: float = 0.0
    no_decay: tuple[str, ...] = ()
    overrides: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any]) -> WeightDecayGroups:
        """Validate ``{"default": λ, "no_decay": [patterns], "overrides": {name: λ}}``.

        Raises
        ------
        InputError
            Unknown keys, a missing ``default``, negative or non-finite values, patterns that
            are not non-empty strings.
        """
        unknown = sorted(set(spec) - {"default", "no_decay", "overrides"})
        if unknown:
            raise InputError(
                f"weight_decay mapping has unknown key(s) {unknown}; the keys are 'default' "
                "(a number), 'no_decay' (a list of name patterns) and 'overrides' ({full "
                "parameter name: number})"
            )
        if "default" not in spec:
            raise InputError(
                "weight_decay mapping needs 'default' (the weight decay of every parameter "
                "no other rule names), e.g. {'default': 1e-2, 'no_decay': ['bias']}"
            )
        default = _check_decay(spec["default"], "weight_decay['default']")
        raw = spec.get("no_decay", ())
        if isinstance(raw, str) or not isinstance(raw, (list, tuple, set, frozenset)):
            raise InputError(
                "weight_decay['no_decay'] must be a list of name patterns, e.g. ['bias', "
                f"'norm'], got {raw!r}"
            )
        for pat in raw:
            if not isinstance(pat, str) or not pat:
                raise InputError(
                    f"weight_decay['no_decay'] patterns must be non-empty strings, got {pat!r}"
                )
        overrides = spec.get("overrides", {})
        if not isinstance(overrides, Mapping):
            raise InputError(
                "weight_decay['overrides'] must be a mapping {full parameter name: number}, "
                f"got {type(overrides).__name__}"
            )
        pairs = []
        for name, value in overrides.items():
            if not isinstance(name, str) or not name:
                raise InputError(f"weight_decay['overrides'] keys must be names, got {name!r}")
            pairs.append((name, _check_decay(value, f"weight_decay['overrides'][{name!r}]")))
        return cls(default, tuple(sorted(set(raw))), tuple(sorted(pairs)))

    def values(self, names: Sequence[str]) -> list[float]:
        """:math:`\\lambda_j` for each of ``names`` (the trainable parameters, in order).

        Raises
        ------
        InputError
            A ``no_decay`` pattern or an ``overrides`` name that matches none of ``names``
            (a typo would otherwise silently decay what it meant to exempt).
        """
        overrides = dict(self.overrides)
        missing = [n for n in overrides if n not in names]
        unmatched = [pat for pat in self.no_decay if not any(name_matches(pat, n) for n in names)]
        if missing or unmatched:
            shown = ", ".join(repr(n) for n in list(names)[:12])
            more = f" (and {len(names) - 12} more)" if len(names) > 12 else ""
            what = []
            if unmatched:
                what.append(f"no_decay pattern(s) {unmatched} match no trainable parameter")
            if missing:
                what.append(f"overrides name(s) {missing} are not trainable parameters")
            raise InputError(
                f"weight_decay: {'; '.join(what)}. The trainable parameters are {shown}{more}. "
                "A pattern matches whole dot-separated parts of a name ('bias' matches "
                "'fc.bias') or, with * ? [, the whole name as a glob ('*norm*'); overrides "
                "take full names. Fix or remove the pattern."
            )
        out = []
        for n in names:
            if n in overrides:
                out.append(overrides[n])
            elif any(name_matches(pat, n) for pat in self.no_decay):
                out.append(0.0)
            else:
                out.append(self.default)
        return out

    def settings(self) -> dict[str, Any]:
        """A JSON-serialisable record (stores key their results by it)."""
        return {
            "default": self.default,
            "no_decay": list(self.no_decay),
            "overrides": dict(self.overrides),
        }


def describe_weight_decay(weight_decay: float | WeightDecayGroups) -> str:
    """A short text for messages: ``0.01`` or ``{'default': 0.01, 'no_decay': ['bias']}``."""
    if not isinstance(weight_decay, WeightDecayGroups):
        return f"{float(weight_decay):g}"
    parts = [f"'default': {weight_decay.default:g}"]
    if weight_decay.no_decay:
        parts.append(f"'no_decay': {list(weight_decay.no_decay)}")
    if weight_decay.overrides:
        shown = ", ".join(f"{n!r}: {v:g}" for n, v in weight_decay.overrides[:6])
        more = ", ..." if len(weight_decay.overrides) > 6 else ""
        parts.append(f"'overrides': {{{shown}{more}}}")
    return "{" + ", ".join(parts) + "}"


WeightDecay = float | WeightDecayGroups | Mapping[str, Any]
"""What ``Objective(weight_decay=...)`` accepts: one λ, a mapping, or :class:`WeightDecayGroups`."""

_COUPLED_OPTIMIZERS = (
    "SGD",
    "Adam",
    "Adamax",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "ASGD",
    "Rprop",
    "LBFGS",
    "SparseAdam",
)
