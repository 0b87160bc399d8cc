"""ModelWrapper: flat parameter space, per-example gradients, HVPs against closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference
from infl import (
    HessianOperator,
    IndexedData,
    InputError,
    ModelWrapper,
    Objective,
    margin_measurement,
)
from problems import BatchCentred, make_logistic_problem


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()


def test_hessian_to_dense_equals_analytic_logistic_hessian(logistic):
    wrapper = ModelWrapper(logistic.model, Objective("bce_with_logits", logistic.wd))
    op = HessianOperator(wrapper, IndexedData((logistic.x, logistic.y)), chunk_size=7)
    expected = reference.hessian(logistic.theta, logistic.x, logistic.y, logistic.wd)
    torch.testing.assert_close(op.to_dense(block_size=2), expected, rtol=1e-10, atol=1e-12)


def test_train_grads_equal_analytic_logistic_gradients(logistic):
    wrapper = ModelWrapper(logistic.model, Objective("bce_with_logits", logistic.wd))
    expected = reference.per_example_grads(logistic.theta, logistic.x, logistic.y, logistic.wd)
    torch.testing.assert_close(wrapper.train_grads((logistic.x, logistic.y)), expected)
    # at the minimum the training gradients (weight decay included) sum to zero
    assert float(expected.sum(0).norm()) < 1e-10


def test_per_example_grads_equal_autograd_loop():
    model = _mlp()
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 3, (9,))
    wrapper = ModelWrapper(model, Objective("cross_entropy", weight_decay=0.0))
    got = wrapper.per_example_grads(margin_measurement(), (x, y))
    for i in range(9):
        model.zero_grad()
        margin_measurement()(model, (x[i : i + 1], y[i : i + 1])).sum().backward()
        loop = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(got[i], loop)


def test_hvp_matches_dense_autograd_hessian_of_mlp():
    model = _mlp()
    x, y = torch.randn(11, 3, dtype=torch.float64), torch.randint(0, 3, (11,))
    obj = Objective("cross_entropy", weight_decay=0.3)
    wrapper = ModelWrapper(model, obj)

    def objective(flat):
        params = wrapper.unflatten(flat)
        out = torch.func.functional_call(model, params, (x,))
        loss = nn.functional.cross_entropy(out, y)
        return loss + 0.15 * flat @ flat

    expected = torch.autograd.functional.hessian(objective, wrapper.flat_params)
    op = HessianOperator(wrapper, IndexedData((x, y)), chunk_size=4)
    v = torch.randn(3, wrapper.num_params, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(v), v @ expected.T)
    assert op.num_matvecs == 3


def test_frozen_parameters_and_buffers_are_outside_the_space():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().eval()
    model[0].weight.requires_grad_(False)
    wrapper = ModelWrapper(model, Objective())
    assert wrapper.names == ["0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    assert wrapper.num_params == 4 + 4 + 4 + 8 + 2
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    torch.testing.assert_close(
        wrapper.values(Objective().per_example_loss, (x, y)),
        nn.functional.cross_entropy(model(x), y, reduction="none"),
    )


def test_wrapper_never_mutates_the_module():
    problem = make_logistic_problem()
    before = {k: v.clone() for k, v in problem.model.state_dict().items()}
    wrapper = ModelWrapper(problem.model, Objective("bce_with_logits", problem.wd))
    wrapper.hvp(IndexedData((problem.x, problem.y)), torch.ones(1, 5, dtype=torch.float64), 8)
    for k, v in problem.model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in problem.model.parameters())


def test_flatten_unflatten_round_trip():
    wrapper = ModelWrapper(_mlp(), Objective())
    flat = torch.randn(2, wrapper.num_params, dtype=torch.float64)
    torch.testing.assert_close(wrapper.flatten(wrapper.unflatten(flat), batch_dims=1), flat)


@pytest.mark.parametrize("form", ["tuple", "dict", "dataset", "loader"])
def test_data_forms_give_identical_gradients(form):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 3, (10,))
    data = {
        "tuple": (x, y),
        "dict": {"inputs": x, "targets": y},
        "dataset": TensorDataset(x, y),
        "loader": DataLoader(TensorDataset(x, y), batch_size=3),
    }[form]
    wrapper = ModelWrapper(_mlp(), Objective(weight_decay=0.1))
    indexed = IndexedData(data)
    got = torch.cat([wrapper.train_grads(b) for _, b in indexed.chunks(4)])
    torch.testing.assert_close(got, wrapper.train_grads((x, y)))


class _SquareWithoutJvp(torch.autograd.Function):
    """x**2 with a backward written in torch ops (twice differentiable) but no jvp."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _NoForwardAD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(_SquareWithoutJvp.apply(self.a(x)))


