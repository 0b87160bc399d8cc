"""Content fingerprints of settings: what a results store is keyed by.

A store of results (retrains, scores, gradients) may be reused only when every setting that
changes the results is the same. Naming a callable is not enough: ``functools.partial(loss,
temperature=5)`` and ``functools.partial(loss, temperature=1)`` have the same name and give
different results. :func:`fingerprint` therefore hashes a value by its *content*:

* plain values (``None``, numbers, strings, bytes), containers (recursively), enums, dtypes,
  devices; tensors and NumPy arrays by dtype, shape and bytes;
* functions by module and qualified name, their bytecode and constants (nested code objects
  recursively), default arguments, closure cell values and the module-level values their code
  reads (other functions of your code recursively, modules and classes by name, plain values
  by content). Functions of installed packages and of infl itself are identified by name and
  the package's version;
* ``functools.partial`` by its function and bound arguments (recursively); bound methods by
  their function and ``__self__``; dataclass instances by type and fields; ``torch.nn.Module``
  instances by type, structure (``repr``) and ``state_dict``; other objects by type, their
  ``__dict__``/``__slots__`` state and, when callable, their ``__call__``.

A value with no stable content (an open file, a lock, a generator, a C object without state,
...) makes the fingerprint *unreliable*: :attr:`Fingerprint.problems` says which part and why.
A store may still be written with such a fingerprint, but must not be resumed from (its
results could have been made with other settings); :func:`refuse_unreliable` raises the
:class:`~infl.errors.StoreMismatchError` that says so and what to do.

The digest is stable across processes and runs on the same Python and package versions (the
bytecode of a function is part of it, so a new Python version gives new digests: the store is
then refused, never misread).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import importlib.metadata
import os
import sys
import sysconfig
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from infl.errors import StoreMismatchError
from infl.store import SETTINGS_FILE

__all__ = ["Fingerprint", "fingerprint", "refuse_unreliable"]

_LABEL_LIMIT = 120
_PLAIN = (type(None), bool, int, float, complex, str, bytes)
_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: the class was defined by a class statement


@dataclass(frozen=True)
class Fingerprint:
    """The content fingerprint of a value.

    Attributes
    ----------
    digest : str
        24 hex digits of a SHA-256 over the value's content.
    label : str
        A short human-readable description (``module.qualname``, ``partial(f, t=5)``, ...),
        for messages; two values with the same label may differ in ``digest``.
    problems : tuple of str
        Why the digest does not capture the whole value (empty when it does).
    """

    digest: str
    label: str
    problems: tuple[str, ...] = ()

    @property
    def reliable(self) -> bool:
        """Whether the digest captures everything that defines the value."""
        return not self.problems

    def key(self) -> str:
        """``"<label>@<digest>"``, the string a store's settings record holds."""
        return f"{self.label}@{self.digest}"


def fingerprint(value: Any, name: str = "value") -> Fingerprint:
    """The content fingerprint of ``value`` (see the module docstring for what is hashed).

    Parameters
    ----------
    value
        Anything: a callable (function, ``functools.partial``, bound method, callable
        object), a dataclass, a tensor, a container of those, ...
    name
        What ``value`` is called in :attr:`Fingerprint.problems` (``"loss"``, ...).

    Returns
    -------
    Fingerprint
        Its digest, a label, and the problems that make it unreliable (if any).

    Examples
    --------
    >>> import functools
    >>> def loss(x, temperature=1.0):
    ...     return x / temperature
    >>> a = fingerprint(functools.partial(loss, temperature=5.0))
    >>> b = fingerprint(functools.partial(loss, temperature=1.0))
    >>> a.digest != b.digest, a.reliable
    (True, True)
    """
    walker = _Walker()
    walker.visit(value, name)
    return Fingerprint(walker.hash.hexdigest()[:24], _label(value), tuple(walker.problems))


def refuse_unreliable(
    root: str | os.PathLike[str], fingerprints: Mapping[str, Fingerprint]
) -> None:
    """Refuse to resume from an existing store when a setting cannot be fingerprinted.

    Parameters
    ----------
    root
        The store directory. Nothing is refused when it holds no settings record yet (a new
        store may be written; it just cannot be resumed later).
    fingerprints
        The settings' fingerprints, by setting name (``"loss"``, ``"measurement"``, ...).

    Raises
    ------
    StoreMismatchError
        ``root`` already holds results and some fingerprint is unreliable: the message names
        the setting, the part that could not be fingerprinted and why, and what to do.
    """
    if not os.path.exists(os.path.join(root, SETTINGS_FILE)):
        return
    for name, fp in fingerprints.items():
        if fp.problems:
            why = "; ".join(fp.problems[:3])
            more = f" (and {len(fp.problems) - 3} more)" if len(fp.problems) > 3 else ""
            raise StoreMismatchError(
                f"cannot resume from the store {os.fspath(root)}: the {name} ({fp.label}) cannot "
                f"be fingerprinted reliably: {why}{more}, so the stored results may have been "
                f"made with a different {name}. Pass a named function, a functools.partial of "
                "plain values (numbers, strings, tensors) or a dataclass instead, or start a "
                "new store directory"
            )


