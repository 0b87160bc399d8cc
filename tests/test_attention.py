"""Stock attention (nn.TransformerEncoderLayer, nn.MultiheadAttention) through infl.

The references here use only torch: a dense Hessian by ``torch.autograd.functional.hessian``
on the flat parameters and per-example gradients by a loop of ``torch.autograd.grad``, with the
math attention kernel (the fused CPU kernel has no double backward).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from infl import (
    ConjugateGradient,
    InfluenceCalculator,
    ModelStateError,
    ModelWrapper,
    Objective,
    RetrainConfig,
    retrain_ground_truth,
)

WD = 0.01
N = 6  # training examples
SEQ, DIM, FEATURES = 5, 8, 3


class EncoderClassifier(nn.Module):
    """Linear embedding, one stock encoder layer, mean pooling, linear head."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, DIM)
        self.encoder = nn.TransformerEncoderLayer(
            DIM, nhead=2, dim_feedforward=8, dropout=dropout, batch_first=True
        )
        self.head = nn.Linear(DIM, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class AttentionClassifier(nn.Module):
    """Linear embedding, stock multi-head self-attention, mean pooling, linear head."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, DIM)
        self.attention = nn.MultiheadAttention(DIM, 2, dropout=dropout, batch_first=True)
        self.head = nn.Linear(DIM, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(self.attention(h, h, h, need_weights=False)[0].mean(dim=1))


MODELS = [EncoderClassifier, AttentionClassifier]


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, SEQ, FEATURES, generator=gen, dtype=torch.float64)
    return x, (x[:, :, 0].mean(dim=1) > 0).long()


def _model(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().double().eval()


def _flat_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The objective J as a function of the flat parameter vector (torch only)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, sizes)
        params = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        out = functional_call(model, params, (x,))
        return F.cross_entropy(out, y) + WD / 2 * (flat @ flat)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return loss, theta


@functools.cache
def _dense_hessian(cls: type[nn.Module], n: int) -> torch.Tensor:
    """The dense Hessian of J over the first ``n`` examples (computed once per model class)."""
    model = _model(cls)
    loss, theta = _flat_loss(model, *_data(n))
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(
            loss, theta, vectorize=True, outer_jacobian_strategy="forward-mode"
        )


@pytest.mark.parametrize("cls", MODELS)
def test_hvp_and_ggn_equal_dense_references(cls):
    model = _model(cls)
    x, y = _data(N)
    wrapper = ModelWrapper(model, Objective("cross_entropy", weight_decay=WD))
    _, theta = _flat_loss(model, x, y)
    dense = _dense_hessian(cls, N)
    with sdpa_kernel(SDPBackend.MATH):
        jac = torch.autograd.functional.jacobian(
            lambda t: functional_call(model, _unflat(model, t), (x,)), theta
        )  # [b, C, p]
    vectors = torch.randn(3, theta.numel(), dtype=torch.float64)
    assert wrapper.second_order == "reverse-over-reverse"  # the default: a double backward
    torch.testing.assert_close(wrapper.hvp((x, y), vectors, chunk_size=3), vectors @ dense)
    # GGN: J^T (diag(p) - p p^T) J / b + wd I, J from torch's jacobian
    probs = torch.softmax(model(x), dim=1).detach()
    h_out = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    ggn = torch.einsum("bcp,bcd,bdq->pq", jac, h_out, jac) / x.shape[0]
    ggn = ggn + WD * torch.eye(theta.numel(), dtype=torch.float64)
    torch.testing.assert_close(wrapper.ggn_vp((x, y), vectors, chunk_size=3), vectors @ ggn)
    # the double backward worked with the math kernel: no fallback was needed
    assert wrapper.second_order == "reverse-over-reverse"
    forward = ModelWrapper(
        model, Objective("cross_entropy", weight_decay=WD), second_order="forward-over-reverse"
    )
    torch.testing.assert_close(forward.hvp((x, y), vectors, chunk_size=3), vectors @ dense)
    torch.testing.assert_close(forward.ggn_vp((x, y), vectors, chunk_size=3), vectors @ ggn)
    assert forward.second_order == "forward-over-reverse"
    # the global fast-path switch is restored after every call
    assert torch.backends.mha.get_fastpath_enabled()


def _unflat(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


@pytest.mark.parametrize("cls", MODELS)
def test_per_example_grads_equal_an_autograd_loop(cls):
    model = _model(cls)
    x, y = _data(3)
    wrapper = ModelWrapper(model, Objective("cross_entropy"))
    got = wrapper.per_example_grads(wrapper.objective.per_example_loss, (x, y))
    rows = []
    for i in range(3):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, model.parameters())])
        )
    torch.testing.assert_close(got, torch.stack(rows))


@pytest.mark.parametrize("cls", MODELS)
def test_fast_path_cannot_bypass_infl_parameters(cls):
    """Values (no_grad, where the fused fast path would run) come from infl's own copies."""
    model = _model(cls)
    x, y = _data(6)
    original = copy.deepcopy(model)
    wrapper = ModelWrapper(model, Objective("cross_entropy"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # training continues on the module
    expected = F.cross_entropy(original(x), y, reduction="none").detach()
    torch.testing.assert_close(wrapper.values(wrapper.objective.per_example_loss, (x, y)), expected)
    # values and gradients see one function: the loss is the one the gradients differentiate
    got = wrapper.per_example_grads(wrapper.objective.per_example_loss, (x, y))
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("cls", MODELS)
def test_cg_influence_and_a_retraining_check_run(cls):
    model = _model(cls)
    x, y = _data(N)
    test = _data(2, seed=1)
    before = copy.deepcopy(model.state_dict())
    objective = Objective("cross_entropy", weight_decay=WD)
    calc = InfluenceCalculator(
        model,
        objective,
        (x, y),
        ConjugateGradient(damping=2.5, rtol=1e-10),
        progress=False,
        check_minimum=False,
    )
    effect = calc.removal_effect(test)
    assert effect.shape == (2, N)
    assert torch.isfinite(effect).all()
    # the same scores from a dense solve of (H + 2.5 I); the untrained H is indefinite
    dense = _dense_hessian(cls, N)
    damped = dense + 2.5 * torch.eye(dense.shape[0], dtype=torch.float64)
    expected = -calc.test_grads(test) @ torch.linalg.solve(damped, calc.train_grads().T)
    torch.testing.assert_close(calc.influence(test), expected, rtol=1e-6, atol=1e-9)
    truth = retrain_ground_truth(
        model,
        objective,
        (x, y),
        test,
        [0, 1],
        config=RetrainConfig(optimizer="sgd", lr=0.05, max_steps=3, grad_tol=None),
        progress=False,
    )
    assert truth.raw_change.shape == (2, 2)
    assert torch.isfinite(truth.raw_change).all()
    for key, value in model.state_dict().items():  # the model object is never modified
        torch.testing.assert_close(value, before[key])
    assert not model.training


def test_train_mode_attention_dropout_is_refused():
    model = AttentionClassifier(dropout=0.1).double().train()
    with pytest.raises(ModelStateError, match=r"'attention'.*attention dropout 0\.1.*model\.eval"):
        ModelWrapper(model, Objective())
    ModelWrapper(AttentionClassifier(dropout=0.0).double().train(), Objective())  # no randomness
    layer = EncoderClassifier(dropout=0.1).double().train()
    with pytest.raises(ModelStateError, match=r"encoder\.self_attn.*model\.eval"):
        ModelWrapper(layer, Objective())
    ModelWrapper(layer.eval(), Objective())
    assert not layer.training


class FunctionalDropout(nn.Module):
    """A custom forward with F.dropout(training=True): invisible to a module scan."""

    def __init__(self, training_flag: bool | None) -> None:
        super().__init__()
        self.body = nn.Linear(FEATURES * SEQ, 2)
        self.flag = training_flag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        flag = self.training if self.flag is None else self.flag
        return self.body(F.dropout(h, 0.5, training=flag))


def test_functional_dropout_in_a_custom_forward_is_refused():
    x, y = _data(8)
    objective = Objective("cross_entropy")
    random_model = FunctionalDropout(training_flag=True).double().eval()
    with pytest.raises(ModelStateError, match=r"random.*training=self\.training.*model\.eval"):
        InfluenceCalculator(random_model, objective, (x, y), ConjugateGradient(), progress=False)
    honest = FunctionalDropout(training_flag=None).double().eval()  # training=self.training
    calc = InfluenceCalculator(
        honest, objective, (x, y), ConjugateGradient(), progress=False, check_minimum=False
    )
    assert calc.num_train == 8
