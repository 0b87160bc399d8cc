"""The closed-form Hessian and the hand-run gradients of an ``nn.Sequential`` MLP
(``infl.sequential_hessian``, ``infl.sequential_chain``).

Every Hessian is compared in float64 with ``torch.autograd.functional.hessian`` of the training
objective over the flat trainable parameters, and every gradient factor with the forward-hook
route (``LinearPerExampleGradients.factors``), nothing taken from the code under test.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chain_cases import CASES, WD, N, autograd_hessian, mlp, objective_loss
from chain_cases import data as chain_data
from infl import (
    EKFAC,
    KFAC,
    Arnoldi,
    ConjugateGradient,
    ExactHessian,
    IndexedData,
    InfluenceCalculator,
    ModelWrapper,
    Objective,
)
from infl import sequential_hessian as sq
from infl.errors import NonFiniteError
from infl.objective import supervised_loss
from infl.operators import HessianOperator, LinearOperator
from infl.sequential_chain import chain_factors, chain_layers, output_derivatives
from infl.solvers import kronecker_stream
from infl.solvers.base import FittedSolver
from problems import count_factor_reads
from reference import rel_err


def _closed_form(model: nn.Module, data, loss: str, chunk: int = 7) -> torch.Tensor:
    wrapper = ModelWrapper(model, Objective(objective_loss(loss), weight_decay=WD))
    found = sq.sequential_hessian(wrapper, IndexedData(data), chunk, max_rows=10**9)
    assert found is not None
    return found[0]


@pytest.mark.parametrize("case", list(CASES))
def test_the_closed_form_is_the_hessian(case: str) -> None:
    modules, loss = CASES[case]
    model = mlp(*modules)
    x, y = chain_data(loss)
    got = _closed_form(model, (x, y), loss)
    assert rel_err(got, autograd_hessian(model, x, y, loss)) < 1e-13
    assert torch.equal(got, got.T)


def test_frozen_tensors_a_reused_layer_and_ignored_labels() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(5, 5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(5, 3))
    model = model.double().eval()
    model[0].weight.requires_grad_(False)  # its bias stays in the space
    model[5].bias.requires_grad_(False)
    x, y = chain_data("cross_entropy")
    y[[2, 9]] = -100  # zero loss and curvature, counted in n (as the operator counts them)
    got = _closed_form(model, (x, y), "cross_entropy")
    assert got.shape == (5 + 30 + 15, 5 + 30 + 15)
    assert rel_err(got, autograd_hessian(model, x, y, "cross_entropy")) < 1e-13


def test_a_chunk_cut_to_the_work_budget_gives_the_same_matrix(monkeypatch) -> None:
    model = mlp(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    data = chain_data("cross_entropy")
    whole = _closed_form(model, data, "cross_entropy", chunk=N)
    monkeypatch.setattr(sq, "_WORK_BYTES", 1)  # one example per chunk
    wrapper = ModelWrapper(model, Objective("cross_entropy", weight_decay=WD))
    found = sq.sequential_hessian(wrapper, IndexedData(data), N, keep_bytes=1 << 20)
    assert found is not None
    cut, factors = found
    assert rel_err(cut, whole) < 1e-13
    assert factors is None  # not in the calculator's chunking: nothing to hand over


def _not_closed_form() -> dict[str, tuple[nn.Module, object, tuple[int, ...]]]:
    class Subclass(nn.Sequential):
        pass

    def own_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction="none")

    hooked = mlp(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    hooked[1].register_forward_hook(lambda m, a, o: o * 2)
    wide = [nn.Linear(4, sq.MAX_ROWS), nn.Tanh(), nn.Linear(sq.MAX_ROWS, 3)]
    return {
        "subclass": (Subclass(nn.Linear(4, 3)).double(), "cross_entropy", (4,)),
        "custom-loss": (mlp(nn.Linear(4, 3)), supervised_loss(own_ce), (4,)),
        "hook": (hooked, "cross_entropy", (4,)),
        "dropout": (mlp(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)), "cross_entropy", (4,)),
        "softmax": (mlp(nn.Linear(4, 3), nn.Softmax(dim=1)), "cross_entropy", (4,)),
        "3-d inputs": (mlp(nn.Linear(4, 3)), "cross_entropy", (2, 4)),
        "wide-smooth": (mlp(*wide), "cross_entropy", (4,)),
        "p >= 1000": (
            mlp(nn.Linear(4, 200), nn.ReLU(), nn.Linear(200, 3)),
            "cross_entropy",
            (4,),
        ),  # the structured route is faster there
    }


@pytest.mark.parametrize("case", list(_not_closed_form()))
def test_other_models_and_losses_are_left_to_the_products(case: str) -> None:
    model, loss, shape = _not_closed_form()[case]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N, *shape[:-1]), generator=gen) if len(shape) > 1 else None
    y = torch.randint(0, 3, (N,), generator=gen) if y is None else y
    wrapper = ModelWrapper(model, Objective(loss, weight_decay=WD))  # type: ignore[arg-type]
    if case != "p >= 1000":
        assert sq.sequential_hessian(wrapper, IndexedData((x, y)), 8) is None
    if case != "3-d inputs":  # (the products would refuse them too)
        op = HessianOperator(wrapper, IndexedData((x, y)), chunk_size=8)
        op.to_dense()
        assert op.assembly is not None
        assert op.assembly.method != "closed-form"


def _calc(model: nn.Module, data, solver=None, **options) -> InfluenceCalculator:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained model is not at a minimum
        return InfluenceCalculator(
            model,
            Objective("cross_entropy", weight_decay=WD),
            data,
            solver if solver is not None else ExactHessian(damping=0.5),
            progress=False,
            chunk_size=8,
            check_minimum=False,
            **options,
        )


def _count_gradient_reads(monkeypatch) -> list[int]:
    """Count the chunks whose training gradients are computed from the data, as factors
    (:func:`problems.count_factor_reads`) or formed (``ModelWrapper.train_grads``)."""
    calls = count_factor_reads(monkeypatch)
    formed = ModelWrapper.train_grads

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return formed(self, *args, **kwargs)

    monkeypatch.setattr(ModelWrapper, "train_grads", counted)
    return calls


def test_the_exact_solver_scores_from_the_closed_form_and_its_factors(monkeypatch) -> None:
    model = mlp(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    data, test = chain_data("cross_entropy"), chain_data("cross_entropy", n=3)
    calc = _calc(model, data)
    reads = _count_gradient_reads(monkeypatch)
    scores = calc.influence(test)
    op = calc.operator
    assert isinstance(op, HessianOperator)
    assert op.assembly is not None
    assert op.assembly.method == "closed-form"
    assert op.assembly.products == 0
    assert op.num_matvecs == 0
    assert reads[0] == 0  # the assembly's factors scored: no pass over the data
    assert calc._grad_cache.factors.complete
    plain = _calc(model, data, cache_bytes=0)
    plain.operator._dense = LinearOperator.to_dense(plain.operator)  # type: ignore[attr-defined]
    assert rel_err(scores, plain.influence(test)) < 1e-11


@pytest.mark.parametrize(
    "solver",
    [ConjugateGradient(damping=0.5, max_iter=100, rtol=1e-10), Arnoldi(rank=8, krylov_dim=20)],
    ids=["cg", "arnoldi"],
)
def test_solvers_on_the_dense_matrix_score_from_its_factors_too(monkeypatch, solver) -> None:
    model = mlp(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    data, test = chain_data("cross_entropy"), chain_data("cross_entropy", n=3)
    calc = _calc(model, data, solver)
    reads = _count_gradient_reads(monkeypatch)
    scores = calc.influence(test)
    assert calc.operator.answers_dense
    assert calc.operator.assembly.method == "closed-form"  # type: ignore[attr-defined]
    assert reads[0] == 0  # scored from the assembly's factors: no pass over the data
    assert calc._grad_cache.factors.complete
    assert calc.fitted_solver().take_train_factors() is None  # handed over once
    plain = _calc(model, data, solver)
    plain.operator.dense = False  # type: ignore[attr-defined]
    assert rel_err(scores, plain.influence(test)) < 1e-8
    monkeypatch.setattr(FittedSolver, "take_train_factors", lambda self: None)
    without = _calc(model, data, solver)
    assert torch.equal(without.influence(test), scores)
    assert reads[0] > 0  # without the handover, scoring reads the data


def test_a_layer_run_twice_keeps_the_products_route_for_its_gradients() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(4, 3))
    model = model.double().eval()
    data = chain_data("cross_entropy")
    wrapper = ModelWrapper(model, Objective("cross_entropy", weight_decay=WD))
    assert chain_factors(wrapper, wrapper.objective.per_example_loss, data) is None
    found = sq.sequential_hessian(wrapper, IndexedData(data), 8, keep_bytes=1 << 20, max_rows=10**9)
    assert found is not None
    assert found[1] is None  # its factors cannot stand for its gradients: none handed over
    assert rel_err(found[0], autograd_hessian(model, *data, "cross_entropy")) < 1e-13


@pytest.mark.parametrize("loss", ["cross_entropy", "probabilities", "mse", "bce_with_logits"])
def test_the_hand_run_factors_are_the_hooked_ones(loss: str) -> None:
    model = mlp(nn.Linear(4, 6), nn.SiLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model[2].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    data = chain_data(loss)
    wrapper = ModelWrapper(model, Objective(objective_loss(loss), weight_decay=WD))
    fn = wrapper.objective.per_example_loss
    got = chain_factors(wrapper, fn, data)
    assert got is not None
    want = wrapper._linear_grads.factors(
        lambda params: wrapper._batch_value(fn, params, data), wrapper.params, N
    )
    assert want is not None
    assert sorted(got) == sorted(want) == ["0", "2", "4"]
    for prefix, (a, g) in want.items():
        torch.testing.assert_close(got[prefix][0], a, rtol=1e-14, atol=0)
        torch.testing.assert_close(got[prefix][1], g, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("make", [KFAC, EKFAC])
def test_the_empirical_fisher_fit_runs_the_chain_by_hand_with_the_hooked_numbers(
    make, monkeypatch
) -> None:
    model = mlp(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model[2].weight.requires_grad_(False)
    data, test = chain_data("cross_entropy"), chain_data("cross_entropy", n=3)
    solver = make(damping=0.1, fisher="empirical")
    by_hand = [0]
    record = kronecker_stream._chain_record

    def counted(*args):
        found = record(*args)
        by_hand[0] += found is not None
        return found

    monkeypatch.setattr(kronecker_stream, "_chain_record", counted)
    fast = _calc(model, data, solver).influence(test)
    assert by_hand[0] == -(-N // 8)  # every chunk of the factor pass; EK-FAC's second replays
    monkeypatch.setattr(kronecker_stream, "_chain_record", lambda *args: None)
    hooked = _calc(model, data, solver).influence(test)
    assert rel_err(fast, hooked) < 1e-12


def test_a_non_finite_chunk_is_refused_on_the_hand_run_path_too() -> None:
    model = mlp(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = chain_data("cross_entropy")
    x[11, 2] = float("nan")
    calc = _calc(model, (x, y), KFAC(damping=0.1, fisher="empirical"))
    with pytest.raises(NonFiniteError, match="not finite"):
        calc.influence(chain_data("cross_entropy", n=2))


def test_the_chain_is_built_again_when_the_model_changes_and_refused_with_a_hook() -> None:
    model = mlp(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    data = chain_data("cross_entropy")
    wrapper = ModelWrapper(model, Objective("cross_entropy", weight_decay=WD))
    fn = wrapper.objective.per_example_loss
    first = chain_layers(wrapper, fn)
    assert first is not None
    assert [type(layer.module) for layer in first][1] is nn.Tanh
    assert chain_layers(wrapper, fn) == first  # the same layers, from the wrapper's cache
    model[1] = nn.ReLU()  # another activation in place: the factors follow it
    assert [type(layer.module) for layer in chain_layers(wrapper, fn) or []][1] is nn.ReLU
    got = chain_factors(wrapper, fn, data)
    assert got is not None
    want = wrapper._linear_grads.factors(
        lambda params: wrapper._batch_value(fn, params, data), wrapper.params, N
    )
    assert want is not None
    torch.testing.assert_close(got["0"][1], want["0"][1], rtol=1e-12, atol=1e-15)
    handle = model[2].register_forward_hook(lambda *args: None)
    assert chain_layers(wrapper, fn) is None
    assert chain_factors(wrapper, fn, data) is None
    handle.remove()
    assert chain_layers(wrapper, fn) is not None


@pytest.mark.parametrize("hessian", [False, True])
def test_cross_entropy_output_derivatives_with_and_without_ignored_labels(hessian: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    outputs = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (9,), generator=gen)
    loss = supervised_loss("cross_entropy")
    for ignored in ([], [2, 7]):
        targets = labels.clone()
        targets[ignored] = -100
        kept = (targets != -100).double()
        o = outputs.clone().requires_grad_(True)
        losses = F.cross_entropy(o, targets.clamp_min(0), reduction="none") * kept
        (want,) = torch.autograd.grad(losses.sum(), o)
        got, curvature = output_derivatives(loss, outputs, targets, hessian=hessian)
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
        if not hessian:
            assert curvature is None
            continue
        assert curvature is not None
        for i in range(9):
            row = torch.autograd.functional.hessian(
                lambda v, t=targets[i : i + 1], w=kept[i]: F.cross_entropy(v, t.clamp_min(0)) * w,
                outputs[i : i + 1],
            ).reshape(4, 4)
            torch.testing.assert_close(curvature[i], row, rtol=1e-13, atol=1e-15)
    empty = output_derivatives(loss, outputs[:0], labels[:0], hessian=True)
    assert empty[0].shape == (0, 4)
    assert empty[1] is not None
    assert empty[1].shape == (0, 4, 4)
