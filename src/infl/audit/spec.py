"""The ``--spec`` file of ``infl audit``: a Python file whose ``setup()`` returns the setup."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from torch import nn

from infl.errors import InputError
from infl.objective import Objective


def load_spec(path: str | os.PathLike[str]) -> tuple[nn.Module, Objective, Any, Any]:
    """Run ``setup()`` of the spec file at ``path``.

    Parameters
    ----------
    path
        A Python file defining ``def setup(): return model, objective, train_data, test_data``.

    Returns
    -------
    tuple
        ``(model, objective, train_data, test_data)``.

    Raises
    ------
    InputError
        The file is missing or does not import, defines no callable ``setup``, ``setup``
        raises, or it returns something other than the four items.
    """
    file = Path(path)
    if not file.is_file():
        raise InputError(f"spec file {file} does not exist")
    spec = importlib.util.spec_from_file_location(f"infl_audit_spec_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise InputError(f"spec file {file} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise InputError(f"spec file {file} failed to import: {type(err).__name__}: {err}") from err
    setup = getattr(module, "setup", None)
    if not callable(setup):
        raise InputError(
            f"spec file {file} defines no setup(); it must define "
            "def setup(): return model, objective, train_data, test_data"
        )
    try:
        result = setup()
    except Exception as err:
        raise InputError(f"setup() in {file} raised {type(err).__name__}: {err}") from err
    if not (isinstance(result, (tuple, list)) and len(result) == 4):
        raise InputError(
            f"setup() in {file} must return (model, objective, train_data, test_data), got "
            f"{type(result).__name__}"
        )
    model, objective, train_data, test_data = result
    if not isinstance(model, nn.Module) or not isinstance(objective, Objective):
        raise InputError(
            f"setup() in {file} must return an nn.Module and an infl.Objective first, got "
            f"{type(model).__name__} and {type(objective).__name__}"
        )
    return model, objective, train_data, test_data
