"""Schioppa et al. (2023) on infl's default models: influence fading and prediction correction.

The library functions are :func:`infl.experiments.fading.influence_fading` and
:func:`infl.experiments.correction.compare_rankings`; this module only trains the default
models (the Iris MLP and the digits CNN of the fragility study), picks test points and
removals, and writes tables and figures, resumably (one stored result per model).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from infl import ConjugateGradient, ExactHessian, InfluenceCalculator, InflWarning, Objective
from infl.experiments.correction import CorrectionConfig, CorrectionSummary, compare_rankings
from infl.experiments.fading import influence_fading
from infl.parallel import run_resumable
from infl.store import Store, write_atomic
from infl.studies.datasets import Split, load_digits, load_iris
from infl.studies.figures import trend_figure
from infl.studies.fragility import retry_with_more_damping, train_full_batch, train_minibatch
from infl.studies.models import mlp, small_cnn

WEIGHT_DECAY = 1e-3


@dataclass(frozen=True)
class FadingSettings:
    """The fading protocol for the default models.

    Attributes
    ----------
    horizons
        Training steps after the removal at which effects are compared (Iris MLP).
    cnn_horizons
        The same for the digits CNN (each step costs far more: minibatch SGD on a CNN).
    removals, test_points
        How many single-example removals (the largest mean |predicted effect|) and how many
        of the highest-loss test points.
    iris_train_steps
        Full-batch SGD steps to train the Iris MLP before the perturbation.
    cnn_epochs
        Minibatch epochs to train the digits CNN.
    """

    horizons: tuple[int, ...] = (10, 100, 1000, 10000)
    cnn_horizons: tuple[int, ...] = (10, 100, 1000)
    removals: int = 20
    test_points: int = 10
    iris_train_steps: int = 3000
    cnn_epochs: int = 8


@dataclass(frozen=True)
class FadingCell:
    """One model of the fading study."""

    model: str

    @property
    def cell_id(self) -> str:
        return f"fading-{self.model}"


def _trained(model_name: str, settings: FadingSettings) -> tuple[nn.Module, Split, Any]:
    if model_name == "iris":
        split = load_iris(seed=0, dtype=torch.float64)
        model = mlp(4, 3, 5, 1, "tanh", seed=0).double()
        train_full_batch(model, split.train, WEIGHT_DECAY, settings.iris_train_steps, 0.05, 0.9)
        return model.eval(), split, ExactHessian(damping=0.01, pseudo_inverse=True)
    split = load_digits(seed=0, images=True)
    model = small_cnn(10, seed=0)
    train_minibatch(model, split.train, WEIGHT_DECAY, settings.cnn_epochs, 64, 0.05, 0)
    return model.eval(), split, ConjugateGradient(damping=0.01, max_iter=300)


def run_fading_cell(cell: FadingCell, settings: FadingSettings) -> dict[str, Any]:
    """Train one default model and measure how predictive influence is at each horizon."""
    torch.set_num_threads(1)
    model, split, solver = _trained(cell.model, settings)
    objective = Objective("cross_entropy", weight_decay=WEIGHT_DECAY)
    with torch.no_grad():
        losses = nn.functional.cross_entropy(model(split.x_test), split.y_test, reduction="none")
    idx = losses.argsort(descending=True)[: settings.test_points]
    test = (split.x_test[idx], split.y_test[idx])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InflWarning)  # the fading study measures the drift itself
        calc = InfluenceCalculator(model, objective, split.train, solver, progress=False)
        effects = calc.removal_effect(test)
    removals = effects.abs().mean(dim=0).argsort(descending=True)[: settings.removals]
    chosen = [int(i) for i in removals]
    horizons = settings.horizons if cell.model == "iris" else settings.cnn_horizons
    result = influence_fading(
        model,
        objective,
        split.train,
        test,
        chosen,
        horizons,
        predicted=effects[:, removals],
        lr=0.05 if cell.model == "iris" else 0.02,
        batch_size=None if cell.model == "iris" else 64,
        seed=0,
        progress=False,
    )
    return {"model": cell.model, "rows": result.to_rows(), "table": result.table()}


def run_fading_study(
    out_dir: str,
    settings: FadingSettings,
    *,
    models: tuple[str, ...] = ("iris", "digits"),
    workers: int = 1,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run (or resume) the fading study; writes ``fading.csv``, ``fading.md``, figures."""
    store = Store(out_dir, {"study": "fading", **asdict(settings)}, records="cells")
    results = run_resumable(
        run_fading_cell,
        [FadingCell(m) for m in models],
        settings,
        store,
        workers=workers,
        progress=progress,
        desc="fading models",
    )
    out = Path(out_dir)
    lines = ["# Influence fading (Schioppa et al. 2023)", ""]
    csv_lines = ["model,horizon,pearson,spearman,scale,mean_divergence,max_divergence,drift"]
    for res in results:
        lines += [f"## {res['model']}", "", "```", res["table"], "```", ""]
        for r in res["rows"]:
            csv_lines.append(
                ",".join(
                    str(v)
                    for v in (
                        res["model"],
                        r["horizon"],
                        r["pearson"],
                        r["spearman"],
                        r["scale"],
                        r["mean_divergence"],
                        r["max_divergence"],
                        r["control_drift"],
                    )
                )
            )
        _fading_figure(res, out / "figures" / f"fading_{res['model']}.png")
    write_atomic(out / "fading.md", "\n".join(lines) + "\n")
    write_atomic(out / "fading.csv", "\n".join(csv_lines) + "\n")
    return results


