"""Diagnose the curvature of an Iris MLP before trusting its influence scores.

1. Train a small ReLU MLP (4 -> 5 -> 5 -> 3, float64) on Iris.
2. Compute the exact Hessian spectrum: top eigenvalue, negative eigenvalues, condition number.
3. Ask for solver advice: the damping that makes H + damping*I positive definite, a LiSSA scale
   that converges and the depth for a tolerance.
4. Run LiSSA with the advice and compare it with the exact inverse-HVP: cosine similarity,
   relative error and the Spearman correlation of the influence scores.
5. Show what a too-small LiSSA scale looks like (the iterate norm explodes).
6. Save the figures as PNGs.

Run (about 10 s on a laptop CPU)::

    python examples/diagnose_curvature.py [output_dir]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib
import torch
from sklearn.datasets import load_iris
from torch import nn

from infl import ExactHessian, HessianOperator, IndexedData, LiSSA, ModelWrapper, Objective
from infl.diagnostics import advise, hessian_spectrum, lissa_trace, solver_agreement
from infl.objective import loss_measurement
from infl.plotting import (
    plot_convergence,
    plot_lissa_norms,
    plot_predicted_vs_actual,
    plot_spectrum,
)

matplotlib.use("Agg")


def main(out_dir: Path) -> None:
    # A 73-parameter model: one thread is fastest, and avoids oversubscribing a busy CPU.
    torch.set_num_threads(1)
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    # 1. data and model ----------------------------------------------------------------------
    x_np, y_np = load_iris(return_X_y=True)
    x = torch.tensor(x_np, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(y_np)
    perm = torch.randperm(150, generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = perm[:120], perm[120:]
    model = nn.Sequential(
        nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3)
    ).to(torch.float64)
    objective = Objective("cross_entropy", weight_decay=1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(1500):
        opt.zero_grad()
        out = model(x[train_idx])
        loss = nn.functional.cross_entropy(out, y[train_idx])
        (loss + 0.5e-3 * sum((p * p).sum() for p in model.parameters())).backward()
        opt.step()
    model.eval()
    train = (x[train_idx], y[train_idx])
    test = (x[test_idx[:5]], y[test_idx[:5]])

    # 2. spectrum ----------------------------------------------------------------------------
    wrapper = ModelWrapper(model, objective)
    hessian = HessianOperator(wrapper, IndexedData(train))
    spectrum = hessian_spectrum(hessian)  # p = 73: the exact, dense spectrum
    print(spectrum.summary())
    plot_spectrum(spectrum).savefig(out_dir / "spectrum.png")

    # 3. advice ------------------------------------------------------------------------------
    # Aim for a condition number of at most 50: damping >= lambda_max / 50, and never below
    # the minimum that makes H + damping*I positive definite.
    damping = max(advise(spectrum).suggested_damping, spectrum.lambda_max / 50)
    advice = advise(spectrum, damping=damping, tol=1e-3)
    print(advice.summary())

    # 4. agreement ---------------------------------------------------------------------------
    test_grads = wrapper.per_example_grads(loss_measurement(objective), test)
    train_grads = wrapper.train_grads(train)
    report = solver_agreement(
        hessian,
        test_grads,
        {"exact": ExactHessian(damping=damping), "lissa (advised)": LiSSA.advised(advice)},
        train_grads=train_grads,
    )
    print(report.table())
    exact_scores = -report.results["exact"].value @ train_grads.T
    lissa_scores = -report.results["lissa (advised)"].value @ train_grads.T
    plot_predicted_vs_actual(
        lissa_scores,
        exact_scores,
        title="LiSSA (advised scale/depth) vs exact influence",
        xlabel="influence, exact inverse-HVP",
        ylabel="influence, LiSSA",
    ).savefig(out_dir / "lissa_vs_exact.png")

    # 5. convergence, and divergence below lambda_max/2 ---------------------------------------
    good = lissa_trace(hessian, test_grads[:1], scale=advice.scale, depth=advice.depth or 1,
                       damping=damping)  # fmt: skip
    bad = lissa_trace(hessian, test_grads[:1], scale=0.4 * advice.mu_max, depth=300,
                      damping=damping)  # fmt: skip
    print(
        f"LiSSA at the advised scale {advice.scale:.3g}: final residual "
        f"{good.residuals[-1, 0]:.2e}; at scale {0.4 * advice.mu_max:.3g} (< lambda_max/2): "
        f"diverged={bad.diverged} after {bad.steps} steps"
    )
    plot_convergence(
        {"LiSSA advised": good, "LiSSA scale too small": bad},
        tol=advice.tol,
        title="LiSSA relative residual per step",
    ).savefig(out_dir / "lissa_residuals.png")
    exact_norm = float(report.results["exact"].value[0].norm())
    plot_lissa_norms(
        {f"scale={advice.scale:.3g} (advised)": good, f"scale={0.4 * advice.mu_max:.3g}": bad},
        reference_norm=exact_norm,
    ).savefig(out_dir / "lissa_norms.png")
    print(f"figures in {out_dir}/ ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("diagnose_curvature_out"))