# ---------------------------------------------------------------------------------------------
# the walk
# ---------------------------------------------------------------------------------------------
def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots |= {os.path.join(p, "") for p in sys.path if "site-packages" in p}
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots if r)


_LIBRARY_ROOTS = _library_roots()


def _package_version(module: str | None) -> str:
    top = (module or "").split(".")[0]
    if not top or top in sys.stdlib_module_names or top == "builtins":
        return f"python{sys.version_info.major}.{sys.version_info.minor}"
    try:
        return importlib.metadata.version(top)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _is_library(fn: types.FunctionType) -> bool:
    """Functions of infl, the standard library and installed packages: identified by name."""
    module = fn.__module__ or ""
    if module == "infl" or module.startswith("infl."):
        return True
    filename = os.path.realpath(fn.__code__.co_filename)
    return filename.startswith(_LIBRARY_ROOTS)


class _Walker:
    """Feeds a value's content into one SHA-256, collecting what it cannot capture."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.problems: list[str] = []
        self.seen: dict[int, int] = {}
        self.keep: list[Any] = []  # keeps visited objects alive, so ids stay unique

    def feed(self, *parts: object) -> None:
        for part in parts:
            data = part if isinstance(part, bytes) else str(part).encode()
            self.hash.update(len(data).to_bytes(8, "little"))
            self.hash.update(data)

    def problem(self, where: str, why: str) -> None:
        self.problems.append(f"{where} is {why}")

    def visit(self, value: Any, where: str) -> None:
        if isinstance(value, _PLAIN):
            self.feed(type(value).__name__, repr(value))
            return
        if id(value) in self.seen:  # a cycle or a shared object: refer back to it
            self.feed("ref", self.seen[id(value)])
            return
        self.seen[id(value)] = len(self.seen)
        self.keep.append(value)
        self._visit(value, where)

    def _visit(self, value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            self.tensor(value)
        elif isinstance(value, np.ndarray):
            self.feed("ndarray", value.dtype.str, value.shape)
            if value.dtype.hasobject:
                self.problem(where, "a NumPy array of Python objects")
            else:
                self.feed(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, np.generic):
            self.feed("npscalar", value.dtype.str, value.tobytes())
        elif isinstance(value, (torch.dtype, torch.device, torch.Size)):
            self.feed(type(value).__name__, repr(value))
        elif isinstance(value, enum.Enum):
            self.feed("enum", _qualified(type(value)), value.name)
        elif isinstance(value, (list, tuple)):
            self.feed(type(value).__name__, len(value))
            for i, item in enumerate(value):
                self.visit(item, f"{where}[{i}]")
        elif isinstance(value, (set, frozenset)):
            self.feed(type(value).__name__, len(value))
            for digest in sorted(self.sub(item, f"{where} item") for item in value):
                self.feed(digest)
        elif isinstance(value, Mapping):
            self.mapping(value, where)
        elif isinstance(value, functools.partial):
            self.feed("partial")
            self.visit(value.func, f"{where}.func")
            self.visit(value.args, f"{where}.args")
            self.mapping(value.keywords, f"{where}.keywords")
        elif isinstance(value, types.MethodType):
            self.feed("method")
            self.visit(value.__func__, where)
            self.visit(value.__self__, f"{where}.__self__")
        elif isinstance(value, types.FunctionType):
            self.function(value, where)
        elif isinstance(value, types.CodeType):
            self.code(value, where)
        elif isinstance(value, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            self.feed("builtin", getattr(value, "__module__", None), value.__qualname__)
            owner = getattr(value, "__self__", None)
            if owner is not None and not isinstance(owner, types.ModuleType):
                self.visit(owner, f"{where}.__self__")
        elif isinstance(value, types.ModuleType):
            self.feed("module", value.__name__)
        elif isinstance(value, type):
            self.feed("class", _qualified(value))
        elif isinstance(value, (staticmethod, classmethod, property)):
            self.feed(type(value).__name__)
            self.visit(value.__func__ if not isinstance(value, property) else value.fget, where)
        elif dataclasses.is_dataclass(value):
            self.feed("dataclass", _qualified(type(value)))
            for f in dataclasses.fields(value):
                self.feed(f.name)
                self.visit(getattr(value, f.name), f"{where}.{f.name}")
            self.call(value, where)
        elif isinstance(value, torch.nn.Module):
            self.feed("module", _qualified(type(value)), repr(value), value.training)
            self.mapping(value.state_dict(), f"{where}.state_dict()")
            self.call(value, where)
        else:
            self.instance(value, where)

    def sub(self, value: Any, where: str) -> str:
        """The digest of ``value`` on its own (for unordered collections); problems kept."""
        walker = _Walker()
        walker.seen, walker.keep = self.seen, self.keep
        walker.visit(value, where)
        self.problems.extend(walker.problems)
        return walker.hash.hexdigest()

    def mapping(self, value: Mapping[Any, Any], where: str, *, attributes: bool = False) -> None:
        self.feed("mapping", _qualified(type(value)), len(value))
        items = [(self.sub(k, f"{where} key"), k, v) for k, v in value.items()]
        if not isinstance(value, dict) or type(value) is dict:
            items.sort(key=lambda item: item[0])  # plain dicts: order does not matter
        for digest, k, v in items:
            self.feed(digest)
            self.visit(v, f"{where}.{k}" if attributes else f"{where}[{k!r}]")

    def tensor(self, value: torch.Tensor) -> None:
        t = value.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous()
        self.feed("tensor", t.dtype, tuple(t.shape))
        self.feed(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    def function(self, fn: types.FunctionType, where: str) -> None:
        self.feed("function", fn.__module__, fn.__qualname__)
        if _is_library(fn):
            self.feed("version", _package_version(fn.__module__))
            return
        self.code(fn.__code__, where)
        self.visit(fn.__defaults__, f"{where} (default arguments)")
        self.visit(fn.__kwdefaults__, f"{where} (keyword defaults)")
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned after the function was made)
                self.feed("empty cell", name)
                continue
            self.feed("cell", name)
            self.visit(content, f"{where} (closure variable {name!r})")
        globals_ = fn.__globals__
        builtins_ = vars(__builtins__) if isinstance(__builtins__, types.ModuleType) else {}
        for name in sorted(_global_names(fn.__code__)):
            if name in globals_:
                self.feed("global", name)
                self.visit(globals_[name], f"{where} (global {name!r})")
            elif name in builtins_:
                self.feed("builtin name", name)

    def code(self, code: types.CodeType, where: str) -> None:
        self.feed("code", code.co_code, code.co_names, code.co_varnames, code.co_freevars)
        self.feed(code.co_argcount, code.co_kwonlyargcount, code.co_flags)
        for const in code.co_consts:
            self.visit(const, f"{where} (constant)")

    def call(self, value: Any, where: str) -> None:
        """The class's own ``__call__`` when it is code of yours (its behaviour)."""
        mro = type(value).__mro__
        call = next((vars(k)["__call__"] for k in mro if "__call__" in vars(k)), None)
        if isinstance(call, types.FunctionType) and not _is_library(call):
            self.function(call, f"{where}.__call__")

    def instance(self, value: Any, where: str) -> None:
        cls = type(value)
        self.feed("object", _qualified(cls))
        state: dict[str, Any] = {}
        if hasattr(value, "__dict__") and isinstance(vars(value), dict):
            state.update(vars(value))
        for klass in cls.__mro__:
            for slot in getattr(klass, "__slots__", ()):
                if slot not in ("__dict__", "__weakref__") and hasattr(value, slot):
                    state[slot] = getattr(value, slot)
        if not cls.__flags__ & _HEAPTYPE or not (state or hasattr(value, "__dict__")):
            self.problem(
                where,
                f"a {_qualified(cls)} object, whose state is not inspectable from Python "
                "(a built-in or C type infl does not know, with no dataclass fields)",
            )
            return
        self.mapping(state, where, attributes=True)
        self.call(value, where)


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', repr(obj))}"


# ---------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------
def _short(value: Any) -> str:
    if isinstance(value, _PLAIN):
        text = repr(value)
    elif isinstance(value, torch.Tensor):
        text = f"tensor{list(value.shape)}"
    else:
        text = _label(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _label(value: Any) -> str:
    if isinstance(value, functools.partial):
        args = [_short(a) for a in value.args]
        args += [f"{k}={_short(v)}" for k, v in value.keywords.items()]
        text = f"partial({', '.join([_label(value.func), *args])})"
    elif isinstance(value, types.MethodType):
        text = f"{_label(value.__self__)}.{value.__func__.__name__}"
    elif isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        text = _qualified(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        text = repr(value)
        if " object at 0x" in text:
            text = _qualified(type(value))
    else:
        text = _qualified(type(value))
    return text if len(text) <= _LABEL_LIMIT else text[: _LABEL_LIMIT - 3] + "..."
