"""LiSSA: where the time goes, old loop versus new, and minibatch accuracy at equal HVP budget.

The two models of issue 12, float64, right-hand sides = the loss gradients of 2 test points,
scores = all training points x 2 test points:

* Iris MLP 4-5-3 (p = 43, n = 120), full-batch SGD (``infl.studies.fragility.train_full_batch``);
* digits CNN (``infl.studies.models.small_cnn``, p = 2,514, n = 1,438), minibatch SGD.

Parts (``--parts``):

``speed``
    The LiSSA loop of a baseline ``lissa.py`` (``--baseline``: a copy of the file before the
    change, e.g. ``git show <rev>:src/infl/solvers/lissa.py > /tmp/base_lissa/lissa.py``),
    loaded beside the current one in the same process and run back to back on the same
    operator: Iris full batch (depth ``--iris-depth``, 5000), the CNN with minibatches of 128
    (depth ``--cnn-depth``). Prints seconds and the ratio old/new, and the *floor*: the same
    products in a bare Python loop (the HVPs needed x the time of one), plus one
    per-example-gradient pass.
``variants``
    Minibatch LiSSA on the CNN at equal HVP budget (counted in examples processed): plain,
    tail-averaged iterates (``average=True``), the control variate (``snapshot_every``), both,
    and a growing batch (not adopted; written out here),
    at the full-data and the minibatch-aware ``scale="auto"``; Pearson of the scores and
    relative error of the inverse-HVP against the reference (dense solve / CG to 1e-10).

Run:  python benchmarks/bench_lissa.py --baseline /tmp/base_lissa/lissa.py
The trained CNN and its CG reference are cached in ``--cache`` (default /tmp/bench_lissa).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import infl
from infl import HessianOperator, IndexedData, ModelWrapper, Objective
from infl.spectral import estimate_extreme_eigenvalues
from infl.studies.datasets import load_digits, load_iris
from infl.studies.fragility import train_full_batch, train_minibatch
from infl.studies.models import mlp, small_cnn

WEIGHT_DECAY = 1e-3
DAMPING = 0.01


def build(name: str, cache: Path) -> tuple[ModelWrapper, IndexedData, torch.Tensor]:
    """``(wrapper, training data, rhs [2, p])`` for ``"iris"`` or ``"cnn"`` (trained once)."""
    cache.mkdir(parents=True, exist_ok=True)
    if name == "iris":
        split = load_iris(seed=0, dtype=torch.float64)
        model = mlp(4, 3, width=5, depth=1, seed=0).double()
        train_full_batch(model, split.train, WEIGHT_DECAY, 3000, 0.05, 0.9)
    else:
        split = load_digits(seed=0, images=True, dtype=torch.float64)
        model = small_cnn(10, seed=0).double()
        path = cache / "cnn.pt"
        if path.exists():
            model.load_state_dict(torch.load(path))
        else:
            train_minibatch(model, split.train, WEIGHT_DECAY, 15, 64, 0.05, 0)
            torch.save(model.state_dict(), path)
    model.eval()
    wrapper = ModelWrapper(model, Objective("cross_entropy", WEIGHT_DECAY))
    rhs = wrapper.train_grads((split.x_test[:2], split.y_test[:2]))
    return wrapper, IndexedData(split.train), rhs


def exact_reference(name: str, op: HessianOperator, rhs: torch.Tensor, cache: Path) -> Any:
    """``(exact inverse-HVP [2, p], train grads [n, p], top eigenvalue of H)`` at ``DAMPING``.

    Iris: a dense solve. CNN: conjugate gradients to a relative residual of 1e-10 (checked),
    cached in ``cache`` (a dense CNN Hessian is 2,514 HVPs, far more than CG needs).
    """
    if name == "iris":
        dense = op.to_dense()
        eye = torch.eye(dense.shape[0], dtype=dense.dtype)
        exact = torch.linalg.solve(dense + DAMPING * eye, rhs.T).T
        top = float(torch.linalg.eigvalsh(dense)[-1])
    else:
        path = cache / f"{name}_reference.pt"
        if path.exists():
            exact, top = torch.load(path)
        else:
            result = infl.ConjugateGradient(damping=DAMPING, rtol=1e-10, max_iter=2000).solve(
                op, rhs
            )
            if not result.converged:
                raise RuntimeError(f"the CG reference did not converge: {result.residual_norms}")
            exact = result.value
            top = estimate_extreme_eigenvalues(op, max_iter=40)[0]
            torch.save((exact, top), path)
    grads = torch.cat([g for _, g in op.wrapper.iter_train_grads(op.data, 256)])
    return exact, grads, top


def pearson_scores(value: torch.Tensor, exact: torch.Tensor, grads: torch.Tensor) -> float:
    a, b = (value @ grads.T).flatten(), (exact @ grads.T).flatten()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def rel_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((value - exact).norm(dim=1) / exact.norm(dim=1)).max())


def load_baseline(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("baseline_lissa", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_lissa"] = module  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


def seconds(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def speed(args: argparse.Namespace, cache: Path) -> list[dict[str, Any]]:
    old = load_baseline(args.baseline)
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        rows += speed_one(name, old, args, cache)
    return rows


def speed_one(name: str, old: Any, args: argparse.Namespace, cache: Path) -> list[dict[str, Any]]:
    """Old and new LiSSA back to back on one model, then the floor."""
    rows = []
    wrapper, data, rhs = build(name, cache)
    op = HessianOperator(wrapper, data, 256)
    exact, grads, top = exact_reference(name, op, rhs, cache)
    top += DAMPING
    if name == "iris":
        kw: dict[str, Any] = {"depth": args.iris_depth, "batch_size": None}
    else:
        kw = {"depth": args.cnn_depth, "batch_size": 128}
    kw.update(damping=DAMPING, scale=1.5 * top, rtol=1e-30)
    new_kw = dict(kw, dense=False) if name == "cnn" else dict(kw)
    runs = {
        "old": lambda: old.LiSSA(**kw).fit(op).solve(rhs),
        "new": lambda: infl.LiSSA(**new_kw).fit(op).solve(rhs),
    }
    if name == "iris":
        runs["new, matrix-free"] = lambda: infl.LiSSA(**kw, dense=False).fit(op).solve(rhs)
    times: dict[str, float] = {}
    for label, run in runs.items():  # back to back, same operator, same process
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", infl.InflWarning)
            op.num_matvecs = 0
            t, result = seconds(run)
        times[label] = t
        rows.append(
            {
                "model": name,
                "run": label,
                "seconds": round(t, 3),
                "hvp_vectors": op.num_matvecs,
                "pearson_vs_exact": round(pearson_scores(result.value, exact, grads), 5),
                "rel_error": rel_error(result.value, exact),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    # the floor: the same products in a bare loop (the same minibatch draws), plus one
    # per-example-gradient pass over the training data
    def bare() -> None:
        gen, x = torch.Generator().manual_seed(0), rhs.clone()
        for _ in range(kw["depth"]):
            step = op if kw["batch_size"] is None else op.subsample(kw["batch_size"], gen)
            x = rhs + x - step.damped(DAMPING).matmat(x) / kw["scale"]

    t_bare = seconds(bare)[0]
    t_grads = seconds(lambda: [wrapper.train_grads(b) for _, b in data.chunks(256)])[0]
    floor = t_bare + t_grads
    rows.append(
        {
            "model": name,
            "bare_loop_s": round(t_bare, 3),
            "grad_pass_s": t_grads,
            "matrix_free_floor_s": round(floor, 3),
            "old_over_new": round(times["old"] / times["new"], 2),
            "new_over_floor": round(times["new"] / floor, 3),
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    return rows


def _growing_batch(op: Any, rhs: torch.Tensor, scale: float, steps: int, batch: int) -> Any:
    """The candidate not adopted, written out here: a batch growing by 4/steps per step."""
    gen = torch.Generator().manual_seed(0)
    x, used, size = rhs.clone(), 0.0, float(batch)
    while used < steps:
        b = min(len(op.base.data), int(size))
        x = rhs + x - op.subsample(b, gen).matmat(x) / scale
        used += b / batch
        size *= 1.0 + 4.0 / steps
    return x / scale


def variants(args: argparse.Namespace, cache: Path) -> list[dict[str, Any]]:
    wrapper, data, rhs = build("cnn", cache)
    op = HessianOperator(wrapper, data, 256)
    exact, grads, top = exact_reference("cnn", op, rhs, cache)
    batch, budget, n = 128, args.budget, len(data)
    top += DAMPING
    auto = infl.LiSSA(damping=DAMPING, batch_size=batch, depth=1).fit(op)
    scales = {"1.2 x full-data top": 1.2 * top, "auto (minibatch-aware)": auto.scale}
    rows = []
    for scale_name, scale in scales.items():
        for how in args.variants.split(","):
            if how == "grow":
                t, value = seconds(
                    lambda s=scale: _growing_batch(op.damped(DAMPING), rhs, s, budget, batch)  # type: ignore[misc]
                )
            else:
                kw: dict[str, Any] = {"depth": budget, "average": how.endswith("average")}
                if how.startswith("cv"):
                    m = int(how[2:].split("+")[0] or math.ceil(n / batch))
                    # equal budget: each anchor's full-data HVP costs n / batch steps
                    kw.update(snapshot_every=m, depth=max(1, int(budget / (1 + n / (batch * m)))))
                solver = infl.LiSSA(
                    damping=DAMPING, scale=scale, batch_size=batch, rtol=1e-30, **kw
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", infl.InflWarning)
                    t, value = seconds(lambda s=solver: s.fit(op).solve(rhs).value)
            row = {
                "scale": scale_name,
                "sigma": round(scale, 3),
                "variant": how,
                "budget_steps": budget,
                "pearson_vs_exact": round(pearson_scores(value, exact, grads), 4),
                "rel_error": round(rel_error(value, exact), 4),
                "seconds": round(t, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="speed,variants")
    parser.add_argument("--baseline", default="/tmp/base_lissa/lissa.py")
    parser.add_argument("--models", default="iris,cnn")
    parser.add_argument("--iris-depth", type=int, default=5000)
    parser.add_argument("--cnn-depth", type=int, default=1000)
    parser.add_argument("--budget", type=int, default=2000, help="minibatch steps (b = 128)")
    parser.add_argument(
        "--variants",
        default="plain,average,grow,cv,cv46,cv+average",
        help="plain | average | grow | cv[m][+average] (m = snapshot_every, default n/b)",
    )
    parser.add_argument("--cache", default="/tmp/bench_lissa")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    rows: list[dict[str, Any]] = []
    if "speed" in args.parts:
        rows += speed(args, cache)
    if "variants" in args.parts:
        rows += variants(args, cache)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
