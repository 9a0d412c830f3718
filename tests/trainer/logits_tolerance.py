"""How close two computations of the same model's logits must be, in the dtype they ran in.

Why: bf16 keeps 8 significant bits, so two correct paths through the same weights (peft's LoRA
forward vs the fused one, 4-bit layers dequantized to bf16 in another order) round differently and
differ by a few units in the last place (ulps) *at the logits' own scale*: a real SmolLM2 has
logits near 30, where one bf16 ulp is 0.125, so the fp32 tolerance of 2e-4 fails on every bf16
CPU while a fixed 1.0 would hide a broken adapter on a small model. The bound here is counted in
ulps of the largest reference logit, and :func:`assert_adapter_shows` checks that the adapter moves
the logits by more than that bound, so a comparison within it still fails on a real mismatch.
"""

from __future__ import annotations

import math

import torch

#: fp32 paths differ by summation order only.
FP32_ATOL = FP32_RTOL = 1e-4


def bf16_ulp(scale: float) -> float:
    """Spacing of bf16 values at magnitude `scale` (eps times the enclosing power of two)."""
    eps = torch.finfo(torch.bfloat16).eps  # 2**-7: the spacing in [1, 2)
    return eps * 2.0 ** math.floor(math.log2(max(scale, torch.finfo(torch.bfloat16).tiny)))


def bf16_atol(reference: torch.Tensor, ulps: float) -> float:
    """`ulps` bf16 ulps at the largest magnitude in `reference`."""
    return ulps * bf16_ulp(float(reference.abs().max()))


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, dtype: str, ulps: float = 1.0) -> None:
    """Same dtype, and equal within fp32 summation noise or `ulps` bf16 ulps of the logits' scale."""
    assert actual.dtype == expected.dtype, f"{actual.dtype} != {expected.dtype}"
    if dtype == "fp32":
        torch.testing.assert_close(actual, expected, atol=FP32_ATOL, rtol=FP32_RTOL)
    else:
        atol = bf16_atol(expected, ulps)
        torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=0.0)


def tolerance(expected: torch.Tensor, dtype: str, ulps: float = 1.0) -> float:
    """The absolute bound :func:`assert_logits_close` allows at the largest logit."""
    if dtype == "fp32":
        return FP32_ATOL + FP32_RTOL * float(expected.abs().max())
    return bf16_atol(expected, ulps)


def assert_adapter_shows(with_adapter: torch.Tensor, without: torch.Tensor, dtype: str, ulps: float = 1.0) -> None:
    """The adapter changes the logits by more than the tolerance, so comparing within it means something."""
    moved = float((with_adapter.float() - without.float()).abs().max())
    bound = tolerance(with_adapter, dtype, ulps)
    assert moved > 4 * bound, f"the adapter moves the logits by {moved:.3g}, not clearly above the tolerance {bound:.3g}"