def test_missing_forward_ad_needs_no_fallback_in_the_default_mode():
    import warnings

    from infl import InflWarning, ModelStateError

    model = _NoForwardAD().double().eval()
    reference_model = _NoForwardAD().double().eval()  # the same weights, squared by hand
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    objective = Objective(weight_decay=0.1)
    wrapper = ModelWrapper(model, objective)
    vectors = torch.randn(2, wrapper.num_params, dtype=torch.float64)
    # the default is a double backward, which needs no forward-mode derivative
    assert wrapper.second_order == "reverse-over-reverse"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hv = wrapper.hvp((x, y), vectors, chunk_size=4)
    assert not [w for w in caught if issubclass(w.category, InflWarning)]
    assert wrapper.second_order == "reverse-over-reverse"
    # the Gauss-Newton product's J v is a jvp under "auto": it moves to the vjp once, saying so
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gv = wrapper.ggn_vp((x, y), vectors, chunk_size=4)
        gv_again = wrapper.ggn_vp((x, y), vectors, chunk_size=4)
    ours = [w for w in caught if issubclass(w.category, InflWarning)]
    assert len(ours) == 1
    assert "vjp of u -> J^T u" in str(ours[0].message)
    torch.testing.assert_close(gv, gv_again)
    # a dense reference of the same function (x * x instead of the custom op)
    reference_model.forward = lambda inp: reference_model.b(reference_model.a(inp) ** 2)
    plain = ModelWrapper(reference_model, objective)
    dense = HessianOperator(plain, IndexedData((x, y)), chunk_size=6).to_dense()
    torch.testing.assert_close(hv, vectors @ dense)
    torch.testing.assert_close(gv, plain.ggn_vp((x, y), vectors, chunk_size=6))
    strict = ModelWrapper(model, objective, second_order="forward-over-reverse")
    with pytest.raises(ModelStateError, match=r"forward-mode derivative.*second_order='auto'"):
        strict.hvp((x, y), vectors, chunk_size=4)
    with pytest.raises(ValueError, match="second_order must be"):
        ModelWrapper(model, objective, second_order="backward")  # type: ignore[arg-type]


class _DistanceLogits(nn.Module):
    """Logits = minus the distances to learned centres: ``torch.cdist`` has neither a double
    backward nor a forward-mode derivative in PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(3, 4)
        self.centres = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return -torch.cdist(self.a(x), self.centres)


def test_a_model_no_mode_can_differentiate_twice_is_refused_naming_the_fix():
    import warnings

    from infl import InflWarning, ModelStateError

    model = _DistanceLogits().double().eval()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    wrapper = ModelWrapper(model, Objective(weight_decay=0.1))
    vectors = torch.randn(2, wrapper.num_params, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ModelStateError, match=r"second derivative of '?_cdist_backward.*EKFAC"):
            wrapper.hvp((x, y), vectors, chunk_size=4)
    # auto tried the other mode once (and said so) before refusing
    ours = [w for w in caught if issubclass(w.category, InflWarning)]
    assert len(ours) == 1
    assert "forward-over-reverse" in str(ours[0].message)
    strict = ModelWrapper(model, Objective(), second_order="reverse-over-reverse")
    with pytest.raises(ModelStateError, match=r"second derivative.*second_order='auto'"):
        strict.hvp((x, y), vectors, chunk_size=4)
    # per-example gradients need only first derivatives
    assert wrapper.train_grads((x, y)).shape == (6, wrapper.num_params)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_both_second_order_modes_equal_the_dense_logistic_hessian(logistic, k):
    data = (logistic.x, logistic.y)
    expected = reference.hessian(logistic.theta, logistic.x, logistic.y, logistic.wd)
    vectors = torch.randn(k, expected.shape[0], dtype=torch.float64)
    for mode in ("reverse-over-reverse", "forward-over-reverse"):
        wrapper = ModelWrapper(
            logistic.model, Objective("bce_with_logits", logistic.wd), second_order=mode
        )
        got = wrapper.hvp(IndexedData(data), vectors, chunk_size=7)
        torch.testing.assert_close(got, vectors @ expected, rtol=1e-10, atol=1e-12)
        # the forward-over-reverse function is built once and reused across calls and chunks
        assert wrapper.hvp(data, vectors, chunk_size=7).shape == (k, expected.shape[0])


def test_hvp_of_a_loss_linear_in_the_parameters_is_the_weight_decay():
    # l(z) = sum of the outputs of a linear model: its Hessian is 0, so H = Lambda
    model = nn.Linear(3, 2).double().eval()
    wrapper = ModelWrapper(model, Objective(lambda m, b: m(b[0]).sum(dim=1), weight_decay=0.3))
    x = torch.randn(5, 3, dtype=torch.float64)
    vectors = torch.randn(2, wrapper.num_params, dtype=torch.float64)
    got = wrapper.hvp((x, torch.zeros(5)), vectors, chunk_size=2)
    torch.testing.assert_close(got, 0.3 * vectors)
    torch.testing.assert_close(wrapper.hvp((x, torch.zeros(5)), vectors[:1], 2), 0.3 * vectors[:1])


# ---------------------------------------------------------------- weight decay per parameter
_GROUP_DECAY = {"default": 0.05, "no_decay": ["bias"], "overrides": {"2.weight": 0.01}}
_DECAYS = [0.05, 0.0, 0.01, 0.0]  # 0.weight 0.bias 2.weight 2.bias


class _Regularised(nn.Module):
    """The hand-built objective's model: outputs and 1/2 sum_j lambda_j ||theta_j||^2."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = [p for _, p in self.net.named_parameters()]
        reg = sum(0.5 * wd * (p * p).sum() for p, wd in zip(params, _DECAYS, strict=True))
        return self.net(x), reg


