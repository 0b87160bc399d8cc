"""K-FAC / EK-FAC with ``mc_samples="exact"``: the expectation over the labels, against brute force.

The references sum over every label value (and, for a multi-location output, every joint
labelling) weighted by the model's probabilities, with plain autograd and no infl code.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from infl import (
    EKFAC,
    KFAC,
    HessianOperator,
    IndexedData,
    InputError,
    ModelWrapper,
    Objective,
)
from infl.solvers import kronecker
from problems import WithLayerNorm

pytestmark = pytest.mark.usefixtures("float64_default")


def fit(model, x, y, solver, *, loss="cross_entropy", chunk_size=7):
    wrapper = ModelWrapper(model, Objective(loss, 0.0))
    return solver.fit(HessianOperator(wrapper, IndexedData((x, y)), chunk_size))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(27, 4)
    )


def brute_force_factors(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``S`` per layer: (1/n) sum_i sum_k p_ik (1/T) sum_t g_ikt g_ikt^T over all labels k.

    ``g_ikt`` is the gradient of ``cross_entropy(f(x_i), k)`` in the layer's output at location
    ``t``, read from ``retain_grad`` on the layer outputs (examples do not interact).
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    outs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o))
        for n, m in layers.items()
    ]
    n = x.shape[0]
    S = {name: torch.zeros(m.weight.shape[0], m.weight.shape[0]) for name, m in layers.items()}
    try:
        for k in range(model(x).shape[1]):
            logits = model(x)
            for o in outs.values():
                o.retain_grad()
            p_k = torch.softmax(logits, 1)[:, k].detach()
            F.cross_entropy(logits, torch.full((n,), k), reduction="sum").backward()
            for name, o in outs.items():
                g = o.grad.reshape(n, o.shape[1], -1).transpose(1, 2)  # [n, T, out]
                weighted = g * p_k.sqrt()[:, None, None]
                flat = weighted.reshape(-1, g.shape[2])
                S[name] += flat.T @ flat / (n * g.shape[1])
    finally:
        for h in hooks:
            h.remove()
    return S


@pytest.mark.parametrize("make", [mlp, cnn])
def test_exact_s_factor_is_the_sum_over_all_labels(make):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(9, 4) if make is mlp else torch.randn(9, 2, 5, 5)
    y = torch.randint(0, 3, (9,))
    fitted = fit(model, x, y, KFAC(mc_samples="exact", damping=0.1), chunk_size=4)
    expected = brute_force_factors(model, x)
    for ly in fitted.partition.layers:
        torch.testing.assert_close(ly.S, expected[ly.name], rtol=1e-12, atol=1e-14)
    # the activations' factor does not depend on the labels
    sampled = fit(model, x, y, KFAC(damping=0.1), chunk_size=4)
    for a, b in zip(fitted.partition.layers, sampled.partition.layers, strict=True):
        torch.testing.assert_close(a.A, b.A, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("route", ["rotate", "form"])
def test_exact_ekfac_eigenvalues_are_the_sum_over_all_labels(monkeypatch, route):
    """Lambda = (1/n) sum_i sum_k p_ik (Q_S^T G_ik Q_A)^2, G_ik the per-example weight grads,
    by either route of the pass (rotate the locations first, or form G_i first)."""
    monkeypatch.setattr(kronecker, "eigen_route", lambda t, o, i: route if t > 1 else "rotate")
    torch.manual_seed(1)
    model, x = cnn(), torch.randn(8, 2, 5, 5)
    fitted = fit(model, x, torch.zeros(8, dtype=torch.long), EKFAC(mc_samples="exact"))
    conv, lin = model[0], model[3]
    for ly, layer in ((fitted.partition.layers[0], conv), (fitted.partition.layers[1], lin)):
        expected = torch.zeros(ly.out_dim, ly.in_dim)
        for i in range(8):
            logits = model(x[i : i + 1])
            probs = torch.softmax(logits, 1)[0].detach()
            for k in range(4):
                loss = F.cross_entropy(logits, torch.tensor([k]))
                gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias], retain_graph=True)
                grad = torch.cat([gw.reshape(ly.out_dim, -1), gb[:, None]], dim=1)
                expected += probs[k] * (ly.Q_S.T @ grad @ ly.Q_A) ** 2 / 8
        torch.testing.assert_close(ly.eigen_diag, expected, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("solver_cls", [KFAC, EKFAC])
def test_one_example_one_linear_layer_is_the_exact_hessian(solver_cls):
    """A linear model's cross-entropy Hessian is (diag(p) - p p^T) ⊗ [x;1][x;1]^T: K-FAC with the
    exact expectation reproduces it for one example (sampled labels do not)."""
    torch.manual_seed(2)
    model, x = nn.Linear(4, 3), torch.randn(1, 4)
    fitted = fit(model, x, torch.tensor([1]), solver_cls(mc_samples="exact", damping=0.1))
    p = torch.softmax(model(x), 1)[0].detach()
    xt = torch.cat([x[0], torch.ones(1)])
    kron = torch.kron(torch.diag(p) - torch.outer(p, p), torch.outer(xt, xt))  # [out*in]^2
    # infl's flat order: weight row-major [out, 4], then bias [out]
    order = [o * 5 + i for o in range(3) for i in range(4)] + [o * 5 + 4 for o in range(3)]
    hessian = kron[order][:, order]
    torch.testing.assert_close(fitted.curvature.to_dense(), hessian, rtol=1e-12, atol=1e-14)
    sampled = fit(model, x, torch.tensor([1]), solver_cls(mc_samples=1, damping=0.1))
    assert rel(sampled.curvature.to_dense(), hessian) > 0.1


@pytest.mark.parametrize(("loss", "outputs"), [("bce_with_logits", 2), ("mse", 3)])
def test_exact_last_layer_s_is_the_output_hessian(loss, outputs):
    """Last Linear layer: S = mean_i H_f(x_i); bce sigma(1 - sigma) on the diagonal, mse 2 I."""
    torch.manual_seed(3)
    model, x = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, outputs)), torch.randn(10, 3)
    fitted = fit(model, x, torch.zeros(10, outputs), KFAC(mc_samples="exact"), loss=loss)
    if loss == "mse":
        expected = 2 * torch.eye(outputs)
    else:
        s = torch.sigmoid(model(x)).detach()
        expected = torch.diag((s * (1 - s)).mean(0))
    torch.testing.assert_close(fitted.partition.layers[1].S, expected, rtol=1e-12, atol=1e-14)


def test_multi_location_cross_entropy_matches_all_joint_labellings():
    """Per-pixel classification: labels at different locations are independent, and the exact
    factors equal the average over all C^L joint labellings (2^4 here) of the sampled ones."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Conv2d(2, 2, 1))  # [b, 2, 2, 2] out
    x = torch.randn(3, 1, 3, 3)
    y = torch.zeros(3, 2, 2, dtype=torch.long)
    fitted = fit(model, x, y, KFAC(mc_samples="exact", damping=0.1))
    first, last = model[0], model[2]
    expected = {"0": torch.zeros(2, 2), "2": torch.zeros(2, 2)}
    outs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o))
        for n, m in (("0", first), ("2", last))
    ]
    try:
        for i in range(3):
            probs = torch.softmax(model(x[i : i + 1]), 1)[0].detach().reshape(2, 4)
            for labels in itertools.product(range(2), repeat=4):
                weight = torch.prod(torch.stack([probs[k, t] for t, k in enumerate(labels)]))
                target = torch.tensor(labels).reshape(1, 2, 2)
                out = model(x[i : i + 1])  # [1, 2, 2, 2]
                grads = torch.autograd.grad(
                    F.cross_entropy(out, target, reduction="sum"), [outs["0"], outs["2"]]
                )
                for name, g in zip(("0", "2"), grads, strict=True):
                    flat = g[0].reshape(2, -1).T  # [T, out]
                    expected[name] += weight * flat.T @ flat / (3 * flat.shape[0])
    finally:
        for h in hooks:
            h.remove()
    for ly in fitted.partition.layers:
        torch.testing.assert_close(ly.S, expected[ly.name], rtol=1e-11, atol=1e-14)


