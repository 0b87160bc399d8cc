"""The dense Hessian from the Gauss-Newton matrix and a few layers' HVP columns.

Every matrix is compared with a Hessian of the mean loss computed here by
``torch.autograd.functional.hessian`` over the flat parameters (float64), with nothing taken
from infl.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from infl import ExactHessian, IndexedData, InfluenceCalculator, ModelWrapper, Objective
from infl import structured_hessian as sh
from infl.objective import supervised_loss
from infl.operators import HessianOperator, LinearOperator
from reference import rel_err

WD = 0.05


def _relu_mlp(seed: int = 0, widths: tuple[int, ...] = (6, 12, 5, 3)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).double().eval()


def _tanh_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()


def _small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 3),
        )
        .double()
        .eval()
    )


def _data(shape: tuple[int, ...], n: int = 40, classes: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def _autograd_hessian(model: nn.Module, x, y, loss: str = "cross_entropy") -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [q.shape for _, q in model.named_parameters()]
    theta = torch.cat([q.detach().reshape(-1) for q in model.parameters()])

    def objective(t: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(t, [s.numel() for s in shapes])
        params = {n: q.view(s) for n, q, s in zip(names, pieces, shapes, strict=True)}
        out = functional_call(model, params, (x,))
        if loss == "cross_entropy":
            data = F.cross_entropy(out, y, reduction="mean")
        else:
            data = ((out - y) ** 2).sum(dim=1).mean()
        return data + 0.5 * WD * (t * t).sum()

    return torch.autograd.functional.hessian(objective, theta)


def _operator(model: nn.Module, x, y, loss: object = "cross_entropy") -> HessianOperator:
    wrapper = ModelWrapper(model, Objective(loss, weight_decay=WD))  # type: ignore[arg-type]
    return HessianOperator(wrapper, IndexedData((x, y)), chunk_size=16)


def test_parameter_groups_follow_the_owning_modules() -> None:
    groups = sh.parameter_groups(["0.weight", "0.bias", "2.weight", "scale"], [6, 3, 9, 1])
    assert [owner for owner, _ in groups] == ["0", "2", ""]
    assert groups[0][1].tolist() == list(range(9))
    assert groups[1][1].tolist() == list(range(9, 18))
    assert groups[2][1].tolist() == [18]


def test_the_cover_is_the_lightest_one_touching_every_coupling() -> None:
    # a triangle: all but the heaviest vertex
    assert sh.coupling_cover([120, 1744, 650], set(), {(0, 1), (0, 2), (1, 2)}) == {0, 2}
    # a chain 0-1-2-3: the two light ends' neighbours or the middle pair, whichever is lighter
    assert sh.coupling_cover([5, 1, 1, 5], set(), {(0, 1), (1, 2), (2, 3)}) == {1, 2}
    assert sh.coupling_cover([1, 5, 5, 1], set(), {(0, 1), (1, 2), (2, 3)}) in ({0, 2}, {1, 3})
    # a forced vertex (non-zero diagonal block) is always in it, and covers its edges
    assert sh.coupling_cover([9, 1, 1], {0}, {(0, 1), (0, 2)}) == {0}
    # no coupling at all: nothing to compute
    assert sh.coupling_cover([3, 4], set(), set()) == set()


def test_the_greedy_cover_of_many_groups_is_still_a_cover() -> None:
    count = sh._EXACT_COVER_MAX_GROUPS + 5
    weights = [(7 * v) % 11 + 1 for v in range(count)]
    edges = {(v, v + 1) for v in range(count - 1)} | {(0, count - 1)}
    cover = sh.coupling_cover(weights, {3}, edges)
    assert 3 in cover
    assert all(a in cover or b in cover for a, b in edges)
    assert len(cover) < count


@pytest.mark.parametrize(
    ("make", "shape"),
    [(_relu_mlp, (6,)), (_small_cnn, (1, 8, 8))],
    ids=["relu-mlp", "relu-cnn"],
)
def test_a_piecewise_linear_network_takes_fewer_products_and_the_same_matrix(make, shape) -> None:
    model = make()
    x, y = _data(shape)
    op = _operator(model, x, y)
    matrix, record = sh.assemble_hessian(op, min_params=0)
    expected = _autograd_hessian(model, x, y)
    assert rel_err(matrix, expected) < 1e-12
    assert torch.equal(matrix, matrix.T)
    assert record.method == "gauss-newton"
    sizes = dict(record.groups)
    heaviest = max(sizes, key=lambda g: sizes[g])
    # ReLU layers are linear in their own weights: only pairs of layers couple, and the
    # cover of a fully coupled set of layers is all of them but the heaviest
    assert set(record.column_groups) == set(sizes) - {heaviest}
    columns = sum(sizes[g] for g in record.column_groups)
    assert record.products == columns + len(sizes) + 1  # + one probe per group + the check
    assert record.products < op.size
    assert record.check_error is not None
    assert record.check_error < 1e-12


def test_a_tanh_layer_couples_with_itself_and_is_computed_by_products() -> None:
    model = _tanh_mlp()
    x, y = _data((4,))
    op = _operator(model, x, y)
    matrix, record = sh.assemble_hessian(op, min_params=0)
    assert rel_err(matrix, _autograd_hessian(model, x, y)) < 1e-12
    # tanh'' != 0: the first layer's own block of the residual is not zero, the output
    # layer's is; the first layer's columns cover the pair, the output layer is Gauss-Newton
    assert record.method == "gauss-newton"
    assert record.column_groups == ("0",)
    assert ("0", "2") in record.coupled


def test_mse_loss_gives_the_same_matrix() -> None:
    model = _relu_mlp(widths=(6, 12, 5, 2))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    op = _operator(model, x, y, "mse")
    matrix, record = sh.assemble_hessian(op, min_params=0)
    assert record.method == "gauss-newton"
    assert rel_err(matrix, _autograd_hessian(model, x, y, "mse")) < 1e-12


def test_a_wrong_cover_fails_the_check_and_falls_back_to_products(monkeypatch) -> None:
    model = _relu_mlp()
    x, y = _data((6,))
    op = _operator(model, x, y)
    monkeypatch.setattr(sh, "coupling_cover", lambda weights, forced, edges: {0})
    matrix, record = sh.assemble_hessian(op, min_params=0)
    assert record.method == "products"
    assert "check" in record.reason
    sizes = dict(record.groups)
    # three probes, the wrong cover's columns, the check, then all p columns again
    assert record.products == 3 + sizes["0"] + 1 + op.size
    assert rel_err(matrix, _autograd_hessian(model, x, y)) < 1e-12


def test_small_models_and_losses_without_an_output_hessian_use_products() -> None:
    model = _relu_mlp()
    x, y = _data((6,))
    _, record = sh.assemble_hessian(_operator(model, x, y))  # p = 167 < 1000
    assert record.method == "products"
    assert "p = " in record.reason
    assert record.products == sum(size for _, size in record.groups)

    def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    custom = _operator(model, x, y, supervised_loss(cross_entropy))
    matrix, record = sh.assemble_hessian(custom, min_params=0)
    assert record.method == "products"
    assert rel_err(matrix, _autograd_hessian(model, x, y)) < 1e-12


def test_the_exact_solver_uses_it_through_the_operator() -> None:
    model = _relu_mlp(widths=(20, 40, 20, 3))  # p = 1,723
    x, y = _data((20,), n=50)
    objective = Objective("cross_entropy", weight_decay=WD)
    calc = InfluenceCalculator(
        model, objective, (x, y), ExactHessian(damping=1.0), progress=False, check_minimum=False
    )
    scores = calc.influence((x[:3], y[:3]))
    op = calc.operator
    assert isinstance(op, HessianOperator)
    assert op.assembly is not None
    assert op.assembly.method == "gauss-newton"
    assert op.assembly.column_groups == ("2", "4")  # the 20 -> 40 layer (840) is Gauss-Newton
    plain = InfluenceCalculator(
        model, objective, (x, y), ExactHessian(damping=1.0), progress=False, check_minimum=False
    )
    plain.operator._dense = LinearOperator.to_dense(plain.operator)  # type: ignore[attr-defined]
    assert rel_err(scores, plain.influence((x[:3], y[:3]))) < 1e-10


def test_the_assembly_shows_a_progress_bar_when_asked(capsys) -> None:
    model = _relu_mlp()
    x, y = _data((6,))
    sh.assemble_hessian(_operator(model, x, y), min_params=0, block_size=8, progress=True)
    assert "Hessian columns" in capsys.readouterr().err
    sh.assemble_hessian(_operator(model, x, y), block_size=8, progress=True)  # p products
    assert "dense matrix" in capsys.readouterr().err
    sh.assemble_hessian(_operator(model, x, y), min_params=0, block_size=8)
    assert capsys.readouterr().err == ""
