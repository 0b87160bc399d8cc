"""Time to equal accuracy: every library's iterative solver at several budgets, side by side.

One run of an iterative solver at one budget (CG ``max_iter``, LiSSA ``depth``, Arnoldi
``krylov``) says how
fast a library is at *that* budget's accuracy. A library whose solver plateaus early (pyDVL's
block CG reaches its final accuracy by about 20 iterations) or converges faster per step
(infl's CG to 1e-10) is misjudged by a single budget. ``compare_peers.py --ladder`` therefore
runs every library, infl's option variants included, at every budget of :data:`LADDERS` as
well as the default one, and this module reads the result the strict way:

    for every peer run P (every peer, every budget), the fastest infl run I (any option, any
    budget) that is as accurate as P; the row's ratio is the *smallest* P.seconds / I.seconds.

"As accurate" is :func:`as_accurate`: Pearson with the exact answer at most
``EQUAL_ACCURACY`` below P's and largest relative error at most ``EQUAL_ERROR_FACTOR`` times
P's (or under ``EQUAL_ERROR_FLOOR``). Runs drawn at several seeds (``--seeds``: minibatch
LiSSA, K-FAC with sampled labels) compare mean Pearsons, and the allowance is then the larger
of ``EQUAL_ACCURACY`` and one standard error (``SEED_MARGIN``) of the difference of the two means
(:func:`pearson_margin`): a gap the draws themselves make is not a difference in accuracy.
A ratio of 3 means: whatever budget a user of the peer
picks, infl reaches the accuracy the peer reaches there at least 3 times sooner. A peer run no
infl run matches gives ratio 0 and names it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

from peers.common import Setting

EQUAL_ACCURACY = 5e-4
EQUAL_ERROR_FACTOR = 1.25
EQUAL_ERROR_FLOOR = 1e-6
SEED_MARGIN = 1.0
MIN_SEEDS = 3

LADDERS: dict[str, tuple[str, tuple[float, ...]]] = {
    "cg": ("max_iter", (3, 5, 10, 20, 40)),
    "lissa": ("depth", (0.1, 0.13, 0.16, 0.2, 0.4, 0.6)),
    "arnoldi": ("krylov", (0.3, 0.4, 0.6, 0.8)),
}
"""Per method: the budget field of :class:`Setting` and the budgets below the default one (CG:
iteration counts; LiSSA: fractions of the default depth; Arnoldi: fractions of the default
Krylov dimension, the rank capped at it)."""

SEPARATOR = " @ "


def ladder(setting: Setting) -> list[tuple[str, Setting]]:
    """``(label, setting)`` for each budget below ``setting``'s own (none for direct solvers)."""
    if setting.method not in LADDERS:
        return []
    field, steps = LADDERS[setting.method]
    default = getattr(setting, field)
    out = []
    for step in steps:
        budget = int(step) if step >= 1 else max(1, round(step * default))
        if budget < default:
            label = f"{field} {budget}"
            smaller = dataclasses.replace(setting, **{field: budget})
            if setting.method == "arnoldi":
                smaller = dataclasses.replace(smaller, rank=min(setting.rank, budget))
            out.append((label, smaller))
    return out


def budget_label(setting: Setting) -> str:
    """The default run's budget, as :func:`ladder` labels the others (``""`` without one)."""
    if setting.method not in LADDERS:
        return ""
    field = LADDERS[setting.method][0]
    return f"{field} {getattr(setting, field)}"


def pearson_margin(run: dict[str, Any], target: dict[str, Any]) -> float:
    """How far below ``target``'s Pearson ``run``'s may be and still count as equal:
    ``EQUAL_ACCURACY``, or when both were drawn at ``MIN_SEEDS`` seeds or more
    (``pearson_seeds``), ``SEED_MARGIN`` times the standard error of the difference of their
    means, :math:`\\sqrt{s_a^2/n_a + s_b^2/n_b}`, if that is larger."""
    draws = [r.get("pearson_seeds") or [] for r in (run, target)]
    if min(len(d) for d in draws) < MIN_SEEDS:
        return EQUAL_ACCURACY
    variance = sum(statistics.variance(d) / len(d) for d in draws)
    return max(EQUAL_ACCURACY, SEED_MARGIN * math.sqrt(variance))


