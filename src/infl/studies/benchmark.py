"""``infl benchmark``: every solver and every attribution baseline on two digits models.

Two models on the shipped UCI digits (:func:`infl.studies.datasets.load_digits`), trained on
labels of which a seeded fraction was flipped (:func:`infl.evaluation.flip_labels`):
softmax logistic regression with L2 and a one-hidden-layer tanh MLP. Each is trained by
full-batch SGD (whose checkpoints feed TracIn-CP) and polished by L-BFGS to a minimum. Every
method then scores the same test points against the same (noisy) training set, and is judged
on

* ``time_s`` — fit and scores of the test points; ``self_time_s`` — the ``n`` self-scores;
* ``lds`` — the linear datamodeling score (:func:`infl.metrics.linear_datamodeling_score`)
  over :func:`infl.retrain_subsets` retrains (warm-started L-BFGS, :math:`\\alpha = 0.5`);
* ``loo_pearson`` / ``loo_spearman`` — agreement of the predicted removal effects with
  leave-one-out retraining (:func:`infl.retrain_ground_truth`) of a seeded set of removals;
* ``pbrf_pearson`` — the same against the proximal Bregman response function
  (``RetrainConfig(target="pbrf", proximity=damping)``) when the installed infl has it;
* ``mislabel_auc`` / ``mislabel_ap`` — how well the negated self-scores rank the flipped
  labels first (:func:`infl.evaluation.mislabel_detection`).

Scores of every method are read as predicted removal effects ``-scores / n`` (the sign of
:meth:`infl.InfluenceCalculator.influence`, which the baselines share). A method that fails
is a row with its error, not a crash. Results are stored one JSON record per
(model, method) in ``<out>/cells`` and retrains in ``<out>/retrain``: a rerun resumes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from infl import (
    EKFAC,
    KFAC,
    Arnoldi,
    ConjugateGradient,
    ExactHessian,
    InflError,
    InfluenceCalculator,
    LiSSA,
    Objective,
    RetrainConfig,
    retrain_ground_truth,
    retrain_subsets,
)
from infl.attribution import grad_cosine, grad_dot, random_projection, tracin_cp
from infl.evaluation import flip_labels, mislabel_detection
from infl.metrics import linear_datamodeling_score, pearson, spearman
from infl.store import Store, write_atomic
from infl.studies.datasets import load_digits
from infl.studies.models import count_parameters, mlp

MODELS = ("logreg", "mlp")
"""``logreg``: ``Linear(64, 10)`` (softmax regression); ``mlp``: ``64 → width → 10``, tanh."""

PBRF_AVAILABLE = "target" in getattr(RetrainConfig, "__dataclass_fields__", {})
"""Whether this infl's :class:`RetrainConfig` has ``target="pbrf"``."""


@dataclass(frozen=True)
class BenchmarkPreset:
    """The benchmark protocol.

    Attributes
    ----------
    name
        ``"tiny"`` (tests, seconds), ``"quick"`` (~1–2 min on 2 cores) or ``"full"``.
    n_train, n_test
        Training examples (a seeded subset of the digits training split; ``None``: all
        1,438) and test points scored.
    flip_fraction
        Fraction of training labels flipped before training (for mislabel detection).
    loo_removals, lds_subsets
        Leave-one-out retrains (seeded random indices) and LDS subsets.
    mlp_width
        Hidden units of the MLP.
    weight_decay
        :math:`\\lambda_{wd}` both models are trained with.
    damping
        :math:`\\lambda` of every curvature solver (and of the PBRF's proximity term); the
        K-FAC family uses its heuristic damping.
    sgd_steps, sgd_lr, checkpoints
        Full-batch SGD before the L-BFGS polish, and how many evenly spaced checkpoints of
        it TracIn-CP uses (plus the final model).
    cg_max_iter, lissa_depth, lissa_batch, arnoldi_rank, projection_dim
        Solver and baseline budgets.
    retrain_max_steps
        L-BFGS iterations per retrain.
    seed
        Seeds the data subset, the flips, the initialisation and the removals.
    expected_minutes
        Rough wall time on 2 CPU cores.
    """

    name: str
    n_train: int | None
    n_test: int
    flip_fraction: float
    loo_removals: int
    lds_subsets: int
    mlp_width: int
    weight_decay: float = 1e-3
    damping: float = 1e-3
    sgd_steps: int = 300
    sgd_lr: float = 0.5
    checkpoints: int = 4
    cg_max_iter: int = 100
    lissa_depth: int = 100
    lissa_batch: int | None = 64
    arnoldi_rank: int = 20
    projection_dim: int = 64
    retrain_max_steps: int = 300
    seed: int = 0
    expected_minutes: float = 2.0

    def config(self) -> dict[str, Any]:
        """The settings that define the results (the store refuses a directory of others)."""
        settings = asdict(self)
        settings.pop("expected_minutes")
        return {"study": "benchmark", "pbrf": PBRF_AVAILABLE, **settings}


