"""A leaner forward for peft's LoRA linear layers.

Why: peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: two full-size
elementwise passes (scale, add) per adapted layer forward, one more in backward, and autograd
computes ``lora_B``'s gradient as ``grad^T @ h`` on a transposed view, a skinny GEMM that runs
far below the CPU's GEMM speed. This forward does the same arithmetic as one in-place ``addmm_`` on
the base output (scaling folded into ``alpha``) with a contiguous ``B^T``, whose gradient autograd
then takes as ``h^T @ grad``, a fast shape (figures: docs/benchmarks.md). Same parameters, same
adapter files. Under torch.compile (`compileLayers`) the in-place form would be traced into a copy
plus an out-of-place addmm, so there the rank-r product is a plain sum that inductor folds into the
next fused kernel (on one H200 the copies were ~3 ms of a 100 ms step).

It is an instance-level replacement of ``forward`` on ``peft.tuners.lora.layer.Linear`` modules
and steps aside (calls peft's own forward) for anything it does not cover: merged or disabled
adapters, several active adapters, variants such as DoRA, mixed-batch adapter names, LoRA bias,
or dtypes that differ between input, base and adapter weights. Under autocast it uses the
out-of-place ``addmm`` so that autocast picks the compute dtype.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.compiler import is_compiling


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = self.active_adapters
    if self.disable_adapters or self.merged or args or kwargs or len(active) != 1:
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    if name in self.lora_variant or name not in self.lora_A or self.lora_B[name].bias is not None:
        return type(self).forward(self, x, *args, **kwargs)
    weight_a, weight_b, base = self.lora_A[name].weight, self.lora_B[name].weight, self.base_layer
    autocast = torch.is_autocast_enabled(x.device.type)
    if not autocast and not (x.dtype == weight_a.dtype == weight_b.dtype == base.weight.dtype):
        return type(self).forward(self, x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])
    out = F.linear(flat, base.weight, base.bias)
    low_rank = F.linear(self.lora_dropout[name](flat), weight_a)
    scaling = self.scaling[name]
    if is_compiling():
        # Traced (`compileLayers`): an in-place addmm_ becomes an out-of-place addmm there, which first
        # copies the base output; a plain sum lets inductor add the rank-r product inside the next
        # pointwise kernel (RoPE, SwiGLU, the residual add) instead. Scaling goes on the small B.
        out = out + torch.mm(low_rank, (weight_b * scaling).t())
    else:
        b_t = weight_b.t().contiguous()
        out = torch.addmm(out, low_rank, b_t, alpha=scaling) if autocast else out.addmm_(low_rank, b_t, alpha=scaling)
    return out.view(*x.shape[:-1], out.shape[-1])


def enable(model: nn.Module) -> int:
    """Install the fused forward on every plain LoRA linear layer of ``model``; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and isinstance(module.base_layer, nn.Linear):
            module.forward = types.MethodType(_fused_forward, module)  # type: ignore[method-assign]  # per instance, on purpose
            count += 1
    return count


def disable(model: nn.Module) -> None:
    """Back to peft's own forward everywhere."""
    for module in model.modules():
        if "forward" in vars(module) and getattr(module.forward, "__func__", None) is _fused_forward:
            del module.forward
