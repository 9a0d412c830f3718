"""A leaner forward for peft's LoRA linear layers.

Why: peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: two full-size
elementwise passes (scale, add) per adapted layer forward, one more in backward, and autograd
computes ``lora_B``'s gradient as ``grad^T @ h`` on a transposed view, a skinny GEMM that runs
far below the CPU's GEMM speed. This forward does the same arithmetic as one in-place ``addmm_`` on
the base output (scaling folded into ``alpha``) with a contiguous ``B^T``, whose gradient autograd
then takes as ``h^T @ grad``, a fast shape (figures: docs/benchmarks.md). Same parameters, same
adapter files. Under torch.compile (`compileLayers`) the in-place form would be traced into a copy
plus an out-of-place addmm, so there the rank-r product is a plain sum that inductor folds into the
next fused kernel (on one H200 the copies were ~3 ms of a 100 ms step). With ``fold`` (the
`foldLora` setting), layers whose output is at least twice their input compute the rank-r product
inside the base GEMM instead (`_FoldedLowRank`), eager or compiled.

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
    no_dropout = isinstance(self.lora_dropout[name], nn.Identity)
    if getattr(self, "_kubelora_fold", False) and no_dropout and not (_trains(base.weight) or _trains(base.bias)):
        out = _FoldedLowRank.apply(flat, base.weight, base.bias, weight_a, weight_b, self.scaling[name])
        return out.view(*x.shape[:-1], out.shape[-1])
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


def _trains(t: torch.Tensor | None) -> bool:
    """A base weight or bias that wants a gradient: `_FoldedLowRank` gives the base none."""
    return t is not None and t.requires_grad


def folds(base: nn.Linear) -> bool:
    """Whether the rank-r product is folded into this layer's base GEMM (`_FoldedLowRank`): where the
    output is at least twice as wide as the input. Folding copies the input (``T x in``) and the frozen
    weight, and saves writing and re-reading the ``T x out`` product and one read of the ``T x out``
    output gradient: a clear gain for the MLP's gate/up projections (out = 2.7-4x in), none for k/v or
    down (out < in). For square q/o it measured no better than the sum, with one more copy of the weight
    kept for backward (H200 and AMX, docs/benchmarks.md), so those keep the sum."""
    return base.out_features >= 2 * base.in_features


class _FoldedLowRank(torch.autograd.Function):
    """``y = [x | x A^T] @ [W | s B]^T + bias``: the base and the adapter output in one GEMM.

    Why: apart from the frozen GEMMs, LoRA's cost is memory traffic, not arithmetic: the rank-r product
    ``(x A^T)(s B)^T`` is a ``T x out`` tensor written and read again, and in backward the output
    gradient is read once for the base layer and once more for the rank-r gradient. Appending the r
    rank-r activations to the input (K = in + r) makes the base GEMM add the adapter's output in its own
    accumulator (fp32, so the sum is exact to the GEMM's rounding), and in backward ``grad @ [W | s B]``
    gives the input's gradient and the rank-r activations' gradient in one GEMM. Same arithmetic as
    peft's forward; the frozen weight gets no gradient (autograd on the concatenated weight would
    compute a full ``out x in`` one, hence this Function). Compute dtype: the input's (or autocast's)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x_dtype = x.dtype
        x, weight = x.to(dt), weight.to(dt)
        a_c = a.to(dt)
        low_rank = x @ a_c.t()
        joined_w = torch.cat((weight, (b * scaling).to(dt)), dim=1)
        out = F.linear(torch.cat((x, low_rank), dim=1), joined_w, None if bias is None else bias.to(dt))
        ctx.save_for_backward(x, low_rank, a_c, joined_w)
        ctx.scaling, ctx.dtypes = scaling, (x_dtype, a.dtype, b.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, low_rank, a_c, joined_w = ctx.saved_tensors
        grad = grad.to(x.dtype)
        n = x.shape[1]
        grad_x = None
        if ctx.needs_input_grad[0]:
            both = grad @ joined_w  # [T, in + r]: the input's gradient and the rank-r one, one GEMM
            grad_low = both[:, n:]
            grad_x = torch.addmm(both[:, :n], grad_low, a_c).to(ctx.dtypes[0])
        else:
            grad_low = grad @ joined_w[:, n:]
        grad_a = (grad_low.t() @ x).to(ctx.dtypes[1])
        grad_b = ((low_rank.t() @ grad).t() * ctx.scaling).to(ctx.dtypes[2])  # h^T @ grad: the fast shape
        return grad_x, None, None, grad_a, grad_b, None


def enable(model: nn.Module, fold: bool = False) -> int:
    """Install the fused forward on every plain LoRA linear layer of ``model``; returns how many.
    ``fold``: fold the rank-r product into the base GEMM where that pays (`folds`)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and isinstance(module.base_layer, nn.Linear):
            module.forward = types.MethodType(_fused_forward, module)  # type: ignore[method-assign]  # per instance, on purpose
            module._kubelora_fold = fold and folds(module.base_layer)  # type: ignore[assignment]  # a plain flag on the instance
            count += 1
    return count


def disable(model: nn.Module) -> None:
    """Back to peft's own forward everywhere."""
    for module in model.modules():
        if "forward" in vars(module) and getattr(module.forward, "__func__", None) is _fused_forward:
            del module.forward
            vars(module).pop("_kubelora_fold", None)
