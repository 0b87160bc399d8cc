"""correct_prediction / compare_rankings on a constructed case with known culprits."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import infl
from infl.errors import InputError
from infl.experiments import CorrectionConfig
from infl.experiments.correction import (
    CorrectionResult,
    CorrectionSummary,
    compare_rankings,
    correct_prediction,
)

WD = 1e-2


@dataclass
class Case:
    """Two Gaussian blobs (class 0 left, class 1 right) and, far above them at (-1, 4), a
    small cluster of 2 correctly labelled class-0 points outvoted by 5 mislabelled class-1
    points. The test point at (-1, 4) is class 0 (it is on the class-0 side, x1 < 0), but
    the 5 mislabelled points tilt the boundary so that the model predicts class 1.
    """

    model: nn.Linear
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    good: tuple[int, ...]  # the 2 correct points of the far cluster
    bad: tuple[int, ...]  # the 5 mislabelled points that flip the test point

    @property
    def objective(self) -> infl.Objective:
        return infl.Objective("cross_entropy", WD)


def _fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    infl.fit_to_minimum(net, infl.Objective("cross_entropy", WD), (x, y), grad_tol=1e-10)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def case() -> Case:
    gen = torch.Generator().manual_seed(0)
    f64 = torch.float64
    x0 = torch.randn(60, 2, generator=gen, dtype=f64) * 0.5 + torch.tensor([-2.0, 0.0], dtype=f64)
    x1 = torch.randn(60, 2, generator=gen, dtype=f64) * 0.5 + torch.tensor([2.0, 0.0], dtype=f64)
    centre = torch.tensor([[-1.0, 4.0]], dtype=f64)
    good = centre + 0.2 * torch.randn(2, 2, generator=gen, dtype=f64)
    bad = centre + 0.2 * torch.randn(5, 2, generator=gen, dtype=f64)
    x = torch.cat([x0, x1, good, bad])
    y = torch.cat([torch.zeros(60), torch.ones(60), torch.zeros(2), torch.ones(5)]).long()
    net = nn.Linear(2, 2).double()
    _fit(net, x, y)
    net.eval()
    x_test, y_test = centre.clone(), torch.tensor([0])
    c = Case(net, x, y, x_test, y_test, good=(120, 121), bad=(122, 123, 124, 125, 126))
    with torch.no_grad():
        assert int(net(x_test).argmax()) == 1, "the construction must mis-predict the test point"
        # without the mislabelled points the test point is predicted correctly
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[list(c.bad)] = False
        clean = nn.Linear(2, 2).double()
        _fit(clean, x[keep], y[keep])
        assert int(clean(x_test).argmax()) == 0
    return c


def _correct(case: Case, **kwargs: object) -> CorrectionResult:
    settings: dict[str, object] = {"k": 2, "lr": 0.05, "max_steps": 20, "seed": 0}
    defaults: dict[str, object] = {"solver": None, "heldout": (case.x, case.y)}
    for name, value in kwargs.items():
        (settings if name in CorrectionConfig.__dataclass_fields__ else defaults)[name] = value
    defaults["config"] = CorrectionConfig(**settings)  # type: ignore[arg-type]
    if defaults.get("ranking") != "influence":
        defaults.pop("solver")
    else:
        defaults["solver"] = infl.ExactHessian()
    return correct_prediction(
        case.model,
        case.objective,
        (case.x, case.y),
        (case.x_test, case.y_test),
        **defaults,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("measurement", ["margin", "loss"])
def test_influence_ranks_the_known_culprits(case: Case, measurement: str) -> None:
    """Helpful = the correct points of the far cluster; harmful = exactly the 5 mislabelled."""
    res = correct_prediction(
        case.model,
        case.objective,
        (case.x, case.y),
        (case.x_test, case.y_test),
        ranking="influence",
        solver=infl.ExactHessian(),
        config=CorrectionConfig(
            measurement=measurement,  # type: ignore[arg-type]
            k=5,
            lr=0.05,
            max_steps=20,
            ascend_harmful=True,
        ),
    )
    assert set(res.helpful[:2]) == set(case.good)
    assert set(res.harmful) == set(case.bad)
    assert res.flipped


def test_influence_flips_within_budget_and_random_does_not(case: Case) -> None:
    before = [p.detach().clone() for p in case.model.parameters()]
    res = _correct(case, ranking="influence")
    assert res.flipped
    assert res.steps <= 3
    assert res.prediction_before == 1
    assert res.prediction_after == 0
    assert res.margin_before < 0 < res.margin_after
    assert set(res.helpful) == set(case.good)
    assert res.harmful == ()
    # held-out accuracy is reported before/after, and its change is after - before
    acc = res.heldout_accuracy_before
    assert acc == pytest.approx(float((case.model(case.x).argmax(1) == case.y).double().mean()))
    change = res.heldout_accuracy_change
    assert change == pytest.approx(res.heldout_accuracy_after - acc)
    assert math.isfinite(change)
    # the fine-tuned copy predicts the test point correctly; the user's model is untouched
    with torch.no_grad():
        assert int(res.model(case.x_test).argmax()) == 0
    for p, q in zip(before, case.model.parameters(), strict=True):
        assert torch.equal(p, q)

    # random control: over 10 seeds it fails most of the time, and never beats influence
    randoms = [_correct(case, ranking="random", seed=s) for s in range(10)]
    flipped = [r for r in randoms if r.flipped]
    assert len(flipped) <= 3
    assert all(r.steps > res.steps for r in randoms)
    assert all(r.steps == 20 for r in randoms if not r.flipped)


def test_gradient_similarity_control(case: Case) -> None:
    res = _correct(case, ranking="gradient_similarity")
    assert res.flipped
    assert res.ranking == "gradient_similarity"


def test_ascending_on_harmful_helps_more(case: Case) -> None:
    plain = _correct(case, ranking="influence", k=2, lr=0.01, max_steps=100)
    both = _correct(case, ranking="influence", k=2, lr=0.01, max_steps=100, ascend_harmful=True)
    assert plain.flipped
    assert both.flipped
    assert both.steps < plain.steps


def test_compare_rankings_summary(case: Case) -> None:
    x_test = torch.cat([case.x_test, torch.tensor([[2.0, 0.0], [-2.0, 0.0]], dtype=torch.float64)])
    y_test = torch.tensor([0, 1, 0])  # only the first is mis-predicted
    summary = compare_rankings(
        case.model,
        case.objective,
        (case.x, case.y),
        (x_test, y_test),
        solver=infl.ExactHessian(),
        config=CorrectionConfig(k=2, lr=0.05, max_steps=20, seed=3),
        heldout=(case.x, case.y),
        progress=False,
    )
    assert isinstance(summary, CorrectionSummary)
    assert summary.test_indices == (0,)
    assert set(summary.results) == {"influence", "random", "gradient_similarity"}
    assert summary.success_rate("influence") == 1.0
    assert summary.success_rate("random") == 0.0  # seed 3 picks no helpful point
    assert math.isnan(summary.median_steps("random"))
    rows = summary.to_rows()
    assert [r["ranking"] for r in rows] == ["influence", "random", "gradient_similarity"]
    assert rows[0]["attempts"] == 1
    assert rows[0]["median_steps"] == summary.results["influence"][0].steps
    assert "influence" in summary.table()


def test_a_calculator_can_be_reused(case: Case) -> None:
    calc = infl.InfluenceCalculator(
        case.model,
        case.objective,
        (case.x, case.y),
        infl.ExactHessian(),
        measurement=infl.margin_measurement(),
        progress=False,
    )
    a = correct_prediction(
        case.model, case.objective, (case.x, case.y), (case.x_test, case.y_test), calculator=calc
    )
    b = correct_prediction(
        case.model,
        case.objective,
        (case.x, case.y),
        (case.x_test, case.y_test),
        solver=infl.ExactHessian(),
    )
    assert a.helpful == b.helpful
    assert a.steps == b.steps
    with pytest.raises(InputError, match="contradicts"):
        correct_prediction(
            case.model,
            case.objective,
            (case.x, case.y),
            (case.x_test, case.y_test),
            calculator=calc,
            config=CorrectionConfig(measurement="loss"),
        )


def test_bad_input(case: Case) -> None:
    train, obj = (case.x, case.y), case.objective
    with pytest.raises(InputError, match="already classified correctly"):
        correct_prediction(case.model, obj, train, (case.x[:1], case.y[:1]))
    with pytest.raises(InputError, match="single example"):
        correct_prediction(case.model, obj, train, (case.x[:2], case.y[:2]))
    with pytest.raises(InputError, match="ranking must be one of"):
        correct_prediction(case.model, obj, train, (case.x_test, case.y_test), ranking="best")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="k must be"):
        correct_prediction(
            case.model, obj, train, (case.x_test, case.y_test), config=CorrectionConfig(k=0)
        )
    with pytest.raises(InputError, match="nothing to correct"):
        compare_rankings(case.model, obj, train, (case.x[:3], case.y[:3]), progress=False)
    with pytest.raises(InputError, match="unknown ranking"):
        compare_rankings(case.model, obj, train, train, rankings=["oracle"], progress=False)  # type: ignore[list-item]


def test_correction_config_is_validated_and_old_keywords_are_deprecated(case: Case) -> None:
    for bad, match in [
        ({"k": 0}, "k must be"),
        ({"lr": -1.0}, "lr must be"),
        ({"max_steps": 0}, "max_steps must be"),
        ({"measurement": "logit"}, "measurement must be"),
        ({"chunk_size": 0}, "chunk_size must be"),
    ]:
        with pytest.raises(InputError, match=match):
            CorrectionConfig(**bad)  # type: ignore[arg-type]
    args = (case.model, case.objective, (case.x, case.y), (case.x_test, case.y_test))
    new = correct_prediction(*args, ranking="random", config=CorrectionConfig(k=2, seed=1))
    with pytest.warns(DeprecationWarning, match="CorrectionConfig"):
        old = correct_prediction(*args, ranking="random", k=2, seed=1)
    assert old.helpful == new.helpful
    assert old.steps == new.steps
    with pytest.raises(InputError, match="config= and the settings keywords k"):
        correct_prediction(*args, config=CorrectionConfig(), k=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'budget'"):
        compare_rankings(*args, budget=3)
