"""Which batch format a run trains on when `training.paddingFree` is unset.

Why a rule of its own: per-sample attention (padding-free batches) pays only where attention's
arithmetic is what a step waits on: on a CPU in fp32 it beats padded rows; in bf16 on AMX or
AVX512-BF16 the big row-wide matmuls run fast and the many small per-sample kernels do not, and on a
GPU the per-sample kernel launches cost more than they save (figures: docs/benchmarks.md). So the
default follows the device and the compute dtype, and says why in the log.
"""

from __future__ import annotations


def padding_free_default(device_type: str, dtype: str) -> tuple[bool, str]:
    """(padding-free?, reason for the log) for a run that leaves `training.paddingFree` unset.

    `dtype` is the resolved compute dtype (bf16, fp16 or fp32), never `auto`.
    """
    if device_type != "cpu":
        return False, f"the default on {device_type}: one attention kernel per sample costs more in launches"
    if dtype == "fp32":
        return True, "the default on a CPU in fp32: per-sample attention skips padding and cross-sample scores"
    return False, f"the default on a CPU in {dtype}: row-wide bf16 matmuls beat per-sample attention kernels"


def choose_padding_free(setting: bool | None, compiled: bool, device_type: str, dtype: str) -> tuple[bool, str]:
    """(padding-free?, reason for the log) from `training.paddingFree`, before the model is asked
    whether it can attend per sample. Never under whole-model torch.compile: each new sample layout
    would recompile."""
    if setting is False:
        return False, "training.paddingFree is false"
    if compiled:
        return False, "torch.compile"
    if setting:
        return True, "asked for"
    return padding_free_default(device_type, dtype)
