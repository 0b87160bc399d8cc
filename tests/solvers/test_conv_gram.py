"""The patch Gram of a stride-1 convolution by shifted correlations, against ``unfold``."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from infl import KFAC, HessianOperator, IndexedData, ModelWrapper, Objective
from infl.layer_grads import conv_padding
from infl.solvers import conv_gram

pytestmark = pytest.mark.usefixtures("float64_default")

GEOMETRIES = [
    (kernel, dilation, padding, size)
    for kernel, dilation, padding, size in itertools.product(
        [(3, 3), (1, 1), (5, 3), (2, 2)],
        [(1, 1), (2, 1)],
        [0, 1, 2, "same", "valid"],
        [(7, 9), (4, 4), (1, 5)],
    )
    if not (
        padding == "same" and any(d * (k - 1) % 2 for d, k in zip(dilation, kernel, strict=True))
    )
]


def unfold_gram(x: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv_padding(conv))
    return torch.einsum("bit,bjt->ij", patches, patches), patches.sum((0, 2))


@pytest.mark.parametrize(("kernel", "dilation", "padding", "size"), GEOMETRIES)
def test_patch_gram_and_sums_equal_the_unfold_patches(kernel, dilation, padding, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, kernel, dilation=dilation, padding=padding)
    x = torch.randn(4, 3, *size)
    scale = float((x**2).sum())  # the size of every entry's terms, also where A is 0
    h_out, w_out = conv_gram.output_size(x, conv)
    if h_out * w_out == 0:  # no patch fits (unfold refuses these)
        d = conv.weight[0].numel()
        assert torch.equal(conv_gram.patch_gram(x, conv), torch.zeros(d, d))
        return
    expected, sums = unfold_gram(x, conv)
    assert conv(x).shape[2:] == (h_out, w_out)
    torch.testing.assert_close(conv_gram.patch_gram(x, conv), expected, rtol=0, atol=1e-13 * scale)
    torch.testing.assert_close(conv_gram.patch_sums(x, conv), sums, rtol=1e-12, atol=1e-12)


def test_patch_gram_is_zero_where_no_patch_fits():
    conv = nn.Conv2d(2, 1, 5)  # no padding: a 3x3 image has no 5x5 patch
    x = torch.randn(2, 2, 3, 3)
    assert conv_gram.output_size(x, conv) == (0, 0)
    assert torch.equal(conv_gram.patch_gram(x, conv), torch.zeros(50, 50))


@pytest.mark.parametrize("stride", [(1, 1), (2, 2), (3, 1)])
def test_output_size_is_the_convolutions(stride):
    conv = nn.Conv2d(2, 1, 3, stride=stride, padding=1, dilation=(1, 2))
    x = torch.randn(1, 2, 9, 8)
    assert conv_gram.output_size(x, conv) == tuple(conv(x).shape[2:])


@pytest.mark.parametrize(
    ("conv", "expected"),
    [
        (nn.Conv2d(2, 3, 3, padding=1), True),
        (nn.Conv2d(2, 3, 3, stride=2, padding=1), False),
        (nn.Conv2d(2, 4, 3, groups=2), False),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), False),
        (nn.Conv2d(2, 3, (3, 2), padding="same"), False),  # asymmetric "same"
    ],
)
def test_applies_to_plain_stride_one_convolutions(conv, expected):
    assert conv_gram.applies(conv) is expected


def test_prefer_takes_the_correlations_where_they_save_work():
    conv3 = nn.Conv2d(64, 64, 3, padding=1)
    assert conv_gram.prefer(torch.empty(256, 64, 32, 32), conv3)  # a ResNet's first stage
    assert not conv_gram.prefer(torch.empty(256, 12, 4, 4), nn.Conv2d(12, 16, 3, padding=1))
    # a 1x1 convolution has one tap: the correlation is the patch product itself
    assert not conv_gram.prefer(torch.empty(256, 256, 32, 32), nn.Conv2d(256, 64, 1))
    plan = conv_gram._plan_of(torch.empty(1, 1, 8, 8), conv3)
    assert plan is not None
    assert len(plan.correlations) == 13  # (2*3-1)^2 = 25 shifts, 12 of them transposes
    assert len(plan.pairs) == 45  # tap pairs on and above the diagonal


@pytest.mark.parametrize("bias", [True, False])
def test_kfac_input_factor_by_correlation_equals_the_unfold_route(monkeypatch, bias):
    """A of a stride-1 convolution (bias column included) is the same whether K-FAC sums the
    ``unfold`` patches or the correlations; a convolution called twice joins both calls."""
    torch.manual_seed(3)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=2, dilation=2, bias=bias)
            self.head = nn.Linear(3 * 25, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(1))

    model, x, y = Net(), torch.randn(10, 3, 5, 5), torch.randint(0, 4, (10,))
    op = HessianOperator(
        ModelWrapper(model, Objective("cross_entropy", 0.0)), IndexedData((x, y)), 4
    )
    factors = {}
    for route in (True, False):
        monkeypatch.setattr(conv_gram, "prefer", lambda x, conv, r=route: r)
        fitted = KFAC(damping=0.1, seed=0).fit(op)
        factors[route] = fitted.partition.layers[0].A
    torch.testing.assert_close(factors[True], factors[False], rtol=1e-12, atol=1e-13)
    h1 = torch.tanh(model.conv(x))
    patches = [F.unfold(t, 3, padding=2, dilation=2) for t in (x, h1)]
    if bias:
        patches = [torch.cat([p, torch.ones(10, 1, p.shape[2])], dim=1) for p in patches]
    joined = torch.cat(patches, dim=2)
    expected = torch.einsum("bit,bjt->ij", joined, joined) / 10
    torch.testing.assert_close(factors[True], expected, rtol=1e-12, atol=1e-13)
