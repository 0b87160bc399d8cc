"""K-FAC and EK-FAC: factors against independent references, exact limits, damping, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference
from infl import (
    EKFAC,
    KFAC,
    ConjugateGradient,
    DenseOperator,
    HessianOperator,
    IndexedData,
    InfluenceCalculator,
    InputError,
    ModelWrapper,
    NonFiniteError,
    NotPositiveDefiniteError,
    Objective,
    layer_grads,
)
from infl.solvers import kronecker
from problems import WithLayerNorm

pytestmark = pytest.mark.usefixtures("float64_default")


# ------------------------------------------------------------------ independent references
def per_example_grads(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    """``[n, p]`` by a Python loop of ``torch.autograd.grad`` (no infl, no vmap)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def fit(model, x, y, solver, *, loss="cross_entropy", wd=0.0, chunk_size=7, data=None):
    wrapper = ModelWrapper(model, Objective(loss, wd))
    op = HessianOperator(wrapper, data if data is not None else IndexedData((x, y)), chunk_size)
    return solver.fit(op), op


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1) - a.mean(), b.reshape(-1) - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 4),
    )


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )


class CountingData(IndexedData):
    """IndexedData that counts the passes made over it."""

    passes = 0

    def chunks(self, chunk_size, *, skip=0):
        type(self).passes += 1
        return super().chunks(chunk_size, skip=skip)


