"""K-FAC's input factor of a convolution: shifted correlations against ``unfold`` patches.

For each input shape, one chunk's patch Gram ``sum_{b,t} a a^T`` of a 3x3 "same" convolution,
computed the two ways infl knows: ``unfold`` patches summed by ``kronecker._add_gram`` (blocks
on and above the diagonal, then mirrored) and :func:`infl.solvers.conv_gram.patch_gram` (13
shifted correlations of the input). Reported: the best of ``--repeat`` alternating runs of
each, their ratio, the largest difference relative to the largest entry, and the route
:func:`~infl.solvers.conv_gram.prefer` picks. The shapes are a CIFAR ResNet's stride-1 layers
(``small_resnet(width=64)``, 256 examples), two smaller images near the route's limit
(``conv_gram.MAX_MACS_RATIO``) and the digits CNN's (``small_cnn``, float64).

    python benchmarks/bench_conv_gram.py [--repeat 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from infl.solvers import conv_gram
from infl.solvers.kronecker import _add_gram, _mirrored

SHAPES = [  # (examples, channels, side, dtype)
    (256, 3, 32, torch.float32),
    (256, 64, 32, torch.float32),
    (256, 128, 16, torch.float32),
    (256, 256, 8, torch.float32),
    (256, 64, 8, torch.float32),
    (256, 256, 4, torch.float32),
    (256, 1, 8, torch.float64),
    (256, 12, 4, torch.float64),
]


def by_unfold(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    patches = F.unfold(x, conv.kernel_size, padding=conv.padding).transpose(1, 2)
    total = x.new_zeros(patches.shape[-1], patches.shape[-1])
    _add_gram(total, patches)
    return _mirrored(total)


def seconds(
    fn: Callable[[torch.Tensor, nn.Conv2d], torch.Tensor], x: torch.Tensor, conv: nn.Conv2d
) -> float:
    start = time.perf_counter()
    fn(x, conv)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| input | dtype | unfold s | correlations s | unfold / correl. | rel. diff | prefer |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for b, c, side, dtype in SHAPES:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(b, c, side, side, generator=gen, dtype=dtype)
        conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        old, new = by_unfold(x, conv), conv_gram.patch_gram(x, conv)  # also warms up
        diff = float((old - new).abs().max() / old.abs().max())
        t_old = t_new = float("inf")
        for _ in range(args.repeat):  # alternate, so that both see the same machine
            t_old = min(t_old, seconds(by_unfold, x, conv))
            t_new = min(t_new, seconds(conv_gram.patch_gram, x, conv))
        route = "correlations" if conv_gram.prefer(x, conv) else "unfold"
        print(
            f"| [{b}, {c}, {side}, {side}] | {str(dtype).removeprefix('torch.')} | "
            f"{t_old:.4f} | {t_new:.4f} | {t_old / t_new:.2f} | {diff:.1e} | {route} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