def _hand_loss(model, batch) -> torch.Tensor:
    out, reg = model(batch[0])
    return torch.nn.functional.cross_entropy(out, batch[1], reduction="none") + reg


def _hand_measure(model, batch) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(batch[0])[0], batch[1], reduction="none")


def _group_problem():
    net = _mlp()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    groups = ModelWrapper(net, Objective("cross_entropy", weight_decay=_GROUP_DECAY))
    hand = ModelWrapper(_Regularised(net).eval(), Objective(_hand_loss, weight_decay=0.0))
    return net, groups, hand, (x, y)


def test_group_decay_equals_a_hand_built_objective_for_grads_hvps_and_ggn():
    from infl import GaussNewtonOperator

    net, groups, hand, data = _group_problem()
    assert groups.decays == _DECAYS
    sizes = [15, 5, 15, 3]
    expected = torch.cat(
        [torch.full((s,), wd, dtype=torch.float64) for s, wd in zip(sizes, _DECAYS, strict=True)]
    )
    torch.testing.assert_close(groups.decay, expected, rtol=0, atol=0)
    torch.testing.assert_close(
        groups.train_grads(data), hand.train_grads(data), rtol=1e-10, atol=1e-12
    )
    indexed = IndexedData(data)
    dense = HessianOperator(groups, indexed, chunk_size=5).to_dense()
    torch.testing.assert_close(
        dense, HessianOperator(hand, indexed).to_dense(), rtol=1e-10, atol=1e-12
    )
    plain = ModelWrapper(net, Objective("cross_entropy", weight_decay=0.0))
    ggn = GaussNewtonOperator(groups, indexed).to_dense()
    ggn0 = GaussNewtonOperator(plain, indexed).to_dense()
    torch.testing.assert_close(ggn, ggn0 + torch.diag(expected), rtol=1e-10, atol=1e-12)


def test_group_decay_influence_equals_the_hand_built_objective():
    from infl import ExactHessian, InfluenceCalculator

    net, _, _, data = _group_problem()
    test = (data[0][:4], data[1][:4])
    kw = {"progress": False, "check_minimum": False}
    got = InfluenceCalculator(
        net,
        Objective("cross_entropy", weight_decay=_GROUP_DECAY),
        data,
        ExactHessian(damping=1.0),
        **kw,
    ).influence(test)
    want = InfluenceCalculator(
        _Regularised(net).eval(),
        Objective(_hand_loss, 0.0),
        data,
        ExactHessian(damping=1.0),
        measurement=_hand_measure,
        **kw,
    ).influence(test)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_stationarity_names_the_per_parameter_decay_the_model_was_trained_with():
    import reference

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    y = (torch.rand(40, generator=gen, dtype=torch.float64) < torch.sigmoid(x[:, 0] + 1)).double()
    decay = torch.tensor([0.05, 0.05, 0.05, 0.0], dtype=torch.float64)
    theta = torch.zeros(4, dtype=torch.float64)
    for _ in range(40):
        g = reference.per_example_grads(theta, x, y, 0.0).mean(0) + decay * theta
        h = reference.hessian(theta, x, y, 0.0) + torch.diag(decay)
        theta = theta - torch.linalg.solve(h, g)
    model = reference.load_into(nn.Linear(3, 1).double().eval(), theta)
    data = IndexedData((x, y))

    def check(objective: Objective):
        w = ModelWrapper(model, objective)
        return w.check_stationarity(w.iter_train_grads(data, 16), len(data))

    assert check(Objective("bce_with_logits", {"default": 0.05, "no_decay": ["bias"]})).is_minimum
    wrong = check(Objective("bce_with_logits", 0.05))
    assert not wrong.is_minimum
    assert wrong.wrong_decay_groups
    assert dict(wrong.implied_by_parameter)["weight"] == pytest.approx(0.05, rel=1e-6)
    with pytest.warns(Warning, match=r"weight decay per parameter \(weight ~ 0.05, bias ~ 0\)"):
        wrong.warn_if_not_minimum()


