"""Per-example gradients of convolutional models: infl's batched route against ``vmap(grad)``.

``infl.linear_grads`` replaces ``vmap(grad)`` for ``nn.Linear``-only models by one batched
backward pass and an outer product per layer (about 2.4x faster on the digits MLP), and
``infl.layer_grads`` does the same for convolutional and normalised models: each layer's input
and the gradient at its output from one backward pass, then per convolution either one
convolution with the batch as groups (narrow filters) or PyTorch's weight-gradient kernel example
by example (wide ones; ``GROUPED_MAX_INPUTS``), and GroupNorm's affine gradients from the
normalised input. This times that route (``ModelWrapper.per_example_grads``, after its one
check against autograd) beside ``vmap(grad)`` and beside an ``unfold`` + batched-product route
(the one an earlier pass measured and did not adopt); all three are checked against each other in
float64 before timing.

Usage::

    python benchmarks/bench_conv_grads.py            # digits CNN, GroupNorm ResNets; 1 thread
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from bench_hvp_routes import best
from torch import nn
from torch.func import functional_call, grad, vmap

from infl import ModelWrapper, Objective
from infl.studies import models

RECORDED = (nn.Linear, nn.Conv2d, nn.GroupNorm)


def hooked_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[b, p]`` per-example gradients of the summed cross-entropy from one backward pass."""
    seen: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if type(module) in RECORDED:

            def record(mod: nn.Module, args: Any, out: torch.Tensor, name: str = name) -> None:
                seen[name] = (mod, args[0].detach(), out)

            handles.append(module.register_forward_hook(record))
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), y, reduction="sum")
            names = list(seen)
            at_output = torch.autograd.grad(loss, [seen[n][2] for n in names])
    finally:
        for handle in handles:
            handle.remove()
    b = x.shape[0]
    parts: dict[str, torch.Tensor] = {}
    for name, g in zip(names, at_output, strict=True):
        module, a, _ = seen[name]
        if isinstance(module, nn.Linear):
            parts[f"{name}.weight"] = torch.einsum("bo,bi->boi", g, a).reshape(b, -1)
            if module.bias is not None:
                parts[f"{name}.bias"] = g
        elif isinstance(module, nn.Conv2d):
            cols = F.unfold(
                a,
                module.kernel_size,
                dilation=module.dilation,
                padding=module.padding,  # type: ignore[arg-type]
                stride=module.stride,
            )  # [b, in*k*k, L]
            flat = g.reshape(b, g.shape[1], -1)  # [b, out, L]
            parts[f"{name}.weight"] = torch.bmm(flat, cols.transpose(1, 2)).reshape(b, -1)
            if module.bias is not None:
                parts[f"{name}.bias"] = flat.sum(2)
        else:
            assert isinstance(module, nn.GroupNorm)
            normalised = F.group_norm(a, module.num_groups, None, None, module.eps)
            parts[f"{name}.weight"] = (g * normalised).flatten(2).sum(2)
            parts[f"{name}.bias"] = g.flatten(2).sum(2)
    return torch.cat([parts[name] for name, _ in model.named_parameters()], dim=1)


def vmapped_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[b, p]`` per-example gradients by ``vmap(grad)`` over single examples."""
    params = {name: q.detach() for name, q in model.named_parameters()}

    def single(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None], reduction="sum")

    grads = vmap(grad(single), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([grads[name].reshape(x.shape[0], -1) for name in params], dim=1)


def infl_grads(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x, y) -> [b, p]`` by ``infl.ModelWrapper.per_example_grads`` (its batched route)."""
    wrapper = ModelWrapper(model, Objective("cross_entropy", 0.0))
    loss = wrapper.objective.per_example_loss
    return lambda x, y: wrapper.per_example_grads(loss, (x, y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [
        ("digits CNN, float64, b = 256", models.small_cnn(seed=0).double(), (256, 1, 8, 8)),
        ("digits CNN, float32, b = 256", models.small_cnn(seed=0), (256, 1, 8, 8)),
        (
            "ResNet width 16, float32, b = 256",
            models.small_resnet(width=16, seed=0),
            (256, 3, 32, 32),
        ),
        (
            "ResNet width 64, float32, b = 128",
            models.small_resnet(width=64, seed=0),
            (128, 3, 32, 32),
        ),
    ]
    head = ["model", "p", "max relative difference (float64)", "infl s", "hooks + unfold s"]
    print("| " + " | ".join([*head, "vmap(grad) s", "vmap / infl"]) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, model, shape in cases:
        model.eval()
        dtype = next(model.parameters()).dtype
        x = torch.randn(*shape, dtype=dtype)
        y = torch.randint(0, 10, (shape[0],))
        # agreement in float64 (the method is exact: float32 round-off would blur the check)
        wide = copy.deepcopy(model).double()
        reference = vmapped_grads(wide, x.double(), y)
        diff = max(
            float((ours - reference).abs().max() / reference.abs().max())
            for ours in (hooked_grads(wide, x.double(), y), infl_grads(wide)(x.double(), y))
        )
        fast = infl_grads(model)
        fast(x[:2], y[:2])  # the one check against autograd
        ours_s = best(lambda: fast(x, y), args.repeat)  # noqa: B023
        hooks = best(lambda: hooked_grads(model, x, y), args.repeat)  # noqa: B023
        vmapped = best(lambda: vmapped_grads(model, x, y), args.repeat)  # noqa: B023
        p = sum(q.numel() for q in model.parameters())
        cells = [label, f"{p:,}", f"{diff:.1e}", f"{ours_s:.4f}", f"{hooks:.4f}"]
        print("| " + " | ".join([*cells, f"{vmapped:.4f}", f"{vmapped / ours_s:.2f}"]) + " |")


if __name__ == "__main__":
    main()