def as_accurate(run: dict[str, Any], target: dict[str, Any]) -> bool:
    """Whether ``run`` is at least as accurate as ``target`` (see the module docstring).

    A missing or NaN accuracy on ``run`` never passes; on ``target`` it imposes nothing.
    """
    pearson = run.get("pearson", math.nan)
    error = run.get("relative_error", math.nan)
    target_pearson = target.get("pearson", math.nan)
    target_error = target.get("relative_error", math.nan)
    margin = pearson_margin(run, target)
    if not math.isnan(target_pearson) and not pearson >= target_pearson - margin:
        return False
    if math.isnan(target_error):
        return True
    return error <= max(EQUAL_ERROR_FACTOR * target_error, EQUAL_ERROR_FLOOR)


def strictest(row: dict[str, Any]) -> dict[str, Any] | None:
    """The peer run against which infl's time to equal accuracy is the smallest multiple.

    Returns ``{"peer_run", "infl_run", "ratio"}`` (ratio = peer seconds / infl seconds; 0 and
    ``infl_run=None`` when no infl run is as accurate), or ``None`` without timed peer runs.
    """
    timed = {k: v for k, v in row["runs"].items() if "seconds" in v}
    ours = {k: v for k, v in timed.items() if k.startswith("infl")}
    theirs = {k: v for k, v in timed.items() if not k.startswith("infl")}
    worst: dict[str, Any] | None = None
    for peer_key, peer_run in theirs.items():
        matches = {k: v for k, v in ours.items() if as_accurate(v, peer_run)}
        if matches:
            best = min(matches, key=lambda k: matches[k]["seconds"])
            entry = {
                "peer_run": peer_key,
                "infl_run": best,
                "ratio": peer_run["seconds"] / matches[best]["seconds"],
            }
        else:
            entry = {"peer_run": peer_key, "infl_run": None, "ratio": 0.0}
        if worst is None or entry["ratio"] < worst["ratio"]:
            worst = entry
    return worst


def run_name(key: str, row: dict[str, Any]) -> str:
    """``key`` with its budget: the default run's keys carry none (``row["budget"]`` has it)."""
    if SEPARATOR in key or not row.get("budget"):
        return key
    return f"{key}{SEPARATOR}{row['budget']}"


def _cell(key: str | None, row: dict[str, Any]) -> str:
    if key is None:
        return "no infl run as accurate"
    run = row["runs"][key]
    return (
        f"{run_name(key, row)}: {run['seconds']:.3g} s ({run['pearson']:.4f}; "
        f"{run.get('relative_error', math.nan):.1e})"
    )


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per row with a ladder, the strictest peer run, infl's answer and the ratio."""
    head = ["model", "solver", "strictest peer run", "fastest infl run as accurate", "ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        found = row.get("strictest")
        if found is None:
            continue
        ratio = found["ratio"]
        lines.append(
            "| "
            + " | ".join(
                [
                    row["model"],
                    row["solver"],
                    _cell(found["peer_run"], row),
                    _cell(found["infl_run"], row),
                    "—" if ratio == 0 else f"{ratio:.2g}× faster",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def all_runs(rows: list[dict[str, Any]]) -> str:
    """Markdown: every run of every laddered row (library @ budget: seconds, accuracy)."""
    lines = ["| model | solver | run | seconds | Pearson | relative error |", "|" + " --- |" * 6]
    for row in rows:
        if "strictest" not in row:
            continue
        for key, run in row["runs"].items():
            if "seconds" not in run:
                continue
            lines.append(
                f"| {row['model']} | {row['solver']} | {run_name(key, row)} | "
                f"{run['seconds']:.3g} | "
                f"{run.get('pearson', math.nan):.4f} | {run.get('relative_error', math.nan):.1e} |"
            )
    return "\n".join(lines)