def _fading_figure(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # pragma: no cover - matplotlib is optional
        return
    rows = result["rows"]
    none = [math.nan] * len(rows)
    fig = trend_figure(
        [r["horizon"] for r in rows],
        {
            "Pearson r: predicted vs. actual effect of each removal": (
                [r["pearson"] for r in rows],
                none,
            ),
            "Spearman ρ: the same, by rank": ([r["spearman"] for r in rows], none),
        },
        xlabel="training steps T after the removal (log scale)",
        ylabel="correlation (predicted vs. actual)",
        title=f"Influence fading: {result['model']} (one training seed)",
        note="actual effect: removal run minus control run, both trained T more steps",
        log_x=True,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a success rate ``successes / n``."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def correction_figure(rows: list[dict[str, Any]], *, max_steps: int, k: int) -> Any:
    """Success rate and median steps to success, per ranking (two panels).

    Parameters
    ----------
    rows
        :meth:`CorrectionSummary.to_rows <infl.experiments.correction.CorrectionSummary.to_rows>`:
        one row per ranking with ``attempts``, ``success_rate`` and ``median_steps``.
    max_steps, k
        The fine-tuning budget and the examples fine-tuned on (for the labels).

    Returns
    -------
    matplotlib.figure.Figure
        Left: the fraction of mis-predicted test points corrected within ``max_steps``, with
        95% Wilson intervals; right: the median steps of the successful corrections (none
        drawn, and "no success" written, for a ranking that never succeeded).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    names = [r["ranking"].replace("_", " ") for r in rows]
    xs = list(range(len(rows)))
    colors = [f"C{i}" for i in xs]
    rates = [100 * r["success_rate"] for r in rows]
    bounds = [_wilson(r["success_rate"] * r["attempts"], r["attempts"]) for r in rows]
    err = [
        [max(0.0, rate - 100 * lo) for rate, (lo, _) in zip(rates, bounds, strict=True)],
        [max(0.0, 100 * hi - rate) for rate, (_, hi) in zip(rates, bounds, strict=True)],
    ]
    left.bar(xs, rates, color=colors, yerr=err, capsize=4)
    for x, rate, r, (_, hi) in zip(xs, rates, rows, bounds, strict=True):
        top = rate if math.isnan(hi) else max(rate, 100 * hi)
        left.annotate(
            f"{rate:.0f}% of {r['attempts']}",
            (x, top),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    left.set_xticks(xs, names)
    left.set_ylim(0, 115)
    left.set_ylabel("test points corrected (%)")
    left.set_title(f"success within {max_steps} steps (bars: 95% interval)", fontsize=9)
    medians = [r["median_steps"] for r in rows]
    right.bar(xs, [0 if math.isnan(m) else m for m in medians], color=colors)
    for x, m in zip(xs, medians, strict=True):
        text = "no success" if math.isnan(m) else f"{m:g}"
        right.annotate(
            text,
            (x, 0 if math.isnan(m) else m),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    right.axhline(max_steps, color="0.5", linestyle="--", linewidth=0.8)
    right.annotate(
        f"budget: {max_steps} steps",
        (xs[-1] if xs else 0, max_steps),
        xytext=(0, 3),
        textcoords="offset points",
        ha="right",
        fontsize=8,
        color="0.4",
    )
    right.set_ylim(0, max_steps * 1.15)
    right.set_xticks(xs, names)
    right.set_ylabel("fine-tuning steps (median over successes)")
    right.set_title("steps to correct", fontsize=9)
    fig.suptitle(
        f"Correcting mis-predicted digits by fine-tuning on the top {k} examples per ranking",
        fontsize=10,
    )
    return fig


@dataclass(frozen=True)
class CorrectionSettings:
    """The correction protocol: fine-tune on the top ``k`` examples, at most ``max_steps``."""

    k: int = 10
    lr: float = 0.02
    max_steps: int = 50
    max_examples: int | None = None
    cnn_epochs: int = 8


def run_correction_study(
    out_dir: str, settings: CorrectionSettings, *, progress: bool = True, figures: bool = True
) -> dict[str, Any]:
    """Correct every mis-predicted test digit of the digits CNN with each ranking.

    Writes ``correction.json`` (resumable: a finished study is loaded, not rerun),
    ``correction.csv``, ``correction.md`` and (with ``figures`` and matplotlib installed)
    ``figures/correction.png``, the success rate and median steps per ranking; returns the
    stored summary with ``"figures"``, the figure files written (relative to ``out_dir``).
    """
    out = Path(out_dir)
    store = Store(out, {"study": "correction", **asdict(settings)}, records="cells")
    stored = store.load_json("correction")
    if stored is None:
        torch.set_num_threads(1)
        split = load_digits(seed=0, images=True)
        model = small_cnn(10, seed=0)
        train_minibatch(model, split.train, WEIGHT_DECAY, settings.cnn_epochs, 64, 0.05, 0)
        model.eval()
        with torch.no_grad():
            wrong = (model(split.x_test).argmax(1) != split.y_test).nonzero().reshape(-1)
        right = torch.ones(split.n_test, dtype=torch.bool)
        right[wrong] = False

        objective = Objective("cross_entropy", weight_decay=WEIGHT_DECAY)
        solver = ConjugateGradient(damping=0.01, max_iter=300)
        calc = InfluenceCalculator(model, objective, split.train, solver, progress=progress)

        def rank_and_correct(calc: InfluenceCalculator) -> CorrectionSummary:
            return compare_rankings(
                model,
                objective,
                split.train,
                (split.x_test[wrong], split.y_test[wrong]),
                calculator=calc,
                config=CorrectionConfig(k=settings.k, lr=settings.lr, max_steps=settings.max_steps),
                heldout=(split.x_test[right], split.y_test[right]),
                max_examples=settings.max_examples,
                progress=progress,
            )

        summary, calc, _ = retry_with_more_damping(rank_and_correct, calc)
        damping = calc.fitted_solver().damping  # the number in use, also for damping="auto"
        stored = {
            "rows": summary.to_rows(),
            "table": summary.table(),
            "damping": damping,
            "num_mispredicted": int(wrong.numel()),
            "num_test": split.n_test,
        }
        store.save_json("correction", stored)
    rows = stored["rows"]
    header = list(rows[0]) if rows else []
    write_atomic(
        out / "correction.csv",
        "\n".join([",".join(header)] + [",".join(str(r[h]) for h in header) for r in rows]) + "\n",
    )
    names: list[str] = []
    if figures and rows:
        try:
            fig = correction_figure(rows, max_steps=settings.max_steps, k=settings.k)
        except ImportError:  # pragma: no cover - matplotlib is optional
            pass
        else:
            (out / "figures").mkdir(parents=True, exist_ok=True)
            fig.savefig(out / "figures" / "correction.png", dpi=110)
            names.append("figures/correction.png")
    listing = "".join(f"\n![success rate and median steps per ranking]({n})\n" for n in names)
    write_atomic(
        out / "correction.md",
        (
            "# Correcting mis-predictions with influence (Schioppa et al. 2023)\n\n"
            f"Digits CNN: {stored['num_mispredicted']} of {stored['num_test']} test digits "
            f"mis-predicted; influence by conjugate gradient with damping {stored['damping']:g}; "
            f"fine-tuning on the top {settings.k} examples per ranking, "
            f"lr {settings.lr}, at most {settings.max_steps} steps.\n\n```\n"
            f"{stored['table']}\n```\n{listing}"
        ),
    )
    write_atomic(out / "correction.json", json.dumps(stored, indent=1))
    return {**stored, "figures": names}
