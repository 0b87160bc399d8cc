"""Objective and losses: output-space Hessians of the built-ins against autograd, user losses."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from infl import InputError, Objective, supervised_loss
from infl.objective import SupervisedLoss, output_hessian_loss


def _targets(name: str, b: int, c: int, gen: torch.Generator) -> torch.Tensor:
    if name == "cross_entropy":
        return torch.randint(0, c, (b,), generator=gen)
    if name == "mse":
        return torch.randn(b, c, generator=gen, dtype=torch.float64)
    return torch.rand(b, c, generator=gen, dtype=torch.float64)  # soft binary targets


def _autograd_output_hessians(loss_fn, outputs, targets) -> torch.Tensor:
    """``[b, c, c]``: each example's Hessian of its loss in its outputs."""
    return torch.stack(
        [
            torch.autograd.functional.hessian(
                lambda o, i=i: loss_fn(o.unsqueeze(0), targets[i : i + 1]).sum(), outputs[i]
            )
            for i in range(outputs.shape[0])
        ]
    )


REFERENCE = {
    "cross_entropy": lambda out, y: F.cross_entropy(out, y, reduction="none"),
    "mse": lambda out, y: ((out - y) ** 2).sum(dim=1),
    "bce_with_logits": lambda out, y: F.binary_cross_entropy_with_logits(
        out, y, reduction="none"
    ).sum(dim=1),
}


@pytest.mark.parametrize("name", ["cross_entropy", "mse", "bce_with_logits"])
def test_builtin_output_hessian_products_equal_autograd(name):
    gen = torch.Generator().manual_seed(0)
    outputs = 2 * torch.randn(6, 4, generator=gen, dtype=torch.float64)
    targets = _targets(name, 6, 4, gen)
    u = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    loss = supervised_loss(name)
    hessians = _autograd_output_hessians(REFERENCE[name], outputs, targets)
    expected = torch.einsum("bij,bj->bi", hessians, u)
    torch.testing.assert_close(loss.output_hessian_product(outputs, targets, u), expected)
    # the loss itself is the reference loss
    model = nn.Identity()
    torch.testing.assert_close(loss(model, (outputs, targets)), REFERENCE[name](outputs, targets))


def test_closed_forms_of_the_builtin_output_hessians():
    outputs = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    u = torch.eye(3, dtype=torch.float64)
    p = torch.softmax(outputs[0], dim=0)
    s = torch.sigmoid(outputs[0])
    ce = torch.stack(
        [
            supervised_loss("cross_entropy").output_hessian_product(outputs, torch.tensor([1]), r)
            for r in u.unsqueeze(1)
        ]
    ).squeeze(1)
    torch.testing.assert_close(ce, torch.diag(p) - torch.outer(p, p))
    mse = supervised_loss("mse").output_hessian_product(outputs, outputs, u)
    torch.testing.assert_close(mse, 2 * u)  # the loss sums (f - y)^2: no factor 1/2
    bce = supervised_loss("bce_with_logits").output_hessian_product(outputs, outputs, u[:1])
    torch.testing.assert_close(bce, (s * (1 - s) * u[0]).unsqueeze(0))


def test_cross_entropy_output_hessian_with_probability_targets_and_ignore_index():
    gen = torch.Generator().manual_seed(1)
    outputs = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    u = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    loss = supervised_loss("cross_entropy")
    # class probabilities (not normalised, to check the sum_c t_c factor)
    soft = torch.rand(4, 3, generator=gen, dtype=torch.float64)
    hessians = _autograd_output_hessians(REFERENCE["cross_entropy"], outputs, soft)
    torch.testing.assert_close(
        loss.output_hessian_product(outputs, soft, u), torch.einsum("bij,bj->bi", hessians, u)
    )
    # ignored targets have no loss and no curvature
    hard = torch.tensor([0, -100, 2, -100])
    got = loss.output_hessian_product(outputs, hard, u)
    assert torch.equal(got[1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(got[3], torch.zeros(3, dtype=torch.float64))
    assert got[0].abs().sum() > 0


def _half_sq(out, y):
    return 0.5 * ((out - y) ** 2).sum(dim=1)


def _identity_hessian(out, y, u):
    return u


def test_user_supervised_loss_evaluates_and_applies_its_output_hessian():
    loss = supervised_loss(_half_sq, output_hessian=_identity_hessian)
    assert isinstance(loss, SupervisedLoss)
    assert loss.has_output_hessian
    assert loss.name is None
    x, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    model = nn.Linear(2, 2).double()
    torch.testing.assert_close(loss(model, (x, y)), _half_sq(model(x), y))
    torch.testing.assert_close(loss(model, {"inputs": x, "targets": y}), _half_sq(model(x), y))
    u = torch.randn(5, 2, dtype=torch.float64)
    assert loss.output_hessian_product(model(x), y, u) is u
    auto = supervised_loss(_half_sq, output_hessian="autograd")
    torch.testing.assert_close(auto.output_hessian_product(model(x).detach(), y, u), u)
    assert output_hessian_loss(loss) is loss


def test_losses_without_output_hessian_are_refused_with_the_fix():
    def plain(model, batch):
        return _half_sq(model(batch[0]), batch[1])

    for loss in (plain, supervised_loss(_half_sq)):
        with pytest.raises(InputError, match=r"curvature='hessian'.*output_hessian="):
            output_hessian_loss(loss)
    no_hess = supervised_loss(_half_sq)
    assert not no_hess.has_output_hessian
    with pytest.raises(InputError, match="output_hessian="):
        no_hess.output_hessian_product(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))


def test_supervised_loss_validation():
    with pytest.raises(InputError, match="unknown loss 'hinge'"):
        supervised_loss("hinge")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="own exact output Hessian"):
        supervised_loss("mse", output_hessian=_identity_hessian)
    with pytest.raises(InputError, match="output_hessian must be"):
        supervised_loss(_half_sq, output_hessian="exact")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="loss must be"):
        SupervisedLoss(3)  # type: ignore[arg-type]


def test_builtin_repr_is_unchanged_and_user_repr_is_stable():
    # results stores fingerprint the loss by repr: a built-in's must not change
    assert (
        repr(Objective("cross_entropy").per_example_loss) == "SupervisedLoss(name='cross_entropy')"
    )
    assert Objective("mse").per_example_loss.name == "mse"
    user = repr(supervised_loss(_half_sq, output_hessian=_identity_hessian))
    assert user == (
        f"SupervisedLoss(loss={__name__}._half_sq, output_hessian={__name__}._identity_hessian)"
    )
    assert "0x" not in repr(supervised_loss(_half_sq, output_hessian="autograd"))


def test_supervised_losses_pickle_and_compare_equal():
    for loss in (
        supervised_loss("bce_with_logits"),
        supervised_loss(_half_sq, output_hessian=_identity_hessian),
    ):
        assert pickle.loads(pickle.dumps(loss)) == loss
    assert Objective("mse") == Objective(supervised_loss("mse"))
