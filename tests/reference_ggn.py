"""Independent float64 references for the Gauss-Newton matrix: per-example autograd output
Jacobians and autograd Hessians of the loss in the outputs. Nothing here imports infl."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

# the losses written out directly (per example, summed over output dimensions), for references
REFERENCE_LOSSES = {
    "cross_entropy": lambda out, y: F.cross_entropy(out, y, reduction="none"),
    "mse": lambda out, y: ((out - y) ** 2).sum(dim=1),
    "bce_with_logits": lambda out, y: F.binary_cross_entropy_with_logits(
        out, y, reduction="none"
    ).sum(dim=1),
}


def flat_params(model: nn.Module) -> tuple[torch.Tensor, list[tuple[str, torch.Size]]]:
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    return torch.cat([p.reshape(-1) for _, p in named]), [(n, p.shape) for n, p in named]


def reference_ggn(model, x, y, loss_fn, wd):
    """``(1/n) sum_i J_i^T H_out,i J_i + wd I``, from autograd per example."""
    flat0, layout = flat_params(model)

    def output(flat, xi):
        params, start = {}, 0
        for name, shape in layout:
            size = shape.numel()
            params[name] = flat[start : start + size].reshape(shape)
            start += size
        return functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0)

    p = flat0.numel()
    total = torch.zeros(p, p, dtype=torch.float64)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda f, i=i: output(f, x[i]), flat0)
        out = output(flat0, x[i]).detach()
        h_out = torch.autograd.functional.hessian(
            lambda o, i=i: loss_fn(o.unsqueeze(0), y[i : i + 1]).sum(), out
        )
        total += jac.T @ h_out @ jac
    return total / x.shape[0] + wd * torch.eye(p, dtype=torch.float64)
