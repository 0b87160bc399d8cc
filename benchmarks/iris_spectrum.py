"""Top Hessian eigenvalue and negative-eigenvalue count of Iris MLPs of depth 1, 4 and 8.

Basu et al. (2021) relate the fragility of influence functions in deep networks to curvature:
the top eigenvalue grows with depth and negative eigenvalues appear. This script measures both
on the setting of their Iris experiments: MLPs of width 5 with ReLU, trained full-batch (Adam,
then L-BFGS) to near convergence in float64 on all 150 standardised examples. The spectra are
exact (dense Hessian, ``p`` HVPs; p <= 253), with a Lanczos cross-check of the top eigenvalue.

Run::

    python benchmarks/iris_spectrum.py                    # weight decay 0.001
    python benchmarks/iris_spectrum.py --weight-decay 0   # no weight decay
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from infl import HessianOperator, IndexedData, ModelWrapper, Objective
from infl.diagnostics import Spectrum, hessian_spectrum


def iris_data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    xt = torch.tensor(x, dtype=torch.float64)
    xt = (xt - xt.mean(0)) / xt.std(0)
    return xt, torch.tensor(y)


def make_mlp(depth: int, width: int = 5, seed: int = 0) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` ReLU units, 4 inputs, 3 outputs (float64)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    fan_in = 4
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 3))
    return nn.Sequential(*layers).to(torch.float64)


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float
) -> tuple[float, float]:
    """Full-batch Adam then L-BFGS on mean CE + wd/2 ||theta||^2; returns (loss, grad norm)."""
    params = list(model.parameters())

    def objective() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        return loss + 0.5 * weight_decay * sum((p * p).sum() for p in params)

    adam = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3000):
        adam.zero_grad()
        objective().backward()
        adam.step()
    lbfgs = torch.optim.LBFGS(
        params, lr=1.0, max_iter=3000, tolerance_grad=1e-12, tolerance_change=1e-15,
        history_size=50, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        value = objective()
        value.backward()
        return value

    lbfgs.step(closure)
    value = closure()
    grad_norm = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None]).norm()
    return float(value.detach()), float(grad_norm)


def spectrum_for_depth(depth: int, weight_decay: float, seed: int = 0) -> tuple[Spectrum, dict]:
    """Train, retrying seeds whose deep ReLU net gets stuck (train accuracy <= 0.9)."""
    x, y = iris_data()
    for attempt in range(seed, seed + 5):
        model = make_mlp(depth, seed=attempt)
        loss, grad_norm = train(model, x, y, weight_decay)
        if float((model(x).argmax(1) == y).double().mean()) > 0.9:
            break
    model.eval()
    op = HessianOperator(
        ModelWrapper(model, Objective("cross_entropy", weight_decay)), IndexedData((x, y))
    )
    start = time.perf_counter()
    spec = hessian_spectrum(op, method="dense")
    dense_s = time.perf_counter() - start
    start = time.perf_counter()
    lz = hessian_spectrum(op, k=1, method="lanczos", max_iter=min(op.size, 60), tol=1e-10)
    lanczos_s = time.perf_counter() - start
    acc = float((model(x).argmax(1) == y).double().mean())
    facts = {
        "p": op.size,
        "seed": attempt,
        "loss": loss,
        "grad_norm": grad_norm,
        "train_acc": acc,
        "lanczos_top": lz.lambda_max,
        "lanczos_hvps": lz.num_matvecs,
        "dense_s": dense_s,
        "lanczos_s": lanczos_s,
    }
    return spec, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest (and robust to a busy CPU)
    print(f"Iris MLPs, width 5, ReLU, float64, weight_decay={args.weight_decay:g}")
    print(
        f"{'depth':>5} {'seed':>4} {'p':>4} {'loss':>9} {'|grad|':>8} {'acc':>5} "
        f"{'lambda_max':>11} {'lanczos':>11} {'lambda_min':>11} {'#neg':>5} {'neg.mass%':>9} "
        f"{'#zero':>5}"
    )
    for depth in args.depths:
        s, f = spectrum_for_depth(depth, args.weight_decay, args.seed)
        print(
            f"{depth:>5} {f['seed']:>4} {f['p']:>4} {f['loss']:>9.4g} {f['grad_norm']:>8.1e} "
            f"{f['train_acc']:>5.2f} {s.lambda_max:>11.5g} {f['lanczos_top']:>11.5g} "
            f"{s.lambda_min:>11.4g} {s.num_negative:>5d} "
            f"{100 * s.negative_mass_fraction:>9.3g} {s.num_near_zero:>5d}",
            flush=True,
        )


if __name__ == "__main__":
    main()
