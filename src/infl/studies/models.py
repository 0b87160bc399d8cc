"""The models of the fragility study (Basu, Pope & Feizi, ICLR 2021), sized for infl.

Each function returns a freshly initialised ``nn.Module`` mapping a batch of inputs to class
logits ``[n, num_classes]``. Parameter counts for the default arguments:

=============================================  ===========================  ============
model                                          input                        parameters
=============================================  ===========================  ============
``mlp(4, 3, width=5, depth=1)`` (iris)         ``[n, 4]``                   43
``mlp(64, 10, width=32, depth=2)`` (digits)    ``[n, 64]``                  3,466
``small_cnn()`` (digits images)                ``[n, 1, 8, 8]``             2,514
``lenet()`` (MNIST)                            ``[n, 1, 28, 28]``           61,706
``small_resnet()`` (CIFAR-10)                  ``[n, 3, 32, 32]``           78,042
=============================================  ===========================  ============

Design rules, all for influence functions:

* **No BatchNorm.** Influence is computed at fixed parameters in eval mode, where BatchNorm
  uses running statistics that were not what training minimised (train mode normalises with
  batch statistics, coupling the examples of a batch, so a per-example loss/gradient is not
  even defined). The residual network uses GroupNorm, which normalises each example on its own
  and behaves identically in train and eval mode; the other models use no normalisation.
* **torch.func friendly.** No in-place operations, no ``.item()`` or data-dependent Python
  control flow in ``forward``, no dropout; so ``functional_call`` + ``vmap`` + ``grad``
  (infl's per-example gradients) work on every model.
* **Seeded initialisation.** ``seed=k`` draws the initial weights under
  ``torch.manual_seed(k)`` inside a forked RNG, leaving the global RNG untouched; the same
  seed gives the same weights. ``seed=None`` uses the global RNG, as ``nn`` layers do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, TypeVar

import torch
from torch import nn

from infl.errors import InputError

__all__ = ["count_parameters", "lenet", "mlp", "small_cnn", "small_resnet"]

Activation = Literal["relu", "tanh"]
_M = TypeVar("_M", bound=nn.Module)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable, by default) scalar parameters of ``model``: infl's ``p``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "tanh":
        return nn.Tanh()
    raise InputError(f"activation must be 'relu' or 'tanh', got {name!r}")


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _build(seed: int | None, make: Callable[[], _M]) -> _M:
    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


# --------------------------------------------------------------------------- MLP
def mlp(
    in_features: int,
    num_classes: int,
    width: int,
    depth: int,
    activation: Activation = "relu",
    *,
    seed: int | None = None,
) -> nn.Sequential:
    """A fully connected network with ``depth`` hidden layers of ``width`` units.

    ``Linear(in, w) → act → [Linear(w, w) → act] × (depth - 1) → Linear(w, C)``;
    ``depth = 0`` is multinomial logistic regression ``Linear(in, C)``.

    Parameters (:math:`d` = ``in_features``, :math:`w` = ``width``, :math:`L` = ``depth``,
    :math:`C` = ``num_classes``):
    :math:`p = (d+1)w + (L-1)(w+1)w + (w+1)C` for :math:`L \\ge 1`, and :math:`(d+1)C` for
    :math:`L = 0`. Basu et al.'s iris grid: ``mlp(4, 3, width=5, depth=1)`` has 43,
    ``depth=8`` has 253, ``mlp(4, 3, width=50, depth=1)`` has 403.

    Parameters
    ----------
    in_features
        Input dimension :math:`d` (inputs ``[n, d]``).
    num_classes
        Number of output logits :math:`C`.
    width
        Hidden units per layer :math:`w`.
    depth
        Number of hidden layers :math:`L` (0 allowed).
    activation
        ``"relu"`` or ``"tanh"`` (smooth, so the Hessian is defined everywhere).
    seed
        Seed of the initial weights (see the module docstring).

    Returns
    -------
    nn.Sequential
        ``[n, d] → [n, C]``.

    Examples
    --------
    >>> from infl.studies.models import count_parameters, mlp
    >>> count_parameters(mlp(4, 3, width=5, depth=1))
    43
    """
    _positive("in_features", in_features)
    _positive("num_classes", num_classes)
    _positive("width", width)
    _positive("depth", depth, minimum=0)
    _activation(activation)

    def make() -> nn.Sequential:
        if depth == 0:
            return nn.Sequential(nn.Linear(in_features, num_classes))
        layers: list[nn.Module] = [nn.Linear(in_features, width), _activation(activation)]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), _activation(activation)]
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)

    return _build(seed, make)


# --------------------------------------------------------------------------- small CNN
def small_cnn(
    num_classes: int = 10, activation: Activation = "relu", *, seed: int | None = None
) -> nn.Sequential:
    """A 2,514-parameter CNN for 8x8 single-channel images (the shipped digits).

    Basu et al. (§5.2) study a small CNN of about 2.6k parameters on MNIST; this is the same
    scale for :func:`infl.studies.datasets.load_digits` with ``images=True``::

        [n, 1, 8, 8]  Conv 3x3 (1→12, pad 1)  → act → MaxPool 2   [n, 12, 4, 4]   120
                      Conv 3x3 (12→16, pad 1) → act → MaxPool 2   [n, 16, 2, 2]  1,744
                      Flatten → Linear(64, C)                     [n, C]           650

    Total for ``C = 10``: 120 + 1,744 + 650 = **2,514** parameters (``65·C + 1,864`` in
    general).

    Parameters
    ----------
    num_classes
        Number of output logits :math:`C`.
    activation
        ``"relu"`` or ``"tanh"``.
    seed
        Seed of the initial weights.

    Returns
    -------
    nn.Sequential
        ``[n, 1, 8, 8] → [n, C]``.
    """
    _positive("num_classes", num_classes)
    _activation(activation)

    def make() -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(1, 12, kernel_size=3, padding=1),
            _activation(activation),
            nn.MaxPool2d(2),
            nn.Conv2d(12, 16, kernel_size=3, padding=1),
            _activation(activation),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 2 * 2, num_classes),
        )

    return _build(seed, make)


# --------------------------------------------------------------------------- LeNet-5
def lenet(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    activation: Activation = "relu",
    *,
    seed: int | None = None,
) -> nn.Sequential:
    """LeNet-5 (LeCun et al., 1998) for MNIST-sized images, without normalisation.

    ::

        [n, c, s, s]  Conv 5x5 (c→6, pad 2)  → act → MaxPool 2    [n, 6, s/2, s/2]
                      Conv 5x5 (6→16)        → act → MaxPool 2    [n, 16, k, k]
                      Flatten → Linear(16k², 120) → act → Linear(120, 84) → act
                      → Linear(84, C)

    with :math:`k = \\lfloor(\\lfloor s/2\\rfloor - 4)/2\\rfloor`. For MNIST
    (``c = 1, s = 28``, ``k = 5``) and ``C = 10`` the model has **61,706** parameters
    (156 + 2,416 + 48,120 + 10,164 + 850); for ``c = 3, s = 32`` (``k = 6``) 83,126.

    Parameters
    ----------
    num_classes
        Number of output logits :math:`C`.
    in_channels
        Image channels :math:`c`.
    image_size
        Height = width :math:`s` of the (square) input, at least 12.
    activation
        ``"relu"`` (default) or ``"tanh"`` (as in the original LeNet-5).
    seed
        Seed of the initial weights.

    Returns
    -------
    nn.Sequential
        ``[n, c, s, s] → [n, C]``.
    """
    _positive("num_classes", num_classes)
    _positive("in_channels", in_channels)
    _positive("image_size", image_size, minimum=12)
    _activation(activation)
    k = (image_size // 2 - 4) // 2

    def make() -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
            _activation(activation),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            _activation(activation),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * k * k, 120),
            _activation(activation),
            nn.Linear(120, 84),
            _activation(activation),
            nn.Linear(84, num_classes),
        )

    return _build(seed, make)


# --------------------------------------------------------------------------- ResNet
def _norm(channels: int, norm: str, groups: int) -> nn.Module:
    if norm == "group":
        return nn.GroupNorm(math.gcd(groups, channels), channels)
    return nn.Identity()


class _BasicBlock(nn.Module):
    """Pre-addition residual block: ``act(x' + shortcut(x))``, ``x' = N(conv(act(N(conv x))))``."""

    def __init__(
        self, c_in: int, c_out: int, stride: int, activation: str, norm: str, groups: int
    ) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = _norm(c_out, norm, groups)
        self.act1 = _activation(activation)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.norm2 = _norm(c_out, norm, groups)
        self.act2 = _activation(activation)
        self.shortcut: nn.Module
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias), _norm(c_out, norm, groups)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class _ResNet(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        width: int,
        blocks_per_stage: int,
        activation: str,
        norm: str,
        groups: int,
    ) -> None:
        super().__init__()
        bias = norm == "none"
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=bias),
            _norm(width, norm, groups),
            _activation(activation),
        )
        blocks: list[nn.Module] = []
        c_in = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(_BasicBlock(c_in, c_out, stride, activation, norm, groups))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(h), 1))


def small_resnet(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 16,
    blocks_per_stage: int = 1,
    activation: Activation = "relu",
    *,
    norm: Literal["group", "none"] = "group",
    groups: int = 8,
    seed: int | None = None,
) -> nn.Module:
    """A small CIFAR-style ResNet (He et al., 2016) with GroupNorm instead of BatchNorm.

    A 3x3 stem convolution to ``w`` channels, then three stages of ``blocks_per_stage`` basic
    blocks with ``w, 2w, 4w`` channels (the first block of stages 2 and 3 has stride 2 and a
    1x1 convolution shortcut), global average pooling and ``Linear(4w, C)``. Works for any
    input size (the pooling is adaptive); for CIFAR-10 ``[n, 3, 32, 32]`` the feature maps
    are 32², 16², 8².

    GroupNorm (``gcd(groups, channels)`` groups) replaces BatchNorm: it normalises each
    example on its own, so per-example gradients are well defined and train/eval mode give
    the same function (see the module docstring). With ``norm="group"`` convolutions have no
    bias (the norm's affine shift plays that role); with ``norm="none"`` they do.

    Parameter counts (``C = 10``, ``c = 3``): ``width=16, blocks_per_stage=1`` (default):
    **78,042**; ``width=16, blocks_per_stage=3`` (ResNet-20 layout): 272,474;
    ``width=8, blocks_per_stage=1``: 19,954.

    Parameters
    ----------
    num_classes
        Number of output logits :math:`C`.
    in_channels
        Image channels :math:`c`.
    width
        Channels ``w`` of the first stage.
    blocks_per_stage
        Residual blocks per stage (3 gives the ResNet-20 layout).
    activation
        ``"relu"`` or ``"tanh"``.
    norm
        ``"group"`` (GroupNorm) or ``"none"`` (no normalisation).
    groups
        Maximum number of GroupNorm groups.
    seed
        Seed of the initial weights.

    Returns
    -------
    nn.Module
        ``[n, c, H, W] → [n, C]``.
    """
    _positive("num_classes", num_classes)
    _positive("in_channels", in_channels)
    _positive("width", width)
    _positive("blocks_per_stage", blocks_per_stage)
    _positive("groups", groups)
    _activation(activation)
    if norm not in ("group", "none"):
        raise InputError(
            f"norm must be 'group' or 'none', got {norm!r} (BatchNorm is deliberately not "
            "offered: it makes per-example gradients ill-defined)"
        )
    return _build(
        seed,
        lambda: _ResNet(
            num_classes, in_channels, width, blocks_per_stage, activation, norm, groups
        ),
    )
