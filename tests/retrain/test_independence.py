"""The ground truth shares no code path with the estimator it checks."""

from __future__ import annotations

import ast
from pathlib import Path

import infl.retrain

FORBIDDEN = ("infl.calculator", "infl.model", "infl.solvers", "infl.operators")


def test_retrain_package_never_imports_the_estimator():
    package = Path(infl.retrain.__file__).parent
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"