PRESETS: dict[str, BenchmarkPreset] = {
    "tiny": BenchmarkPreset(
        name="tiny",
        n_train=50,
        n_test=3,
        flip_fraction=0.1,
        loo_removals=4,
        lds_subsets=4,
        mlp_width=3,
        sgd_steps=40,
        checkpoints=2,
        cg_max_iter=20,
        lissa_depth=10,
        lissa_batch=25,
        arnoldi_rank=4,
        projection_dim=8,
        retrain_max_steps=50,
        expected_minutes=0.2,
    ),
    "quick": BenchmarkPreset(
        name="quick",
        n_train=150,
        n_test=6,
        flip_fraction=0.1,
        loo_removals=12,
        lds_subsets=10,
        mlp_width=6,
        sgd_steps=200,
        checkpoints=3,
        cg_max_iter=40,
        lissa_depth=30,
        lissa_batch=50,
        arnoldi_rank=20,
        projection_dim=32,
        retrain_max_steps=150,
        expected_minutes=2.0,
    ),
    "full": BenchmarkPreset(
        name="full",
        n_train=None,
        n_test=50,
        flip_fraction=0.1,
        loo_removals=100,
        lds_subsets=100,
        mlp_width=32,
        sgd_steps=2000,
        checkpoints=8,
        cg_max_iter=300,
        lissa_depth=1000,
        lissa_batch=128,
        arnoldi_rank=100,
        projection_dim=512,
        retrain_max_steps=1000,
        expected_minutes=120.0,
    ),
}


# --------------------------------------------------------------------------- data and models
@dataclass
class Problem:
    """One trained model with its data, checkpoints and ground truth."""

    name: str
    model: nn.Module
    objective: Objective
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    flipped: torch.Tensor
    checkpoints: list[dict[str, torch.Tensor]]
    removals: list[int]
    loo: Any = None
    pbrf: Any = None
    subsets: Any = None


def _data(preset: BenchmarkPreset) -> tuple[Any, Any, torch.Tensor]:
    split = load_digits(seed=preset.seed, dtype=torch.float64)
    gen = torch.Generator().manual_seed(preset.seed)
    n = split.n_train if preset.n_train is None else min(preset.n_train, split.n_train)
    train_idx = torch.randperm(split.n_train, generator=gen)[:n]
    test_idx = torch.randperm(split.n_test, generator=gen)[: preset.n_test]
    y_noisy, flipped = flip_labels(
        split.y_train[train_idx], preset.flip_fraction, split.num_classes, seed=preset.seed
    )
    train = (split.x_train[train_idx], y_noisy)
    test = (split.x_test[test_idx], split.y_test[test_idx])
    return train, test, flipped


def _architecture(name: str, preset: BenchmarkPreset) -> nn.Module:
    depth, width = (0, 1) if name == "logreg" else (1, preset.mlp_width)
    return mlp(64, 10, width, depth, "tanh", seed=preset.seed).double()


