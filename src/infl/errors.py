"""Exceptions and warnings raised by infl.

Every error derives from :class:`InflError` and its message says what was found and what to
try. Subclasses also derive from the matching built-in (``ValueError``, ``FloatingPointError``,
…) so that generic ``except`` clauses keep working.
"""

from __future__ import annotations


class InflError(Exception):
    """Base class of every error raised by infl."""


class InputError(InflError, ValueError):
    """Bad input: wrong shapes, empty data, out-of-range indices, invalid hyperparameters."""


class ModelStateError(InflError, RuntimeError):
    """The model cannot be used as given (train-mode dropout, NaN parameters, nothing trainable)."""


class NonFiniteError(InflError, FloatingPointError):
    """A NaN or infinity appeared in a gradient, Hessian-vector product or solver iterate."""


class NotPositiveDefiniteError(InflError, ArithmeticError):
    """The (damped) Hessian is not positive definite where the method needs it to be."""


class SolverDivergedError(InflError, ArithmeticError):
    """An iterative inverse-HVP solver diverged."""


class StoreMismatchError(InflError):
    """A results store was written by a different configuration than the current call."""


class InflWarning(UserWarning):
    """Warnings raised by infl (for example, a solver that did not reach its tolerance)."""


__all__ = [
    "InflError",
    "InflWarning",
    "InputError",
    "ModelStateError",
    "NonFiniteError",
    "NotPositiveDefiniteError",
    "SolverDivergedError",
    "StoreMismatchError",
]
