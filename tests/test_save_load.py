"""InfluenceCalculator.save / load: the fitted state round-trips with no HVP and no data pass,
and a file for another model, objective or data set, or a damaged file, is refused."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import reference
from infl import (
    EKFAC,
    KFAC,
    Arnoldi,
    ConjugateGradient,
    ExactHessian,
    FittedSolver,
    InfluenceCalculator,
    InputError,
    LiSSA,
    Objective,
    Solver,
    SolveResult,
    StoreMismatchError,
)
from infl.solvers import kfac as kfac_module

WD = 0.1


@pytest.fixture
def mlp_problem():
    """A small float64 MLP classifier (not trained: save/load must not care) and its data."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    test = (x[:2] + 0.1, y[:2])
    return model, Objective("cross_entropy", weight_decay=WD), (x, y), test


def _calc(problem, solver, **kwargs):
    model, objective, train, _ = problem
    return InfluenceCalculator(
        model, objective, train, solver, progress=False, check_minimum=False, **kwargs
    )


def _load(path, problem, **kwargs):
    model, objective, train, _ = problem
    return InfluenceCalculator.load(
        path, model, objective, train, progress=False, check_minimum=False, **kwargs
    )


SOLVERS = {
    "exact": ExactHessian(damping=1.0),
    "cg": ConjugateGradient(damping=0.5, max_iter=8, rtol=1e-10),
    "pcg-arnoldi": ConjugateGradient(
        damping=0.5, max_iter=8, rtol=1e-10, preconditioner=Arnoldi(rank=4, krylov_dim=8)
    ),
    "lissa-auto": LiSSA(damping=0.5, depth=5, rtol=10.0),  # no advice pass
    "lissa-fixed": LiSSA(damping=0.5, scale=20.0, depth=5, rtol=10.0),
    "arnoldi": Arnoldi(rank=6, krylov_dim=12, damping=0.2),
    "kfac": KFAC(damping=0.1),
    "ekfac": EKFAC(),  # heuristic damping
}
DIRECT = {"exact", "arnoldi", "kfac", "ekfac"}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_a_loaded_fit_gives_identical_scores_with_no_hvp(mlp_problem, tmp_path, name):
    calc = _calc(mlp_problem, SOLVERS[name], chunk_size=7)
    test = mlp_problem[3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LiSSA may stop short of rtol: identical either way
        before = calc.influence(test)
    path = tmp_path / "fit.pt"
    calc.save(path)

    loaded = _load(path, mlp_problem)
    assert loaded.operator.num_matvecs == 0  # restoring the fit cost no HVP
    assert loaded.chunk_size == 7
    assert type(loaded.solver) is type(calc.solver)
    assert loaded.solver == calc.solver
    assert loaded.fitted_solver().damping == calc.fitted_solver().damping
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        after = loaded.influence(test)
    assert torch.equal(before, after)
    if name in DIRECT:
        assert torch.equal(calc.self_influence([0, 3]), loaded.self_influence([0, 3]))
        assert loaded.operator.num_matvecs == 0  # and neither did scoring
    else:
        assert calc.fitted_solver().info.get("scale") == loaded.fitted_solver().info.get("scale")


@pytest.mark.parametrize("solver", [KFAC(damping=0.1), EKFAC()], ids=["kfac", "ekfac"])
def test_kfac_load_makes_no_data_pass(mlp_problem, tmp_path, monkeypatch, solver):
    calc = _calc(mlp_problem, solver)
    before = calc.influence(mlp_problem[3], per_layer=True)
    calc.save(tmp_path / "fit.pt")

    def refuse(*args, **kwargs):
        raise AssertionError("a data pass to collect factors on load")

    monkeypatch.setattr(kfac_module, "collect_factors", refuse)
    monkeypatch.setattr(kfac_module, "collect_eigen_diagonal", refuse)
    loaded = _load(tmp_path / "fit.pt", mlp_problem)
    after = loaded.influence(mlp_problem[3], per_layer=True)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert loaded.fitted_solver().info["damping_rule"] == calc.fitted_solver().info["damping_rule"]


def test_curvature_is_restored(mlp_problem, tmp_path):
    calc = _calc(mlp_problem, ExactHessian(damping=0.1), curvature="gauss_newton")
    calc.save(tmp_path / "fit.pt")
    loaded = _load(tmp_path / "fit.pt", mlp_problem)
    assert loaded.curvature == "gauss_newton"
    assert torch.equal(loaded.influence(mlp_problem[3]), calc.influence(mlp_problem[3]))


def test_plain_cg_saves_only_its_settings(mlp_problem, tmp_path):
    calc = _calc(mlp_problem, ConjugateGradient(damping=0.5, max_iter=7))
    assert calc.fitted_solver().state() == {"preconditioner": None}
    calc.save(tmp_path / "cg.pt")
    loaded = _load(tmp_path / "cg.pt", mlp_problem)
    assert loaded.solver == ConjugateGradient(damping=0.5, max_iter=7)
    assert loaded.fitted_solver().preconditioner is None


def test_with_damping_after_load_reuses_the_loaded_fit(mlp_problem, tmp_path):
    calc = _calc(mlp_problem, Arnoldi(rank=5, damping=0.2))
    calc.save(tmp_path / "fit.pt")
    loaded = _load(tmp_path / "fit.pt", mlp_problem)
    loaded.fitted_solver()
    stiffer = loaded.with_damping(2.0)
    assert torch.equal(
        stiffer.influence(mlp_problem[3]), calc.with_damping(2.0).influence(mlp_problem[3])
    )
    assert stiffer.operator.num_matvecs == 0


# ------------------------------------------------------------------ refusals
def test_another_model_is_refused(mlp_problem, tmp_path):
    _calc(mlp_problem, ExactHessian(damping=1.0)).save(tmp_path / "fit.pt")
    model, objective, train, test = mlp_problem
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-3
    with pytest.raises(StoreMismatchError, match="model parameters"):
        _load(tmp_path / "fit.pt", (other, objective, train, test))
    frozen = copy.deepcopy(model)
    frozen[0].bias.requires_grad_(False)  # same values, another parameter space
    with pytest.raises(StoreMismatchError, match="model parameters"):
        _load(tmp_path / "fit.pt", (frozen, objective, train, test))


def test_other_data_or_objective_is_refused(mlp_problem, tmp_path):
    _calc(mlp_problem, ExactHessian(damping=1.0)).save(tmp_path / "fit.pt")
    model, objective, (x, y), test = mlp_problem
    flipped = y.clone()
    flipped[3] = (flipped[3] + 1) % 3
    with pytest.raises(StoreMismatchError, match="training data") as info:
        _load(tmp_path / "fit.pt", (model, objective, (x, flipped), test))
    assert "model parameters" not in str(info.value)
    with pytest.raises(StoreMismatchError, match="training data"):
        _load(tmp_path / "fit.pt", (model, objective, (x[:-1], y[:-1]), test))
    other_objective = Objective("cross_entropy", weight_decay=WD * 2)
    with pytest.raises(StoreMismatchError, match="objective"):
        _load(tmp_path / "fit.pt", (model, other_objective, (x, y), test))


def test_corrupted_truncated_and_old_files_are_refused(mlp_problem, tmp_path):
    good = tmp_path / "fit.pt"
    _calc(mlp_problem, ExactHessian(damping=1.0)).save(good)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(StoreMismatchError, match="corrupted"):
        _load(garbage, mlp_problem)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(StoreMismatchError, match="corrupted, truncated"):
        _load(truncated, mlp_problem)
    old = tmp_path / "old.pt"
    torch.save({"format": "infl.fitted-solver", "version": 0, "header": "{}", "state": {}}, old)
    with pytest.raises(StoreMismatchError, match=r"(?i)format version 0.*refit"):
        _load(old, mlp_problem)
    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(StoreMismatchError, match="not a saved infl fit"):
        _load(foreign, mlp_problem)
    with pytest.raises(InputError, match="no saved fit"):
        _load(tmp_path / "missing.pt", mlp_problem)


def test_a_state_for_other_shapes_is_refused(mlp_problem):
    calc = _calc(mlp_problem, ExactHessian(damping=1.0))
    state = calc.fitted_solver().state()
    state["eigenvectors"] = state["eigenvectors"][:-1]
    with pytest.raises(InputError, match="'eigenvectors' has shape"):
        ExactHessian(damping=1.0).restore(calc.operator, state)
    with pytest.raises(InputError, match="no tensor 'basis'"):
        Arnoldi(rank=2).restore(calc.operator, {"eigenvalues": torch.ones(2)})
    with pytest.raises(InputError, match="hessian_extremes"):
        LiSSA().restore(calc.operator, {"scale": 1.0, "hessian_extremes": None})
    with pytest.raises(InputError, match="preconditioner"):
        ConjugateGradient(damping=0.5, preconditioner=Arnoldi(rank=2)).restore(
            calc.operator, {"preconditioner": None}
        )


@dataclass(frozen=True)
class _Identity(Solver):
    damping: float = 0.0

    def fit(self, operator, *, progress=False):
        return _FittedIdentity(self, operator)


class _FittedIdentity(FittedSolver):
    def solve(self, rhs, *, progress=False):
        return SolveResult(rhs, True, 0, torch.zeros(rhs.shape[0]))


def test_a_solver_without_state_cannot_be_saved(mlp_problem, tmp_path):
    calc = _calc(mlp_problem, _Identity())
    with pytest.raises(InputError, match="does not support saving"):
        calc.save(tmp_path / "fit.pt")
    assert not (tmp_path / "fit.pt").exists()
    with pytest.raises(InputError, match="cannot restore"):
        _Identity().restore(calc.operator, {})


# ------------------------------------------------------------------ self-influence sign
def test_self_influence_score_is_minus_self_influence(logistic):
    p = logistic
    objective = Objective("bce_with_logits", weight_decay=p.wd)
    calc = InfluenceCalculator(
        p.model, objective, (p.x, p.y), ExactHessian(), progress=False, check_minimum=False
    )
    score = calc.self_influence_score()
    assert torch.equal(score, -calc.self_influence())
    assert torch.equal(calc.self_influence_score([4, 1]), score[[4, 1]])
    low_rank = calc.with_solver(Arnoldi(rank=3, damping=0.01))  # the projected path
    assert torch.equal(low_rank.self_influence_score(), -low_rank.self_influence())
    # without weight decay it is the quadratic form g^T A^-1 g: positive for a PD A
    no_wd = InfluenceCalculator(
        p.model, Objective("bce_with_logits"), (p.x, p.y), ExactHessian(damping=0.1),
        progress=False, check_minimum=False,
    )  # fmt: skip
    assert bool((no_wd.self_influence_score() > 0).all())
    assert bool((no_wd.self_influence() < 0).all())


def test_self_influence_score_ranks_a_flipped_label_first():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(80, 3, generator=gen, dtype=torch.float64)
    w = torch.tensor([3.0, -2.0, 1.5], dtype=torch.float64)
    y = (x @ w > 0).to(torch.float64)
    confident = int((x @ w).abs().argmax())  # the most clearly classified point
    y[confident] = 1.0 - y[confident]  # ... now mislabelled
    wd = 0.01
    theta = reference.newton_fit(x, y, wd)
    model = reference.load_into(nn.Linear(3, 1).double(), theta)
    calc = InfluenceCalculator(
        model, Objective("bce_with_logits", weight_decay=wd), (x, y), ExactHessian(),
        progress=False,
    )  # fmt: skip
    score = calc.self_influence_score()
    assert int(score.argmax()) == confident
    assert int(calc.self_influence().argmin()) == confident  # the raw sign puts it last


@pytest.mark.parametrize(
    "solver", [ExactHessian(damping="auto"), Arnoldi(rank=4, krylov_dim=8, damping="auto")]
)
def test_auto_damping_is_restored_at_the_resolved_value(mlp_problem, tmp_path, solver):
    calc = _calc(mlp_problem, solver)
    before = calc.influence(mlp_problem[3])
    calc.save(tmp_path / "fit.pt")
    loaded = _load(tmp_path / "fit.pt", mlp_problem)
    assert loaded.solver.damping == "auto"  # the calculator keeps the rule the user chose
    assert loaded.fitted_solver().damping == calc.fitted_solver().damping > 0
    assert torch.equal(loaded.influence(mlp_problem[3]), before)
    assert loaded.operator.num_matvecs == 0
