"""chunk_size="auto": the chunk picked from the measured activations, the rule, its errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import infl
from infl.chunking import (
    AUTO_CHUNK_BYTES,
    MAX_AUTO_CHUNK,
    ActivationProbe,
    auto_chunk_size,
    check_chunk_size,
)
from infl.errors import InputError

CPU = torch.device("cpu")


def _calc(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    solver: infl.Solver | None = None,
    **kw: object,
) -> infl.InfluenceCalculator:
    return infl.InfluenceCalculator(
        model,
        infl.Objective("cross_entropy"),
        (x, y),
        solver or infl.ExactHessian(damping=0.1),
        progress=False,
        check_minimum=False,
        **kw,  # type: ignore[arg-type]
    )


class WideConv(nn.Module):
    """One 3x3 convolution to ``channels`` maps of 32x32, then a linear head on their means."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.head = nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_rule_is_the_largest_power_of_two_within_the_bytes() -> None:
    assert auto_chunk_size(None, CPU) == MAX_AUTO_CHUNK
    assert auto_chunk_size(0, CPU) == MAX_AUTO_CHUNK
    assert auto_chunk_size(12, CPU) == MAX_AUTO_CHUNK
    per = 64 * 32 * 32 * 4  # a [64, 32, 32] float32 map: 256 KiB
    assert auto_chunk_size(per, CPU) == 64
    assert 64 * per <= AUTO_CHUNK_BYTES < 128 * per
    assert auto_chunk_size(AUTO_CHUNK_BYTES // 3, CPU) == 2
    assert auto_chunk_size(AUTO_CHUNK_BYTES * 5, CPU) == 1  # too big for one: still 1
    assert auto_chunk_size(per, torch.device("meta")) == MAX_AUTO_CHUNK  # off the CPU


def test_probe_records_the_largest_output_per_example() -> None:
    model = WideConv(8)
    probe = ActivationProbe()
    with probe.watching(model, 4):
        model(torch.randn(4, 3, 32, 32))
    assert probe.largest == 8 * 32 * 32 * 4  # the conv's output, float32
    model(torch.randn(4, 3, 64, 64))  # hooks removed: this larger output is not recorded
    assert not model.conv._forward_hooks
    assert probe.largest == 8 * 32 * 32 * 4


def test_probe_reads_tuple_and_dict_outputs() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return x, {"wide": x.repeat(1, 3)}

    probe = ActivationProbe()
    with probe.watching(Pair(), 2):
        Pair()(torch.zeros(2, 5, dtype=torch.float64))
    assert probe.largest == 0  # the probe watched another instance
    pair = Pair()
    with probe.watching(pair, 2):
        pair(torch.zeros(2, 5, dtype=torch.float64))
    assert probe.largest == 15 * 8


def test_auto_picks_a_smaller_chunk_for_wide_activations() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 2, (6,))
    wide = _calc(WideConv(64), x, y)
    assert wide.wrapper.activation_bytes == 64 * 32 * 32 * 4
    assert wide.chunk_size == 64
    narrow = _calc(WideConv(2), x, y)
    assert narrow.chunk_size == MAX_AUTO_CHUNK
    given = _calc(WideConv(64), x, y, chunk_size=5)
    assert given.chunk_size == 5  # a number is kept
    assert given.wrapper.activation_bytes is None  # and nothing is measured for it


def test_auto_fits_a_memory_budget() -> None:
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    model = nn.Linear(4, 3)  # p = 15
    calc = _calc(model, x, y, memory_budget=2 * 15 * 4 * 10)  # 10 chunks' rows fit
    assert calc.chunk_size == 10
    with pytest.raises(InputError, match="lower chunk_size to 10"):
        _calc(model, x, y, memory_budget=2 * 15 * 4 * 10, chunk_size=11)


def test_scores_do_not_depend_on_the_chunk() -> None:
    torch.manual_seed(1)
    model = WideConv(64).double()
    x, y = torch.randn(40, 3, 32, 32, dtype=torch.float64), torch.randint(0, 2, (40,))
    solver = infl.KFAC(damping=0.1, fisher="empirical")
    auto = _calc(model, x, y, solver)
    assert auto.chunk_size == 32  # float64 maps: 512 KiB per example, so two chunks
    whole = _calc(model, x, y, solver, chunk_size=40)
    test = (x[:3], y[:3])
    torch.testing.assert_close(auto.influence(test), whole.influence(test), rtol=1e-10, atol=0)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "big", True, None])
def test_bad_chunk_sizes_are_refused(bad: object) -> None:
    with pytest.raises(InputError, match="positive integer or 'auto'"):
        check_chunk_size(bad)
    with pytest.raises(InputError, match="chunk_size"):
        _calc(nn.Linear(4, 3), torch.randn(5, 4), torch.randint(0, 3, (5,)), chunk_size=bad)


def test_attribution_baselines_take_auto() -> None:
    from infl.attribution import _common, grad_dot

    torch.manual_seed(2)
    model = WideConv(64).double()
    x, y = torch.randn(40, 3, 32, 32, dtype=torch.float64), torch.randint(0, 2, (40,))
    wrapper, *_ = _common.setup(model, infl.Objective("cross_entropy"), (x, y), (x, y), None)
    assert _common.chunk_of(wrapper, "auto") == 32
    assert _common.chunk_of(wrapper, 7) == 7
    objective = infl.Objective("cross_entropy")
    test = (x[:3], y[:3])
    torch.testing.assert_close(
        grad_dot(model, objective, (x, y), test),
        grad_dot(model, objective, (x, y), test, chunk_size=40),
        rtol=1e-12,
        atol=0,
    )
    with pytest.raises(InputError, match="positive integer or 'auto'"):
        grad_dot(model, objective, (x, y), test, chunk_size="big")  # type: ignore[arg-type]