def test_monte_carlo_converges_to_the_exact_expectation():
    torch.manual_seed(5)
    model, x = mlp(), torch.randn(20, 4)
    y = torch.randint(0, 3, (20,))
    exact = fit(model, x, y, EKFAC(mc_samples="exact", damping=0.1), chunk_size=20)
    errors = {}
    for mc in (1, 16, 256):
        approx = fit(model, x, y, KFAC(mc_samples=mc, seed=1, damping=0.1), chunk_size=20)
        errors[mc] = max(
            rel(a.S, b.S)
            for a, b in zip(approx.partition.layers, exact.partition.layers, strict=True)
        )
    print(f"max relative error of S vs exact: {errors}")
    # unbiased draws: the error shrinks like 1/sqrt(mc) (16x the draws: about 4x smaller)
    assert errors[256] < 0.04
    assert errors[256] < errors[16] / 2
    assert errors[16] < errors[1]


def test_exact_diagonal_blocks_are_the_expected_squared_gradients():
    """unsupported='diagonal': diag = (1/n) sum_i sum_k p_ik (d l(x_i, k) / d theta_j)^2."""
    torch.manual_seed(6)

    model, x = WithLayerNorm(), torch.randn(7, 4)
    solver = KFAC(mc_samples="exact", unsupported="diagonal", damping=0.1)
    fitted = fit(model, x, torch.zeros(7, dtype=torch.long), solver, chunk_size=3)
    params = [model.ln.weight, model.ln.bias]
    expected = torch.zeros(6)
    for i in range(7):
        logits = model(x[i : i + 1])
        probs = torch.softmax(logits, 1)[0].detach()
        for k in range(3):
            g = torch.autograd.grad(
                F.cross_entropy(logits, torch.tensor([k])), params, retain_graph=True
            )
            expected += probs[k] * torch.cat(g) ** 2 / 7
    got = torch.cat([blk.diag for blk in fitted.partition.diagonal])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_exact_is_deterministic_and_chunk_invariant():
    torch.manual_seed(7)
    model, x = cnn(), torch.randn(11, 2, 5, 5)
    y = torch.randint(0, 4, (11,))
    a = fit(model, x, y, EKFAC(mc_samples="exact", seed=0, damping=0.1), chunk_size=4)
    b = fit(model, x, y, EKFAC(mc_samples="exact", seed=9, damping=0.1), chunk_size=11)
    for la, lb in zip(a.partition.layers, b.partition.layers, strict=True):
        torch.testing.assert_close(la.S, lb.S, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(la.eigen_diag, lb.eigen_diag, rtol=1e-10, atol=1e-14)
    assert a.info["mc_samples"] == "exact"


@pytest.mark.parametrize("bad", ["exac", 0, 2.0, True])
def test_bad_mc_samples(bad):
    with pytest.raises(InputError, match=r"mc_samples.*'exact'"):
        KFAC(mc_samples=bad)
