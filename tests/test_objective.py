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


# ---------------------------------------------------------------- weight decay per parameter
_GROUPS = {"default": 1e-2, "no_decay": ["bias", "norm"]}


def _net() -> nn.Module:
    net = nn.Sequential()
    net.add_module("fc", nn.Linear(3, 4))
    net.add_module("norm", nn.LayerNorm(4))
    net.add_module("head", nn.Linear(4, 2))
    return net


def _names(net: nn.Module) -> list[str]:
    return [n for n, p in net.named_parameters() if p.requires_grad]


def test_name_matching_rule():
    from infl.objective import name_matches

    assert name_matches("bias", "fc.bias")
    assert name_matches("bias", "bias")
    assert not name_matches("bias", "fc.bias_ih")  # whole dotted parts only
    assert name_matches("norm", "blocks.0.norm.weight")
    assert not name_matches("norm", "blocks.0.layer_norm.weight")
    assert name_matches("*norm*", "blocks.0.layer_norm.weight")  # globs match the whole name
    assert name_matches("LayerNorm.weight", "encoder.LayerNorm.weight")
    assert not name_matches("fc.weight", "fc.weight_g")


def test_groups_give_each_parameter_its_decay_and_a_float_is_unchanged():
    names = _names(_net())  # fc.weight fc.bias norm.weight norm.bias head.weight head.bias
    obj = Objective("cross_entropy", weight_decay={**_GROUPS, "overrides": {"head.weight": 1e-3}})
    assert obj.decay_values(names) == [1e-2, 0.0, 0.0, 0.0, 1e-3, 0.0]
    assert obj.uniform_weight_decay is None
    assert obj.decay_groups is not None
    vec = obj.decay_vector(names, [12, 4, 4, 4, 8, 2])
    assert vec.shape == (34,)
    assert vec.dtype == torch.float64
    assert torch.equal(vec[:12], torch.full((12,), 1e-2, dtype=torch.float64))
    assert float(vec[12:24].abs().sum()) == 0
    assert torch.equal(vec[24:32], torch.full((8,), 1e-3, dtype=torch.float64))
    flat = Objective("cross_entropy", weight_decay=0.5)
    assert flat.weight_decay == 0.5
    assert flat.uniform_weight_decay == 0.5
    assert flat.decay_values(names) == [0.5] * 6
    assert flat.decay_settings() == 0.5
    # a mapping with nothing but a default is that number
    assert Objective("mse", weight_decay={"default": 0.5}) == flat.__class__("mse", 0.5)
    assert Objective("mse", weight_decay={"default": 0.5}).weight_decay == 0.5


def test_groups_objective_is_hashable_picklable_with_stable_repr():
    a = Objective("cross_entropy", weight_decay=_GROUPS)
    b = Objective("cross_entropy", weight_decay={"no_decay": ("norm", "bias"), "default": 0.01})
    assert a == b
    assert hash(a) == hash(b)
    assert pickle.loads(pickle.dumps(a)) == a
    assert repr(a) == (
        "Objective(loss=SupervisedLoss(name='cross_entropy'), weight_decay=WeightDecayGroups("
        "default=0.01, no_decay=('bias', 'norm'), overrides=()))"
    )
    assert a.decay_settings() == {"default": 0.01, "no_decay": ["bias", "norm"], "overrides": {}}
    assert a != Objective("cross_entropy", weight_decay=0.01)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"no_decay": ["bias"]}, "needs 'default'"),
        ({"default": 0.1, "nodecay": ["bias"]}, "unknown key"),
        ({"default": -0.1}, "finite number >= 0"),
        ({"default": 0.1, "no_decay": "bias"}, "list of name patterns"),
        ({"default": 0.1, "no_decay": [""]}, "non-empty strings"),
        ({"default": 0.1, "overrides": {"fc.weight": float("nan")}}, "overrides"),
        ({"default": 0.1, "overrides": [("fc.weight", 0.1)]}, "must be a mapping"),
    ],
)
def test_bad_weight_decay_mappings_are_refused(spec, words):
    with pytest.raises(InputError, match=words):
        Objective("cross_entropy", weight_decay=spec)


def test_a_rule_that_matches_no_parameter_is_refused_naming_it():
    names = _names(_net())
    typo = Objective("cross_entropy", weight_decay={"default": 0.1, "no_decay": ["bais"]})
    with pytest.raises(InputError, match=r"\['bais'\] match no trainable.*'fc.bias'"):
        typo.decay_values(names)
    gone = Objective("cross_entropy", weight_decay={"default": 0.1, "overrides": {"fc": 0.0}})
    with pytest.raises(InputError, match=r"\['fc'\] are not trainable parameters"):
        gone.decay_values(names)