# ------------------------------------------------------------------ factors
def test_factors_invariant_to_chunk_size():
    torch.manual_seed(1)
    x, y = torch.randn(11, 2, 5, 5), torch.randint(0, 4, (11,))
    model = small_cnn()
    a, _ = fit(model, x, y, EKFAC(fisher="empirical", damping=0.1), chunk_size=4)
    b, _ = fit(model, x, y, EKFAC(fisher="empirical", damping=0.1), chunk_size=11)
    for la, lb in zip(a.partition.layers, b.partition.layers, strict=True):
        torch.testing.assert_close(la.A, lb.A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(la.S, lb.S, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(la.eigen_diag, lb.eigen_diag, rtol=1e-10, atol=1e-14)
    v = torch.randn(3, a.base.size)
    torch.testing.assert_close(a.solve(v).value, b.solve(v).value, rtol=1e-9, atol=1e-12)


def test_conv_and_linear_factors_match_unfold_reference():
    """A = mean_i sum_t [a;1][a;1]^T over unfold patches; S = mean_i mean_t g g^T."""
    torch.manual_seed(2)
    x, y = torch.randn(9, 2, 5, 5), torch.randint(0, 4, (9,))
    model = small_cnn()
    fitted, _ = fit(model, x, y, KFAC(fisher="empirical", damping=0.1), chunk_size=4)
    conv, lin = model[0], model[3]
    z = conv(x)  # [n, 3, 3, 3]
    z.retain_grad()
    h = torch.tanh(z).flatten(1)
    h.retain_grad()
    out = lin(h)
    out.retain_grad()
    ce(out, y).sum().backward()
    n = x.shape[0]
    patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2)  # [n, 9, 18]
    patches = torch.cat([patches, torch.ones(n, 9, 1)], dim=2).reshape(-1, 19)
    grads = z.grad.reshape(n, 3, 9).transpose(1, 2).reshape(-1, 3)
    a_ref = patches.T @ patches / n
    s_ref = grads.T @ grads / (n * 9)
    conv_block, lin_block = fitted.partition.layers
    assert conv_block.name == "0"
    assert lin_block.name == "3"
    torch.testing.assert_close(conv_block.A, a_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(conv_block.S, s_ref, rtol=1e-12, atol=1e-14)
    h1 = torch.cat([h.detach(), torch.ones(n, 1)], dim=1)
    torch.testing.assert_close(lin_block.A, h1.T @ h1 / n, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lin_block.S, out.grad.T @ out.grad / n, rtol=1e-12, atol=1e-14)


def test_bias_free_conv_called_twice_matches_per_example_reference():
    """A bias-free convolution applied twice per forward pass (its locations joined) and one
    applied once: A against unfold patches, EK-FAC's eigenvalues against per-example
    gradients by autograd, by either route of the eigenvalue pass."""
    torch.manual_seed(6)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
            self.head = nn.Linear(2 * 16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(1))

    model, x, y = Twice(), torch.randn(7, 2, 4, 4), torch.randint(0, 3, (7,))
    h1 = torch.tanh(model.conv(x))
    patches = torch.cat(
        [F.unfold(t, 3, padding=1).transpose(1, 2) for t in (x, h1)], dim=1
    )  # [n, 32, 18]: both calls' locations
    a_ref = torch.einsum("bti,btj->ij", patches, patches) / 7
    grads = per_example_grads(model, ce, x, y)[:, :36].reshape(7, 2, 18)
    kfac, _ = fit(model, x, y, KFAC(fisher="empirical", damping=0.1), chunk_size=3)
    torch.testing.assert_close(kfac.partition.layers[0].A, a_ref, rtol=1e-12, atol=1e-14)
    for route in ("rotate", "form"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(kronecker, "eigen_route", lambda t, o, i, r=route: r)
            ek, _ = fit(model, x, y, EKFAC(fisher="empirical", damping=0.1), chunk_size=3)
        conv = ek.partition.layers[0]
        expected = ((conv.Q_S.T @ grads @ conv.Q_A) ** 2).mean(0)
        torch.testing.assert_close(conv.eigen_diag, expected, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scratch", [1, 3 * 4 * 19])  # elements: one example per slice; 1-5
@pytest.mark.parametrize("route", ["rotate", "form"])
def test_eigenvalues_by_slices_of_examples_match_per_example_reference(
    monkeypatch, route, scratch, dtype
):
    """EK-FAC's eigenvalue pass forms the rotated per-example gradients a few examples at a
    time (``layer_grads.SLICE_BYTES``): with one example and with up to five per slice, by
    either route, for a convolution with a bias called twice (``Q_S`` applied after the weight
    gradients are formed: ``T = 32 > in_dim = 19``), a dilated one called once (``Q_S``
    first: ``T = 16 < 37``) and a linear head, the eigenvalues equal those of per-example
    gradients by autograd. In float32 the "rotate" route rotates a convolution's inputs by
    convolving them with ``Q_A`` (in float64 on a CPU by the unfolded patches)."""
    torch.manual_seed(8)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.twice = nn.Conv2d(2, 2, 3, padding=1)
            self.once = nn.Conv2d(4, 3, 3, padding="same", dilation=2)
            self.head = nn.Linear(3 * 16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.twice(torch.tanh(self.twice(x))))
            return self.head(torch.tanh(self.once(torch.cat([h, x], dim=1))).flatten(1))

    model, x, y = Net(), torch.randn(7, 2, 4, 4), torch.randint(0, 3, (7,))
    model, x = model.to(dtype), x.to(dtype)
    grads = per_example_grads(copy.deepcopy(model).double(), ce, x.double(), y)
    sizes = [q.numel() for q in model.parameters()]
    w1, b1, w2, b2, w3, b3 = torch.split(grads, sizes, dim=1)
    per_layer = [
        torch.cat([w1.reshape(7, 2, 18), b1.unsqueeze(2)], dim=2),
        torch.cat([w2.reshape(7, 3, 36), b2.unsqueeze(2)], dim=2),
        torch.cat([w3.reshape(7, 3, 48), b3.unsqueeze(2)], dim=2),
    ]
    monkeypatch.setattr(layer_grads, "SLICE_BYTES", scratch * torch.finfo(dtype).bits // 8)
    monkeypatch.setattr(kronecker, "eigen_route", lambda t, o, i: route if t > 1 else "rotate")
    ek, _ = fit(model, x, y, EKFAC(fisher="empirical", damping=0.1), chunk_size=5)
    assert [ly.name for ly in ek.partition.layers] == ["twice", "once", "head"]
    tol = {"rtol": 1e-11, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    for ly, g in zip(ek.partition.layers, per_layer, strict=True):
        assert ly.eigen_diag.dtype == dtype
        expected = ((ly.Q_S.double().T @ g @ ly.Q_A.double()) ** 2).mean(0)
        torch.testing.assert_close(ly.eigen_diag.double(), expected, **tol)


@pytest.mark.parametrize("d", [5, 300, 1030])  # no cut, 2 x 2 blocks, 4 x 4 blocks
def test_factor_sums_by_blocks_equal_one_product(d):
    """The factor sums over a transposed view (a convolution's) and over contiguous rows,
    accumulated on and above the diagonal blocks over two chunks and then mirrored, equal
    the full sum of outer products."""
    gen = torch.Generator().manual_seed(7)
    chunks = [torch.randn(3, d, 4, generator=gen) for _ in range(2)]  # [b, d, T] memory
    expected = sum(torch.einsum("bdt,bet->de", u, u) for u in chunks)
    for view in (lambda u: u.transpose(1, 2), lambda u: u.transpose(1, 2).contiguous()):
        total = torch.zeros(d, d)
        for u in chunks:
            kronecker._add_gram(total, view(u), alpha=0.5)
        torch.testing.assert_close(kronecker._mirrored(total), 0.5 * expected)


def test_eigen_route_forms_first_where_locations_outnumber_channels():
    """The cost model's choices on a CIFAR ResNet's layers (docstring of eigen_route)."""
    assert kronecker.eigen_route(1024, 64, 576) == "form"  # first stage, 32x32 locations
    assert kronecker.eigen_route(64, 256, 2304) == "rotate"  # last stage, 8x8 locations
    assert kronecker.eigen_route(1, 10, 257) == "rotate"  # a linear head: one location


@pytest.mark.parametrize("solver_cls", [KFAC, EKFAC])
def test_single_example_one_layer_is_exact(solver_cls):
    """One example, one bias-free Linear: vec(g a^T) vec(g a^T)^T = (g g^T) ⊗ (a a^T)."""
    torch.manual_seed(3)
    x, y = torch.randn(1, 4), torch.tensor([2])
    model = nn.Linear(4, 3, bias=False)
    fitted, _ = fit(model, x, y, solver_cls(fisher="empirical", damping=0.2))
    g = per_example_grads(model, ce, x, y)
    fisher = g.T @ g
    assert reference.rel_err(fitted.curvature.to_dense(), fisher) < 1e-12
    v = torch.randn(2, 12)
    expected = torch.linalg.solve(fisher + 0.2 * torch.eye(12), v.T).T
    assert reference.rel_err(fitted.solve(v).value, expected) < 1e-12


def test_ekfac_exact_when_fisher_is_diagonal_in_its_basis_kfac_is_not():
    """One-hot inputs, one output: the empirical Fisher is diagonal in K-FAC's eigenbasis."""
    torch.manual_seed(4)
    cats = torch.tensor([0] * 5 + [1] * 3 + [2] * 8 + [3] * 2)  # distinct counts
    x = F.one_hot(cats, 4).double()
    y = torch.randint(0, 2, (18, 1)).double()
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.3, -1.0, 0.7, 2.0]]))
    g = per_example_grads(model, lambda o, t: F.binary_cross_entropy_with_logits(o, t), x, y)
    fisher = g.T @ g / 18 + 0.01 * torch.eye(4)
    ek, _ = fit(
        model, x, y, EKFAC(fisher="empirical", damping=0.1), loss="bce_with_logits", wd=0.01
    )
    k, _ = fit(model, x, y, KFAC(fisher="empirical", damping=0.1), loss="bce_with_logits", wd=0.01)
    assert reference.rel_err(ek.curvature.to_dense(), fisher) < 1e-12
    assert reference.rel_err(k.curvature.to_dense(), fisher) > 0.05


@pytest.mark.slow
def test_true_fisher_label_sampling_matches_output_hessians():
    """The sampled-label S of the last layer estimates E[Hessian of the loss in the outputs]."""
    torch.manual_seed(5)
    x = torch.randn(50, 3)
    model = nn.Linear(3, 3)
    probs = torch.softmax(model(x), 1).detach()
    expected = (torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]).mean(0)
    labels = torch.zeros(50, dtype=torch.long)
    fitted, _ = fit(model, x, labels, KFAC(mc_samples=300), chunk_size=50)
    assert reference.rel_err(fitted.partition.layers[0].S, expected) < 0.05
    # mse: sum (f - y)^2 is the NLL of N(f, I/2): E[g g^T] = 2 I
    fitted, _ = fit(model, x, torch.zeros(50, 3), KFAC(mc_samples=100), loss="mse", chunk_size=50)
    assert reference.rel_err(fitted.partition.layers[0].S, 2 * torch.eye(3)) < 0.05
    # bce: E[g^2] = sigma (1 - sigma)
    one = nn.Linear(3, 1)
    s = torch.sigmoid(one(x)).detach()
    fitted, _ = fit(
        one, x, torch.zeros(50, 1), KFAC(mc_samples=300), loss="bce_with_logits", chunk_size=50
    )
    expected_bce = (s * (1 - s)).mean()
    assert abs(float(fitted.partition.layers[0].S) / float(expected_bce) - 1) < 0.05


# ------------------------------------------------------------------ accuracy
@pytest.mark.parametrize(
    ("fisher", "mc", "bar"), [("empirical", 1, 0.98), ("true", 1, 0.95), ("true", 16, 0.98)]
)
def test_ekfac_logistic_regression_ihvp_correlates_with_exact(logistic, fisher, mc, bar):
    wrapper = ModelWrapper(logistic.model, Objective("bce_with_logits", logistic.wd))
    op = HessianOperator(wrapper, IndexedData((logistic.x, logistic.y)), 16)
    fitted = EKFAC(fisher=fisher, damping=0.0, mc_samples=mc).fit(op)
    test_g = reference.per_example_grads(logistic.theta, logistic.x_test, logistic.y_test, 0.0)
    hess = reference.hessian(logistic.theta, logistic.x, logistic.y, logistic.wd)
    exact = torch.linalg.solve(hess, test_g.T).T
    corr = pearson(fitted.solve(test_g).value, exact)
    print(f"EK-FAC ({fisher}, mc={mc}) vs exact H^-1 g_test: pearson {corr:.4f}")
    assert corr > bar


def test_ekfac_frobenius_error_at_most_kfac_on_mlp():
    """Per layer block, vs the dense empirical Fisher (same labels): EK-FAC <= K-FAC."""
    torch.manual_seed(6)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    model = mlp()
    g = per_example_grads(model, ce, x, y)
    fisher = g.T @ g / 40
    ek, _ = fit(model, x, y, EKFAC(fisher="empirical", damping=0.1))
    k, _ = fit(model, x, y, KFAC(fisher="empirical", damping=0.1))
    dense_ek, dense_k = ek.curvature.to_dense(), k.curvature.to_dense()
    for name, slices in ek.blocks().items():
        idx = torch.cat([torch.arange(s.start, s.stop) for s in slices])
        block = fisher[idx][:, idx]
        err_ek = reference.rel_err(dense_ek[idx][:, idx], block)
        err_k = reference.rel_err(dense_k[idx][:, idx], block)
        print(f"layer {name}: rel Frobenius error EK-FAC {err_ek:.4f}, K-FAC {err_k:.4f}")
        assert err_ek <= err_k + 1e-12
        assert err_ek < 1.0
    # the approximation is block-diagonal: nothing couples the two layers
    first = ek.blocks()["0"]
    assert [(s.start, s.stop) for s in first] == [(0, 30), (30, 36)]
    assert float(dense_ek[:36, 36:].abs().max()) == 0.0
    assert float(dense_k[:36, 36:].abs().max()) == 0.0


# ------------------------------------------------------------------ damping
def test_with_damping_equals_refit_and_costs_no_pass():
    torch.manual_seed(7)
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    model = mlp()
    data = CountingData((x, y))
    fitted, _ = fit(model, x, y, EKFAC(damping=0.01, seed=3, replay_bytes=0), data=data)
    assert CountingData.passes == 2
    again = fitted.with_damping(0.3)
    assert CountingData.passes == 2
    refit, _ = fit(model, x, y, EKFAC(damping=0.3, seed=3), data=data)
    v = torch.randn(4, refit.base.size)
    torch.testing.assert_close(again.solve(v).value, refit.solve(v).value, rtol=1e-12, atol=0)
    assert again.damping == 0.3
    assert again.info["damping_rule"] == "fixed"
    # damping -> infinity: (C + lam I)^-1 v -> v / lam
    huge = fitted.with_damping(1e12)
    torch.testing.assert_close(huge.solve(v).value * 1e12, v, rtol=1e-9, atol=1e-12)


def test_heuristic_damping_is_tenth_of_mean_eigenvalue():
    torch.manual_seed(8)
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    for cls in (KFAC, EKFAC):
        fitted, _ = fit(mlp(), x, y, cls(), wd=0.05)
        curv = fitted.curvature.to_dense() - 0.05 * torch.eye(fitted.base.size)
        mean_eig = float(torch.trace(curv)) / fitted.base.size
        assert fitted.info["damping_rule"] == "heuristic"
        assert fitted.damping == pytest.approx(0.1 * mean_eig, rel=1e-10)
        assert fitted.info["damping"] == fitted.damping
        assert fitted.operator.damping == fitted.damping  # H + lambda I with the value used
        back = fitted.with_damping(0.5).with_damping("heuristic")
        assert back.damping == pytest.approx(fitted.damping, rel=1e-12)


def test_zero_damping_on_singular_factors_is_refused():
    x, y = torch.randn(2, 5), torch.randint(0, 3, (2,))  # 2 examples: A has rank 2 < 6
    with pytest.raises(NotPositiveDefiniteError, match=r"damping > 0.*heuristic"):
        fit(mlp(), x, y, KFAC(damping=0.0))


# ------------------------------------------------------------------ calculator
def test_per_layer_scores_sum_to_total_and_cg_refused():
    torch.manual_seed(9)
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    model = mlp()
    calc = InfluenceCalculator(
        model, Objective("cross_entropy", 0.01), (x, y), EKFAC(damping=0.1), progress=False
    )
    test = (x[:4], y[:4])
    per_layer = calc.influence(test, per_layer=True)
    assert sorted(per_layer) == ["0", "2"]
    total = calc.influence(test)
    torch.testing.assert_close(sum(per_layer.values()), total, rtol=1e-10, atol=1e-12)
    assert all(t.shape == (4, 30) for t in per_layer.values())
    assert float(per_layer["0"].abs().max()) > 0
    stiffer = calc.with_damping(1.0)
    assert stiffer.fitted_solver().partition is calc.fitted_solver().partition  # no refit
    cg = calc.with_solver(ConjugateGradient(damping=0.1))
    with pytest.raises(InputError, match=r"KFAC or EKFAC.*ConjugateGradient"):
        cg.influence(test, per_layer=True)


def test_no_hooks_remain_and_parameters_unchanged():
    torch.manual_seed(10)
    x, y = torch.randn(12, 2, 5, 5), torch.randint(0, 4, (12,))
    model = small_cnn()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fitted, _ = fit(model, x, y, EKFAC())
    fitted.solve(torch.randn(2, fitted.base.size))
    assert no_hooks(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None
    # and after an error half-way through a pass
    bad = (x, torch.full((12,), 7))  # label out of range: cross_entropy raises in the pass
    with pytest.raises(IndexError):
        fit(model, x, y, KFAC(fisher="empirical"), data=IndexedData(bad))
    assert no_hooks(model)


# ------------------------------------------------------------------ bad input


class WithBareParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.lin(x) * self.scale


@pytest.mark.parametrize(
    ("model", "words"),
    [
        (WithLayerNorm(), ["'ln.weight'", "'ln.bias'", "LayerNorm", "unsupported='diagonal'"]),
        (WithBareParameter(), ["'scale'", "<root>", "requires_grad=False"]),
        (nn.Sequential(nn.Conv2d(2, 2, 1, groups=2)), ["'0.weight'", "groups=2"]),
    ],
)
def test_unsupported_layers_are_named(model, words):
    x = torch.randn(6, 2, 3, 3) if isinstance(model, nn.Sequential) else torch.randn(6, 4)
    y = torch.randint(0, 2, (6,))
    with pytest.raises(InputError) as err:
        fit(model, x, y, KFAC())
    for word in words:
        assert word in str(err.value)


def test_unsupported_diagonal_fallback_is_the_fisher_diagonal():
    torch.manual_seed(11)
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    model = WithLayerNorm()
    fitted, _ = fit(model, x, y, EKFAC(fisher="empirical", unsupported="diagonal", damping=0.1))
    assert fitted.info["diagonal_params"] == ["ln.weight", "ln.bias"]
    assert sorted(fitted.blocks()) == ["lin", "ln.bias", "ln.weight"]
    g = per_example_grads(model, ce, x, y)
    diag = (g**2).mean(0)
    dense = fitted.curvature.to_dense()
    torch.testing.assert_close(torch.diagonal(dense)[15:], diag[15:], rtol=1e-12, atol=1e-14)
    assert float(dense[15:, :15].abs().max()) == 0.0


@pytest.mark.parametrize("solver", [KFAC, EKFAC])
def test_diagonal_blocks_come_from_the_factor_pass(monkeypatch, solver):
    """GroupNorm, LayerNorm and grouped-convolution parameters (diagonal blocks) get their
    squared per-example gradients from the factor pass's own backward passes: no pass of
    their own (the fallback is forbidden here), equal to per-example autograd gradients,
    with sampled labels over two draws as with the data's labels."""
    torch.manual_seed(12)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.gn = nn.GroupNorm(2, 4)
            self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
            self.ln = nn.LayerNorm(36)
            self.head = nn.Linear(36, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.grouped(torch.tanh(self.gn(self.conv(x))))
            return self.head(self.ln(torch.tanh(h).mean(1).flatten(1)))

    model, x, y = Net(), torch.randn(10, 2, 6, 6), torch.randint(0, 3, (10,))
    norm_params = [
        "gn.weight",
        "gn.bias",
        "grouped.weight",
        "grouped.bias",
        "ln.weight",
        "ln.bias",
    ]

    def no_fallback(*args, **kwargs):
        raise AssertionError("the diagonal blocks took a pass of their own")

    monkeypatch.setattr(kronecker, "diagonal_sq_grads", no_fallback)
    empirical, _ = fit(
        model, x, y, solver(fisher="empirical", unsupported="diagonal"), chunk_size=4
    )
    g = per_example_grads(model, ce, x, y)
    columns, start = {}, 0
    for name, q in model.named_parameters():
        columns[name] = slice(start, start + q.numel())
        start += q.numel()
    blocks = {blk.name: blk for blk in empirical.partition.diagonal}
    assert sorted(blocks) == sorted(norm_params)
    for name in norm_params:
        expected = (g[:, columns[name]] ** 2).mean(0)
        torch.testing.assert_close(blocks[name].diag, expected, rtol=1e-12, atol=1e-14)
    sampled, _ = fit(
        model, x, y, solver(unsupported="diagonal", mc_samples=2, seed=3), chunk_size=4
    )
    monkeypatch.undo()
    monkeypatch.setattr(kronecker, "_recorded_sq_grads", lambda *args: None)  # the fallback
    again, _ = fit(model, x, y, solver(unsupported="diagonal", mc_samples=2, seed=3), chunk_size=4)
    for a, b in zip(sampled.partition.diagonal, again.partition.diagonal, strict=True):
        torch.testing.assert_close(a.diag, b.diag, rtol=1e-12, atol=1e-14)


def test_layers_called_with_keywords():
    """A GroupNorm called with a keyword input cannot be read by the hooks: its diagonal block
    takes the vmap fallback (still the per-example squared gradients). A Kronecker layer
    called so is refused with a message that says why."""
    torch.manual_seed(13)

    class Net(nn.Module):
        def __init__(self, keyword_head: bool) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.gn = nn.GroupNorm(2, 4)
            self.head = nn.Linear(4, 3)
            self.keyword_head = keyword_head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.gn(input=self.conv(x))).mean((2, 3))
            return self.head(input=h) if self.keyword_head else self.head(h)

    x, y = torch.randn(9, 2, 5, 5), torch.randint(0, 3, (9,))
    model = Net(keyword_head=False)
    fitted, _ = fit(model, x, y, KFAC(fisher="empirical", unsupported="diagonal"), chunk_size=4)
    g = per_example_grads(model, ce, x, y)
    start = model.conv.weight.numel() + model.conv.bias.numel()
    gn = {blk.name: blk for blk in fitted.partition.diagonal}
    torch.testing.assert_close(gn["gn.weight"].diag, (g[:, start : start + 4] ** 2).mean(0))
    with pytest.raises(InputError, match="without a positional tensor input"):
        fit(Net(keyword_head=True), x, y, KFAC(unsupported="diagonal"))


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"fisher": "mc"}, ["fisher", "'true'", "'empirical'"]),
        ({"damping": -0.1}, ["damping", ">= 0"]),
        ({"damping": "auto"}, ["damping", "'heuristic'"]),
        ({"unsupported": "skip"}, ["unsupported", "'diagonal'"]),
        ({"mc_samples": 0}, ["mc_samples", "positive integer"]),
        ({"chunk_size": 0}, ["chunk_size", "positive integer"]),
    ],
)
def test_bad_hyperparameters(kwargs, words):
    for cls in (KFAC, EKFAC):
        with pytest.raises(InputError) as err:
            cls(**kwargs)
        for word in words:
            assert word in str(err.value)


