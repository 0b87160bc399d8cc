"""Per-example gradients of convolutional and normalised models from one batched backward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference
from infl import ModelWrapper, Objective, layer_grads
from infl.layer_grads import LayerPerExampleGradients, conv_padding


def every_kind_of_conv() -> nn.Module:
    """Stride, dilation, groups, 'same' and 'valid' padding, a bias-free and a bias-only conv."""
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=2, bias=False),
        nn.Tanh(),
        nn.Conv2d(4, 3, 2, padding="valid"),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 5),
    )
    model[4].weight.requires_grad_(False)  # its bias stays in the space
    return model.double().eval()


def data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 7, 7, generator=gen, dtype=torch.float64), torch.randint(
        0, 5, (n,), generator=gen
    )


@pytest.mark.parametrize("threshold", [0, 10**12], ids=["kernel per example", "batch as groups"])
def test_conv_model_takes_the_batched_route_and_equals_a_loop(monkeypatch, threshold):
    monkeypatch.setattr(layer_grads, "GROUPED_MAX_INPUTS", threshold)
    model = every_kind_of_conv()
    wrapper = ModelWrapper(model, Objective())
    assert isinstance(wrapper._batched_grads, LayerPerExampleGradients)
    assert wrapper._batched_grads.applicable
    loss = wrapper.objective.per_example_loss
    x, y = data(9)
    first = wrapper.per_example_grads(loss, (x[:4], y[:4]))
    assert wrapper._linear_verified[loss] is True  # checked once against autograd
    monkeypatch.setattr(ModelWrapper, "_vmapped_grads", lambda *a: pytest.fail("vmap used"))
    second = wrapper.per_example_grads(loss, (x[4:], y[4:]))
    expected = reference.loop_ce_grads(model, x, y)
    torch.testing.assert_close(torch.cat([first, second]), expected, rtol=1e-12, atol=1e-14)


def test_float32_rows_agree_with_the_loop():
    model = every_kind_of_conv().float()
    wrapper = ModelWrapper(model, Objective())
    x, y = data(6)
    got = wrapper.per_example_grads(wrapper.objective.per_example_loss, (x.float(), y))
    assert wrapper._linear_verified[wrapper.objective.per_example_loss] is True
    torch.testing.assert_close(
        got, reference.loop_ce_grads(model, x.float(), y), rtol=1e-4, atol=1e-5
    )


class BatchCentredConv(nn.Module):
    """Subtracts the batch mean of a convolution's output: examples mix."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        return self.head(torch.tanh(z - z.mean(0, keepdim=True)).flatten(1))


def test_a_conv_model_that_mixes_the_batch_keeps_vmap():
    model = BatchCentredConv().double().eval()
    wrapper = ModelWrapper(model, Objective())
    assert wrapper._batched_grads.applicable
    gen = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(5, 1, 5, 5, generator=gen, dtype=torch.float64),
        torch.tensor([0, 1, 2, 0, 1]),
    )
    loss = wrapper.objective.per_example_loss
    got = wrapper.per_example_grads(loss, (x, y))
    assert wrapper._linear_verified[loss] is False
    # the gradient of each example alone, which is what vmap(grad) computes
    torch.testing.assert_close(got, reference.loop_ce_grads(model, x, y), rtol=1e-12, atol=1e-14)


class ConvTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(1))


def test_a_conv_called_twice_is_left_to_vmap():
    model = ConvTwice().double().eval()
    names = [n for n, _ in model.named_parameters()]
    shortcut = LayerPerExampleGradients(model, names)
    assert shortcut.applicable
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    params = {n: p.detach() for n, p in model.named_parameters()}

    def evaluate(leaves: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(model, leaves, (x,))
        return nn.functional.cross_entropy(out, y, reduction="none")

    assert shortcut(evaluate, params, 3) is None
    wrapper = ModelWrapper(model, Objective())
    got = wrapper.per_example_grads(wrapper.objective.per_example_loss, (x, y))
    torch.testing.assert_close(got, reference.loop_ce_grads(model, x, y), rtol=1e-12, atol=1e-14)


class SmallResNetBlock(nn.Module):
    """Convolutions with GroupNorm and eval-mode BatchNorm, a residual sum, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.gn(self.stem(x)))
        h = torch.relu(h + self.bn(self.conv(h)))
        return self.head(h.mean(dim=(2, 3)))


class SequenceModel(nn.Module):
    """Linear layers on [b, T, d] sequences with LayerNorm, pooled over T."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.embed(x))).mean(dim=1))


def test_normalised_models_take_the_batched_route_and_equal_a_loop():
    block = SmallResNetBlock()
    with torch.no_grad():  # running statistics that are not the identity
        block.bn.running_mean.uniform_(-0.5, 0.5)
        block.bn.running_var.uniform_(0.5, 2.0)
        for norm in (block.gn, block.bn):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    gen = torch.Generator().manual_seed(2)
    cases = [
        (block, torch.randn(6, 2, 5, 5, generator=gen, dtype=torch.float64)),
        (SequenceModel(), torch.randn(6, 4, 3, generator=gen, dtype=torch.float64)),
        (  # LayerNorm on [b, d]: no positions share its parameters
            nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 5)),
            torch.randn(6, 3, generator=gen, dtype=torch.float64),
        ),
    ]
    y = torch.randint(0, 5, (6,), generator=gen)
    for model, x in cases:
        model = model.double().eval()
        wrapper = ModelWrapper(model, Objective())
        assert wrapper._batched_grads.applicable
        loss = wrapper.objective.per_example_loss
        got = wrapper.per_example_grads(loss, (x, y))
        assert wrapper._linear_verified[loss] is True, type(model).__name__
        torch.testing.assert_close(
            got, reference.loop_ce_grads(model, x, y), rtol=1e-12, atol=1e-14
        )


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (nn.Sequential(nn.Linear(3, 2)), "no convolution: infl.linear_grads covers it"),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, affine=True), nn.Flatten()),
            "a trainable InstanceNorm2d",
        ),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)),
            "batch statistics in eval mode",
        ),
        (nn.Sequential(nn.Conv2d(1, 2, 2, padding="same"), nn.Flatten()), "asymmetric 'same'"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")), "reflect padding"),
    ],
)
def test_not_applicable(model, why):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not LayerPerExampleGradients(model, names).applicable, why


def test_conv_padding():
    assert conv_padding(nn.Conv2d(1, 1, 3, padding="same", dilation=2)) == (2, 2)
    assert conv_padding(nn.Conv2d(1, 1, (3, 5), padding="same")) == (1, 2)
    assert conv_padding(nn.Conv2d(1, 1, 3, padding="valid")) == (0, 0)
    assert conv_padding(nn.Conv2d(1, 1, 4, padding="same")) is None
    assert conv_padding(nn.Conv2d(1, 1, 3, padding=(2, 1))) == (2, 1)
