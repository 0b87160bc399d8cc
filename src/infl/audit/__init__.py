"""``infl audit``: can these influence scores be trusted for *my* model?

It sits above :mod:`infl.diagnostics` (like :mod:`infl.experiments`) and composes the public
pieces into one trust report:

* :mod:`~infl.audit.evidence` — curvature, solver agreement, sensitivity, retraining;
* :mod:`~infl.audit.verdict` — per-point verdicts, summary and recommendations;
* :mod:`~infl.audit.thresholds` — the stated thresholds, each with its reason;
* :mod:`~infl.audit.report` — :class:`AuditReport`, ``audit.json``, ``report.md``;
* :mod:`~infl.audit.figures` — a figure per section, drawn from the stored numbers;
* :mod:`~infl.audit.resume` — the store that keeps each finished section, so a rerun resumes;
* :mod:`~infl.audit.spec` — the ``--spec`` file of ``infl audit``;
* :mod:`~infl.audit.run` — :func:`audit` itself.
"""

from infl.audit.report import AuditReport, PointVerdict, Section
from infl.audit.run import audit
from infl.audit.spec import load_spec

__all__ = ["AuditReport", "PointVerdict", "Section", "audit", "load_spec"]
