"""infl.studies.models: parameter counts, shapes, no BatchNorm, torch.func per-example grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import infl
from infl.errors import InputError
from infl.studies.models import count_parameters, lenet, mlp, small_cnn, small_resnet

# (factory, input shape, expected parameter count) — the counts quoted in the docstrings
CASES = {
    "mlp_iris": (lambda: mlp(4, 3, width=5, depth=1, seed=0), (4,), 43),
    "mlp_iris_deep": (lambda: mlp(4, 3, width=5, depth=8, seed=0), (4,), 253),
    "mlp_iris_wide": (lambda: mlp(4, 3, width=50, depth=1, seed=0), (4,), 403),
    "mlp_digits_tanh": (lambda: mlp(64, 10, 32, 2, "tanh", seed=0), (64,), 3466),
    "logistic": (lambda: mlp(64, 10, width=7, depth=0, seed=0), (64,), 650),
    "small_cnn": (lambda: small_cnn(seed=0), (1, 8, 8), 2514),
    "lenet": (lambda: lenet(seed=0), (1, 28, 28), 61706),
    "lenet_rgb32": (lambda: lenet(in_channels=3, image_size=32, seed=0), (3, 32, 32), 83126),
    "small_resnet": (lambda: small_resnet(seed=0), (3, 32, 32), 78042),
    "resnet20_layout": (lambda: small_resnet(blocks_per_stage=3, seed=0), (3, 32, 32), 272474),
    "resnet_w8": (lambda: small_resnet(width=8, seed=0), (3, 32, 32), 19954),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parameter_counts_and_output_shapes(name):
    make, shape, expected = CASES[name]
    model = make().eval()
    assert count_parameters(model) == expected
    num_classes = 3 if name.startswith("mlp_iris") else 10
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("width", "depth"), [(5, 1), (5, 4), (17, 3), (50, 8)])
def test_mlp_parameter_formula(width, depth):
    d, c = 4, 3
    formula = (d + 1) * width + (depth - 1) * (width + 1) * width + (width + 1) * c
    assert count_parameters(mlp(d, c, width, depth)) == formula
    hidden = [m for m in mlp(d, c, width, depth) if isinstance(m, nn.Linear)]
    assert len(hidden) == depth + 1


def test_small_cnn_is_about_2_6k_parameters():
    assert 2400 <= count_parameters(small_cnn()) <= 2800
    assert count_parameters(small_cnn(num_classes=7)) == 65 * 7 + 1864


@pytest.mark.parametrize("name", list(CASES))
def test_no_batch_norm(name):
    model = CASES[name][0]()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: mlp(4, 3, width=5, depth=2), (4,)),
        (lambda: small_cnn(), (1, 8, 8)),
        (lambda: lenet(), (1, 28, 28)),
        (lambda: small_resnet(width=4, blocks_per_stage=2), (3, 16, 16)),
    ],
)
def test_train_and_eval_mode_give_the_same_function(make, shape):
    model = make()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
        single = model(x[:1])
    torch.testing.assert_close(train_out, eval_out)
    torch.testing.assert_close(single, eval_out[:1])  # no coupling between examples


def test_resnet_uses_group_norm_or_none():
    assert any(isinstance(m, nn.GroupNorm) for m in small_resnet().modules())
    plain = small_resnet(norm="none", width=4)
    assert not any(isinstance(m, nn.GroupNorm) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(InputError, match="BatchNorm"):
        small_resnet(norm="batch")  # type: ignore[arg-type]


def test_seed_fixes_the_weights_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = lenet(seed=5), lenet(seed=5), lenet(seed=6)
    assert torch.equal(torch.rand(3), expected_next)
    pa, pb, pc = (torch.nn.utils.parameters_to_vector(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: mlp(4, 3, width=0, depth=1), "width"),
        (lambda: mlp(4, 3, width=5, depth=-1), "depth"),
        (lambda: mlp(4, 3, width=5, depth=1, activation="sigmoid"), "activation"),
        (lambda: lenet(image_size=8), "image_size"),
        (lambda: small_cnn(num_classes=0), "num_classes"),
        (lambda: small_resnet(blocks_per_stage=0), "blocks_per_stage"),
    ],
)
def test_bad_arguments(call, words):
    with pytest.raises(InputError, match=words):
        call()


def _autograd_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = []
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


PER_EXAMPLE = {
    "mlp_relu": (lambda: mlp(4, 3, width=5, depth=3, seed=1), (4,), 3),
    "mlp_tanh": (lambda: mlp(4, 3, width=6, depth=2, activation="tanh", seed=1), (4,), 3),
    "small_cnn": (lambda: small_cnn(seed=1), (1, 8, 8), 10),
    "lenet": (lambda: lenet(seed=1), (1, 28, 28), 10),
    "small_resnet": (lambda: small_resnet(width=4, seed=1), (3, 8, 8), 10),
    # default channels (16/32/64, 8 GroupNorm groups) on a small image to keep it fast
    "small_resnet_default": (lambda: small_resnet(seed=1), (3, 8, 8), 10),
    "small_resnet_plain": (
        lambda: small_resnet(width=4, norm="none", activation="tanh", seed=1),
        (3, 8, 8),
        10,
    ),
}


@pytest.mark.parametrize("name", list(PER_EXAMPLE))
def test_torch_func_per_example_grads_equal_an_autograd_loop(name):
    make, shape, num_classes = PER_EXAMPLE[name]
    model = make().double().eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, *shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, num_classes, (3,), generator=gen)
    wrapper = infl.ModelWrapper(model, infl.Objective("cross_entropy"))
    got = wrapper.train_grads((x, y))
    assert got.shape == (3, count_parameters(model))
    expected = _autograd_loop(model, x, y)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
    assert float(expected.abs().max()) > 0  # a vacuous zero gradient would pass trivially
