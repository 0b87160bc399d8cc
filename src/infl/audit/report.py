"""The audit's records and their files: ``audit.json``, ``report.md`` and figures.

``report.md`` is rendered from the same rounded numbers that ``audit.json`` stores, so every
number it shows can be found there.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infl.store import write_atomic


def num(x: float | int | None, digits: int = 4) -> float | int | None:
    """``x`` rounded to ``digits`` significant digits; ``None`` when missing or not finite.

    Parameters
    ----------
    x
        The value to store.
    digits
        Significant digits kept.

    Returns
    -------
    float or int or None
        Integers pass through; non-finite floats become ``None`` (JSON has no ``inf``).
    """
    if x is None:
        return None
    if isinstance(x, bool):
        return int(x)
    if isinstance(x, int):
        return x
    value = float(x)
    if not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def show(x: Any) -> str:
    """How a stored number is printed in ``report.md`` (``n/a`` for ``None``)."""
    return "n/a" if x is None else str(x)


@dataclass(frozen=True)
class Section:
    """One piece of evidence: its numbers and a one-line reading.

    Attributes
    ----------
    name
        ``"curvature"``, ``"solver_agreement"``, ``"sensitivity"`` or ``"retraining"``.
    numbers
        JSON-ready values (already rounded with :func:`num`).
    reading
        One sentence that says what the numbers mean; it quotes only stored numbers.
    """

    name: str
    numbers: dict[str, Any]
    reading: str


@dataclass(frozen=True)
class PointVerdict:
    """The verdict on one audited test point.

    Attributes
    ----------
    test_index
        The point's index in the test data.
    loss
        Its loss (rounded).
    verdict
        ``"trustworthy"``, ``"use with caution"`` or ``"not trustworthy"``.
    reasons
        Why (empty for *trustworthy*); each quotes only stored numbers.
    checks
        Each check behind the verdict: name -> ``{"value": v, "level": level}`` with level
        ``pass``, ``caution``, ``not trustworthy`` or ``n/a``
        (:func:`infl.audit.verdict.point_verdict`).
    """

    test_index: int
    loss: float | None
    verdict: str
    reasons: tuple[str, ...] = ()
    checks: dict[str, Any] = field(default_factory=dict)


@dataclass
class AuditReport:
    """The result of :func:`infl.audit.audit`.

    Attributes
    ----------
    sections
        The evidence, in order: curvature, solver agreement, sensitivity, retraining.
    points
        One verdict per audited test point.
    summary
        The model-level verdict and its one-line reading.
    recommendations
        What to change, following from the evidence.
    settings
        What was audited and how (parameters, sizes, damping, budget, wall time).
    thresholds
        The thresholds used (:mod:`infl.audit.thresholds`).
    scatter
        Per retrained test point, ``(predicted, actual)`` removal effects (for the figure).
    """

    sections: list[Section]
    points: list[PointVerdict]
    summary: dict[str, Any]
    recommendations: list[str]
    settings: dict[str, Any]
    thresholds: dict[str, Any]
    scatter: dict[int, tuple[list[float], list[float]]] = field(default_factory=dict)

    def section(self, name: str) -> Section:
        """The section called ``name``."""
        for s in self.sections:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def verdict(self) -> str:
        """The model-level verdict (the worst per-point verdict)."""
        return str(self.summary["verdict"])

    def to_json(self) -> dict[str, Any]:
        """Every number of the audit, JSON-ready (no ``NaN``/``inf``: those are ``null``)."""
        return {
            "settings": self.settings,
            "thresholds": self.thresholds,
            "sections": {
                s.name: {"numbers": s.numbers, "reading": s.reading} for s in self.sections
            },
            "points": [
                {
                    "test_index": p.test_index,
                    "loss": p.loss,
                    "verdict": p.verdict,
                    "reasons": list(p.reasons),
                    "checks": p.checks,
                }
                for p in self.points
            ],
            "summary": self.summary,
            "recommendations": self.recommendations,
        }

    def verdict_table(self) -> str:
        """The per-point verdicts as a markdown table."""
        rows = [
            "| test point | loss | verdict | why |",
            "| --- | --- | --- | --- |",
        ]
        for p in self.points:
            why = "; ".join(p.reasons) if p.reasons else "every check passed"
            rows.append(f"| {p.test_index} | {show(p.loss)} | {p.verdict} | {why} |")
        return "\n".join(rows)

    def to_markdown(
        self, figures: dict[str, list[tuple[str, str]]] | None = None, note: str | None = None
    ) -> str:
        """``report.md``: the verdicts, the evidence and the recommendations.

        Parameters
        ----------
        figures
            Section name (or ``"verdicts"``) -> ``(path, one-line reading)`` of each figure,
            embedded under that section (:func:`infl.audit.figures.write_figures`).
        note
            Why there are no figures (printed under the summary), if there are none.
        """
        figs = figures or {}
        s = self.settings
        wall = f"wall time: {show(s['seconds'])} s"
        if s.get("resumed_sections"):
            wall += (
                f" (resumed {', '.join(s['resumed_sections'])}, which took "
                f"{show(s['resumed_seconds'])} s before)"
            )
        lines = [
            "# Influence audit",
            "",
            f"**Verdict: {self.summary['verdict']}.** {self.summary['reading']}",
            "",
            f"Parameters: {show(s['num_params'])}; training examples: {show(s['num_train'])}; "
            f"damping used: {show(s['damping_used'])}; curvature: {s['curvature']}; "
            f"{wall} of a {show(s['budget_minutes'])} min budget.",
        ]
        if note:
            lines += ["", f"Figures: {note}."]
        lines += ["", "## Verdicts", "", self.verdict_table()]
        lines += _figure_lines(figs.get("verdicts", []))
        lines += ["", "## Recommendations", ""]
        lines += [f"- {r}" for r in self.recommendations] or ["- none"]
        for sec in self.sections:
            lines += ["", f"## Evidence: {sec.name.replace('_', ' ')}", "", sec.reading, ""]
            lines += _numbers_table(sec.numbers)
            lines += _figure_lines(figs.get(sec.name, []))
        lines += ["", "Every number above is stored in `audit.json`; thresholds are in its "]
        lines[-1] += "`thresholds` and explained in docs/audit.md."
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | os.PathLike[str], *, figures: bool = True) -> Path:
        """Write ``audit.json``, ``report.md`` and (with matplotlib) figures to ``out_dir``.

        Each file is written atomically. Without matplotlib, or with ``figures=False``, the
        figures are skipped and ``report.md`` says so.

        Returns
        -------
        Path
            The path of ``report.md``.
        """
        from infl.audit.figures import write_figures

        out = Path(out_dir)
        drawn: dict[str, list[tuple[str, str]]] = {}
        note: str | None = "skipped (figures=False, --no-figures)"
        if figures:
            drawn, note = write_figures(self, out)
        write_atomic(out / "audit.json", json.dumps(self.to_json(), indent=2) + "\n")
        write_atomic(out / "report.md", self.to_markdown(drawn, note))
        return out / "report.md"


def _figure_lines(figures: list[tuple[str, str]]) -> list[str]:
    lines: list[str] = []
    for path, reading in figures:
        lines += ["", f"![{Path(path).stem}]({path})", "", f"*{reading}*"]
    return lines


def _numbers_table(numbers: dict[str, Any]) -> list[str]:
    """Scalars as a two-column table, lists of records as their own table."""
    scalars = [(k, v) for k, v in numbers.items() if not isinstance(v, (list, dict))]
    lines = ["| quantity | value |", "| --- | --- |"] if scalars else []
    lines += [f"| {k.replace('_', ' ')} | {show(v)} |" for k, v in scalars]
    for key, value in numbers.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            cols = list(value[0])
            lines += ["", f"{key.replace('_', ' ')}:", ""]
            lines.append("| " + " | ".join(c.replace("_", " ") for c in cols) + " |")
            lines.append("|" + " --- |" * len(cols))
            for rec in value:
                lines.append("| " + " | ".join(_cell(rec.get(c)) for c in cols) + " |")
        elif isinstance(value, list):
            listed = ", ".join(_cell(v) for v in value) if value else "none"
            lines += ["", f"{key.replace('_', ' ')}: {listed}"]
    return lines


def _cell(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(_cell(x) for x in v)
    return show(v)