def _sgd_two_groups(net: nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in net.named_parameters() if not n.endswith("bias") and "norm" not in n]
    rest = [p for n, p in net.named_parameters() if n.endswith("bias") or "norm" in n]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": 1e-2}, {"params": rest, "weight_decay": 0.0}], lr=0.1
    )


def test_from_optimizer_equals_the_mapping_form():
    net = _net()
    names = _names(net)
    got = Objective.from_optimizer("cross_entropy", _sgd_two_groups(net), net)
    want = Objective("cross_entropy", weight_decay=_GROUPS)
    assert got.decay_values(names) == want.decay_values(names) == [1e-2, 0, 0, 0, 1e-2, 0]
    assert pickle.loads(pickle.dumps(got)) == got
    one = torch.optim.Adam(net.parameters(), lr=0.1, weight_decay=3e-3)
    assert Objective.from_optimizer("cross_entropy", one, net).weight_decay == 3e-3
    assert Objective.from_optimizer("cross_entropy", torch.optim.Rprop(net.parameters()), net) == (
        Objective("cross_entropy", 0.0)
    )


def test_from_optimizer_refuses_decoupled_decay_unless_asked():
    net = _net()
    adamw = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    with pytest.raises(InputError, match=r"AdamW param_groups\[0\] uses decoupled.*as_l2"):
        Objective.from_optimizer("cross_entropy", adamw, net)
    assert Objective.from_optimizer("mse", adamw, net, decoupled="as_l2").weight_decay == 0.05
    adam = torch.optim.Adam(net.parameters(), weight_decay=0.05, decoupled_weight_decay=True)
    with pytest.raises(InputError, match="decoupled"):
        Objective.from_optimizer("cross_entropy", adam, net)
    # AdamW without decay (the no_decay group) is fine: nothing is decoupled
    free = torch.optim.AdamW(net.parameters(), weight_decay=0.0)
    assert Objective.from_optimizer("cross_entropy", free, net).weight_decay == 0.0


def test_from_optimizer_refuses_orphans_foreign_params_and_unknown_optimizers():
    net = _net()
    partial = torch.optim.SGD([net.fc.weight, net.fc.bias], lr=0.1, weight_decay=0.1)
    with pytest.raises(InputError, match=r"\['norm.weight', 'norm.bias', 'head.weight'.*freeze"):
        Objective.from_optimizer("cross_entropy", partial, net)
    net.norm.requires_grad_(False)
    net.head.requires_grad_(False)
    assert Objective.from_optimizer("cross_entropy", partial, net).weight_decay == 0.1
    other = torch.optim.SGD(_net().parameters(), lr=0.1)
    with pytest.raises(InputError, match="not parameters of the model"):
        Objective.from_optimizer("cross_entropy", other, net)

    class Custom(torch.optim.SGD):
        pass

    with pytest.raises(InputError, match="weight_decay means is unknown"):
        Objective.from_optimizer("cross_entropy", Custom(net.parameters(), lr=0.1), net)
    with pytest.raises(InputError, match="decoupled must be"):
        Objective.from_optimizer("cross_entropy", partial, net, decoupled="convert")  # type: ignore[arg-type]


def test_moved_classes_keep_their_pickled_and_fingerprinted_path():
    # infl.losses / infl.weight_decay hold them now; pickles and store fingerprints name the
    # class by module path, so it stays infl.objective and stores made before stay valid
    import infl.losses
    import infl.weight_decay
    from infl.fingerprint import fingerprint
    from infl.objective import WeightDecayGroups

    assert SupervisedLoss is infl.losses.SupervisedLoss
    assert WeightDecayGroups is infl.weight_decay.WeightDecayGroups
    assert SupervisedLoss.__module__ == WeightDecayGroups.__module__ == "infl.objective"
    groups = Objective("cross_entropy", {"default": 1e-2, "no_decay": ["bias"]})
    assert pickle.loads(pickle.dumps(groups)) == groups
    assert repr(groups) == (
        "Objective(loss=SupervisedLoss(name='cross_entropy'), weight_decay=WeightDecayGroups("
        "default=0.01, no_decay=('bias',), overrides=()))"
    )
    # the digests stores made before the split hold
    assert fingerprint(Objective("cross_entropy", 1e-3), "ce").digest.startswith("fff19b1b6f4e167c")
    assert fingerprint(groups.weight_decay, "wdg").digest.startswith("4a0fd87d4f739071")