def test_bad_operator_loss_and_with_damping():
    with pytest.raises(InputError, match=r"HessianOperator"):
        KFAC().fit(DenseOperator(torch.eye(3)))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    model = nn.Linear(4, 3)
    wrapper = ModelWrapper(model, Objective(lambda m, b: ce(m(b[0]), b[1])))
    op = HessianOperator(wrapper, IndexedData((x, y)))
    with pytest.raises(InputError, match=r"fisher='empirical'"):
        KFAC().fit(op)
    fitted = KFAC(fisher="empirical").fit(op)
    with pytest.raises(InputError, match="damping"):
        fitted.with_damping(-1.0)


@pytest.mark.parametrize("solver_cls", [KFAC, EKFAC])
def test_group_weight_decay_is_exact_in_the_curvature_and_its_inverse(solver_cls):
    # weight and bias of one Kronecker block with different decay: the decay term is added
    # exactly (rank-one Sherman-Morrison correction), so only the Fisher is approximated
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    x = torch.randn(20, 3, dtype=torch.float64)
    data = IndexedData((x, torch.randint(0, 2, (20,))))
    groups = {"default": 0.3, "no_decay": ["bias"], "overrides": {"2.weight": 0.05}}
    solver = solver_cls(damping=0.1, fisher="empirical")
    fitted = solver.fit(
        HessianOperator(ModelWrapper(net, Objective("cross_entropy", groups)), data)
    )
    plain = solver.fit(HessianOperator(ModelWrapper(net, Objective("cross_entropy", 0.0)), data))
    decay = torch.tensor([0.3] * 12 + [0.0] * 4 + [0.05] * 8 + [0.0] * 2, dtype=torch.float64)
    dense = plain.curvature.to_dense() + torch.diag(decay)
    torch.testing.assert_close(fitted.curvature.to_dense(), dense, rtol=1e-10, atol=1e-12)
    rhs = torch.randn(3, 26, dtype=torch.float64)
    want = torch.linalg.solve(dense + 0.1 * torch.eye(26, dtype=torch.float64), rhs.T).T
    torch.testing.assert_close(fitted.solve(rhs).value, want, rtol=1e-9, atol=1e-11)
    assert fitted.info["weight_decay"] == {
        "0.weight": 0.3,
        "0.bias": 0.0,
        "2.weight": 0.05,
        "2.bias": 0.0,
    }
    # a uniform decay goes on the eigenvalues, as before
    same = solver.fit(HessianOperator(ModelWrapper(net, Objective("cross_entropy", 0.3)), data))
    assert same.info["weight_decay"] == 0.3
    torch.testing.assert_close(
        same.curvature.to_dense(),
        plain.curvature.to_dense() + 0.3 * torch.eye(26, dtype=torch.float64),
    )