# ---------------------------------------------------------------- per-example gradients, nn.Linear
def test_linear_model_per_example_grads_take_the_batched_path_and_equal_a_loop():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(),
                          nn.Linear(6, 3)).double().eval()  # fmt: skip
    model[2].weight.requires_grad_(False)  # a frozen weight: its bias stays in the space
    wrapper = ModelWrapper(model, Objective())
    assert wrapper._linear_grads.applicable
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=gen)
    first = wrapper.per_example_grads(wrapper.objective.per_example_loss, (x[:5], y[:5]))
    # checked once against vmap(grad), then taken for every later batch
    assert wrapper._linear_verified[wrapper.objective.per_example_loss] is True
    second = wrapper.per_example_grads(wrapper.objective.per_example_loss, (x[5:], y[5:]))
    expected = reference.loop_ce_grads(model, x, y)
    torch.testing.assert_close(torch.cat([first, second]), expected, rtol=1e-12, atol=1e-14)


def test_a_model_that_mixes_the_batch_keeps_vmap_per_example_gradients():
    model = BatchCentred().double().eval()
    wrapper = ModelWrapper(model, Objective())
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    loss = wrapper.objective.per_example_loss
    got = wrapper.per_example_grads(loss, (x, y))
    assert wrapper._linear_verified[loss] is False
    # each example's gradient is that of the example alone (what vmap computes)
    torch.testing.assert_close(got, reference.loop_ce_grads(model, x, y))
    torch.testing.assert_close(wrapper.per_example_grads(loss, (x, y)), got)


def test_models_with_other_layers_keep_vmap_per_example_gradients():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double().eval()
    wrapper = ModelWrapper(model, Objective())
    assert not wrapper._linear_grads.applicable
    x = torch.randn(5, 1, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    got = wrapper.per_example_grads(wrapper.objective.per_example_loss, (x, y))
    torch.testing.assert_close(got, reference.loop_ce_grads(model, x, y))


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)),  # the nn.Linear shortcut
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)),  # layer_grads
        nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(16, 3)),  # vmap(grad)
    ],
    ids=["linear", "conv2d", "vmap"],
)
def test_train_grads_written_into_out_are_the_formed_ones(model):
    """``out=`` (the rows of a gradient cache) receives the training gradients, weight decay
    included, by every route, and is what is returned; a wrong shape or dtype is refused."""
    model = model.double().eval()
    wrapper = ModelWrapper(model, Objective("cross_entropy", weight_decay=0.1))
    gen = torch.Generator().manual_seed(0)
    shape = {nn.Linear: (4,), nn.Conv2d: (1, 4, 4), nn.Conv1d: (1, 10)}[type(model[0])]
    x = torch.randn(5, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    for _ in range(2):  # the check of the shortcut, then the shortcut
        expected = wrapper.train_grads((x, y))
        cache = torch.full((7, wrapper.num_params), float("nan"), dtype=torch.float64)
        got = wrapper.train_grads((x, y), out=cache[1:6])
        assert got.data_ptr() == cache[1].data_ptr()
        torch.testing.assert_close(cache[1:6], expected, rtol=1e-12, atol=1e-14)
        assert cache[[0, 6]].isnan().all()  # no row outside out
    with pytest.raises(InputError, match=r"out must be a \[5, "):
        wrapper.train_grads((x, y), out=torch.empty(4, wrapper.num_params, dtype=torch.float64))
    with pytest.raises(InputError, match="float64"):
        wrapper.train_grads((x, y), out=torch.empty(5, wrapper.num_params, dtype=torch.float32))