def _train(
    model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], preset: BenchmarkPreset
) -> list[dict[str, torch.Tensor]]:
    """Full-batch SGD (saving checkpoints), then L-BFGS to a minimum; returns the checkpoints."""
    x, y = train
    wd = preset.weight_decay
    params = [p for p in model.parameters() if p.requires_grad]

    def objective() -> torch.Tensor:
        penalty = sum((p * p).sum() for p in params)
        return nn.functional.cross_entropy(model(x), y) + 0.5 * wd * penalty

    sgd = torch.optim.SGD(params, lr=preset.sgd_lr, momentum=0.9)
    every = max(1, preset.sgd_steps // preset.checkpoints)
    checkpoints: list[dict[str, torch.Tensor]] = []
    for step in range(preset.sgd_steps):
        if step % every == 0 and len(checkpoints) < preset.checkpoints:
            checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        sgd.zero_grad()
        objective().backward()
        sgd.step()
    lbfgs = torch.optim.LBFGS(
        params, lr=1.0, max_iter=2000, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        value = objective()
        value.backward()
        return value

    lbfgs.step(closure)
    return checkpoints


def _problem(name: str, preset: BenchmarkPreset, store: Store) -> Problem:
    """Train (or load) the model, then run (or load) its retrains."""
    train, test, flipped = _data(preset)
    model = _architecture(name, preset)
    saved = store.load_tensors(f"model-{name}")
    if saved is None:
        torch.manual_seed(preset.seed)
        checkpoints = _train(model, train, preset)
        store.save_tensors(f"model-{name}", {"final": model.state_dict(), "ckpt": checkpoints})
    else:
        model.load_state_dict(saved["final"])
        checkpoints = list(saved["ckpt"])
    model.eval()
    objective = Objective("cross_entropy", weight_decay=preset.weight_decay)
    n = train[1].shape[0]
    gen = torch.Generator().manual_seed(preset.seed + 1)
    removals = sorted(torch.randperm(n, generator=gen)[: preset.loo_removals].tolist())
    return Problem(name, model, objective, train, test, flipped, checkpoints, removals)


def _ground_truth(problem: Problem, preset: BenchmarkPreset, out: Path, progress: bool) -> None:
    config = RetrainConfig(
        optimizer="lbfgs", max_steps=preset.retrain_max_steps, grad_tol=1e-8, seed=preset.seed
    )
    common: dict[str, Any] = {"num_threads": 1, "progress": progress}
    root = out / "retrain"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unconverged retrains are summarised by steps
        args = (problem.model, problem.objective, problem.train, problem.test)
        problem.loo = retrain_ground_truth(
            *args,
            problem.removals,
            config=config,
            store=root / f"{problem.name}-loo",
            **common,
        )
        problem.subsets = retrain_subsets(
            *args,
            num_subsets=preset.lds_subsets,
            alpha=0.5,
            subset_seed=preset.seed,
            config=config,
            store=root / f"{problem.name}-lds",
            **common,
        )
        if PBRF_AVAILABLE:
            try:
                pbrf_config = replace(config, target="pbrf", proximity=preset.damping)
                problem.pbrf = retrain_ground_truth(
                    *args,
                    problem.removals,
                    config=pbrf_config,
                    store=root / f"{problem.name}-pbrf",
                    **common,
                )
            except InflError as err:  # pragma: no cover - depends on the PBRF engine
                problem.pbrf = f"{type(err).__name__}: {err}"


# --------------------------------------------------------------------------- methods
ScoreFn = Callable[[Problem, Any], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """One estimator: how it scores ``[m, n]`` and how it self-scores ``[n]``."""

    name: str
    kind: str  # "influence" or "baseline"
    curvature: str
    scores: ScoreFn
    self_scores: Callable[[Problem], torch.Tensor]


def _calculator_method(
    name: str, curvature: str, make: Callable[[BenchmarkPreset], Any], preset: BenchmarkPreset
) -> Method:
    cache: dict[str, InfluenceCalculator] = {}

    def calc(problem: Problem) -> InfluenceCalculator:
        if problem.name not in cache:
            cache[problem.name] = InfluenceCalculator(
                problem.model,
                problem.objective,
                problem.train,
                make(preset),
                curvature=curvature,
                progress=False,
            )
        return cache[problem.name]

    return Method(
        name,
        "influence",
        curvature,
        lambda problem, test: calc(problem).influence(test),
        lambda problem: calc(problem).self_influence(),
    )


def _baseline(name: str, curvature: str, fn: ScoreFn) -> Method:
    return Method(
        name,
        "baseline",
        curvature,
        fn,
        lambda problem: torch.diagonal(fn(problem, problem.train)).clone(),
    )


def methods(model_name: str, preset: BenchmarkPreset) -> list[Method]:
    """The estimators run on ``model_name``: every solver, then every baseline.

    For the convex logistic regression the Hessian and the Gauss-Newton matrix coincide, so
    each solver runs once on the Hessian; for the MLP the exact solver runs on both and the
    iterative ones on the Gauss-Newton matrix (positive semi-definite, what they need).
    """
    lam = preset.damping
    gn = "hessian" if model_name == "logreg" else "gauss_newton"
    solvers: list[Method] = [
        _calculator_method("exact", "hessian", lambda p: ExactHessian(damping=lam), preset)
    ]
    if model_name != "logreg":
        solvers.append(
            _calculator_method("exact-gn", gn, lambda p: ExactHessian(damping=lam), preset)
        )
    suffix = "" if model_name == "logreg" else "-gn"
    solvers += [
        _calculator_method(
            f"cg{suffix}",
            gn,
            lambda p: ConjugateGradient(damping=lam, max_iter=p.cg_max_iter),
            preset,
        ),
        _calculator_method(
            f"lissa{suffix}",
            gn,
            lambda p: LiSSA(damping=lam, depth=p.lissa_depth, batch_size=p.lissa_batch, seed=0),
            preset,
        ),
        _calculator_method(
            f"arnoldi{suffix}", gn, lambda p: Arnoldi(rank=p.arnoldi_rank, damping=lam), preset
        ),
        _calculator_method("kfac", "gauss_newton", lambda p: KFAC(), preset),
        _calculator_method("ekfac", "gauss_newton", lambda p: EKFAC(), preset),
    ]

    def tracin(problem: Problem, test: Any) -> torch.Tensor:
        rates = [preset.sgd_lr] * (len(problem.checkpoints) + 1)
        return tracin_cp(
            [*problem.checkpoints, problem.model],
            rates,
            problem.objective,
            problem.train,
            test,
            model=problem.model,
        )

    baselines = [
        _baseline(
            "grad_dot", "identity", lambda pr, t: grad_dot(pr.model, pr.objective, pr.train, t)
        ),
        _baseline(
            "grad_cosine",
            "identity",
            lambda pr, t: grad_cosine(pr.model, pr.objective, pr.train, t),
        ),
        _baseline("tracin_cp", "identity", tracin),
        _baseline(
            f"random_projection-{preset.projection_dim}",
            "empirical_fisher",
            lambda pr, t: random_projection(
                pr.model, pr.objective, pr.train, t, dim=preset.projection_dim, damping=lam, seed=0
            ),
        ),
    ]
    return solvers + baselines


# --------------------------------------------------------------------------- evaluation
def _nan_if_fails(fn: Callable[[], Any]) -> float:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = float(fn())
    except (InflError, ValueError, FloatingPointError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def evaluate(method: Method, problem: Problem) -> dict[str, Any]:
    """Run one method on one problem and score it against every ground truth."""
    n = problem.train[1].shape[0]
    row: dict[str, Any] = {
        "model": problem.name,
        "method": method.name,
        "kind": method.kind,
        "curvature": method.curvature,
        "params": count_parameters(problem.model),
        "n_train": n,
        "error": "",
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            scores = method.scores(problem, problem.test).detach().cpu().double()
            row["time_s"] = time.perf_counter() - start
            start = time.perf_counter()
            self_scores = method.self_scores(problem).detach().cpu().double()
            row["self_time_s"] = time.perf_counter() - start
    except (InflError, RuntimeError, ValueError) as err:
        row["error"] = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        return row
    effect = -scores / n  # predicted removal effect, [m, n]
    cols = torch.tensor(problem.removals)
    loo = problem.loo.corrected_change
    row["lds"] = _nan_if_fails(
        lambda: linear_datamodeling_score(effect, problem.subsets.masks, problem.subsets.outputs)
    )
    row["loo_pearson"] = _nan_if_fails(lambda: pearson(effect[:, cols], loo))
    row["loo_spearman"] = _nan_if_fails(lambda: spearman(effect[:, cols], loo))
    if PBRF_AVAILABLE and not isinstance(problem.pbrf, str) and problem.pbrf is not None:
        pbrf = problem.pbrf.corrected_change
        row["pbrf_pearson"] = _nan_if_fails(lambda: pearson(effect[:, cols], pbrf))
    detection = mislabel_detection(-self_scores, problem.flipped)
    row["mislabel_auc"] = detection.auc
    row["mislabel_ap"] = detection.average_precision
    return row


# --------------------------------------------------------------------------- report
COLUMNS = (
    "model",
    "method",
    "kind",
    "curvature",
    "time_s",
    "self_time_s",
    "lds",
    "loo_pearson",
    "loo_spearman",
    "pbrf_pearson",
    "mislabel_auc",
    "mislabel_ap",
    "error",
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.3g}"
    return "—" if value in (None, "") else str(value)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a markdown table (one row per model and method)."""
    cols = [c for c in COLUMNS if c != "pbrf_pearson" or any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, math.nan)) for c in cols) + " |")
    return "\n".join(lines)


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: r.get(c, "") for c in COLUMNS})
    return buffer.getvalue()


def write_figures(rows: Sequence[dict[str, Any]], out: Path) -> list[str]:
    """``figures/benchmark_<model>.png``: bars of LDS, LOO Pearson, mislabel AUC and time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is optional
        return []
    written = []
    panels = [
        ("lds", "LDS (Spearman)"),
        ("loo_pearson", "Pearson with LOO"),
        ("mislabel_auc", "mislabel AUC"),
        ("time_s", "time (s, log)"),
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        names = [r["method"] for r in mine]
        colors = ["tab:blue" if r["kind"] == "influence" else "tab:orange" for r in mine]
        fig, axes = plt.subplots(1, len(panels), figsize=(14, 0.35 * len(mine) + 1.5))
        for ax, (key, label) in zip(axes, panels, strict=True):
            values = [float(r.get(key, math.nan)) for r in mine]
            ax.barh(range(len(mine)), [0 if math.isnan(v) else v for v in values], color=colors)
            ax.set_yticks(range(len(mine)))
            ax.set_yticklabels(names if ax is axes[0] else [])
            ax.invert_yaxis()
            ax.set_title(label, fontsize=9)
            if key == "time_s":
                ax.set_xscale("log")
            elif key == "mislabel_auc":
                ax.axvline(0.5, color="grey", lw=0.8, ls="--")
        fig.suptitle(f"digits {model}: influence solvers (blue) and baselines (orange)")
        fig.tight_layout()
        path = out / "figures" / f"benchmark_{model}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path.relative_to(out)))
    return written


@dataclass(frozen=True)
class BenchmarkRun:
    """What :func:`run_benchmark` produced."""

    rows: list[dict[str, Any]]
    table: str
    out_dir: str
    seconds: float
    figures: list[str]


def run_benchmark(
    preset: BenchmarkPreset,
    out_dir: str | Path,
    *,
    models: Sequence[str] = MODELS,
    progress: bool = True,
    figures: bool = True,
) -> BenchmarkRun:
    """Run (or resume) the benchmark and write ``benchmark.{md,csv,json}`` and figures.

    Parameters
    ----------
    preset
        :data:`PRESETS` ``["tiny" | "quick" | "full"]`` or a modified copy.
    out_dir
        Results directory: ``cells/`` (one JSON per finished model and method, the trained
        models), ``retrain/`` (the retraining stores), ``benchmark.md``, ``benchmark.csv``,
        ``benchmark.json`` and ``figures/benchmark_<model>.png``. A directory written with
        other settings is refused (:class:`~infl.errors.StoreMismatchError`).
    models
        A subset of :data:`MODELS`.
    progress
        Progress bars over retrains.
    figures
        Write the PNG figures (needs matplotlib).
    """
    bad = sorted(set(models) - set(MODELS))
    if bad or not models:
        raise InflError(f"models must be among {list(MODELS)}, got {list(models)}")
    start = time.perf_counter()
    out = Path(out_dir)
    store = Store(out, preset.config(), records="cells")
    rows: list[dict[str, Any]] = []
    with torch.random.fork_rng():
        for name in models:
            todo = methods(name, preset)
            loaded = {m.name: store.load_json(f"row-{name}-{m.name}") for m in todo}
            problem: Problem | None = None
            for method in todo:
                row = loaded[method.name]
                if row is None:
                    if problem is None:
                        problem = _problem(name, preset, store)
                        _ground_truth(problem, preset, out, progress)
                    row = evaluate(method, problem)
                    store.save_json(f"row-{name}-{method.name}", row)
                rows.append(row)
    seconds = time.perf_counter() - start
    text = table(rows)
    note = (
        ""
        if PBRF_AVAILABLE
        else "\nNo PBRF column: this infl's RetrainConfig has no target='pbrf'.\n"
    )
    header = (
        f"# infl benchmark ({preset.name})\n\nDigits, n_train={preset.n_train or 'all'} with "
        f"{preset.flip_fraction:.0%} of labels flipped, {preset.n_test} test points, "
        f"{preset.loo_removals} leave-one-out retrains, {preset.lds_subsets} LDS subsets, "
        f"damping {preset.damping}. Scores are read as removal effects -scores/n; "
        "mislabel detection ranks by negated self-scores. Times on this machine.\n"
        f"{note}\n"
    )
    write_atomic(out / "benchmark.md", header + text + "\n")
    write_atomic(out / "benchmark.csv", _csv(rows))
    write_atomic(
        out / "benchmark.json",
        json.dumps({"preset": preset.config(), "rows": rows}, indent=1, default=str),
    )
    written = write_figures(rows, out) if figures else []
    return BenchmarkRun(rows, text, str(out), seconds, written)