def _overflowing(loss: str, targets: torch.Tensor) -> InfluenceCalculator:
    """A float32 layer on inputs of 1e18-1e20: finite outputs and gradients, but squares of
    its inputs (and products with its gradients) past float32's range."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).float().eval()  # float64 is this module's default
    with torch.no_grad():
        model[0].weight.mul_(1e-18)
    scale = 1e20 if loss == "cross_entropy" else 1e18
    x = torch.randn(len(targets), 3, dtype=torch.float32) * scale
    solver = EKFAC(damping=0.1, fisher="empirical")
    return InfluenceCalculator(
        model, Objective(loss), (x, targets), solver, progress=False, check_minimum=False
    )


def test_a_factor_or_refitted_eigenvalue_past_the_range_is_refused():
    # A = E[a a^T] ~ 1e40 overflows in pass 1
    calc = _overflowing("cross_entropy", torch.randint(0, 2, (8,)))
    with pytest.raises(NonFiniteError, match="factor A of layer '0' is not finite"):
        calc.fitted_solver()
    # A ~ 1e36 and S ~ 1e20 are finite, their refitted product ~ 1e56 is not (pass 2)
    calc = _overflowing("mse", torch.randn(8, 2, dtype=torch.float32) * 1e10)
    with pytest.raises(NonFiniteError, match="factor eigenvalues of layer '0' is not finite"):
        calc.fitted_solver()
