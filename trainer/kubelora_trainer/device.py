"""Device choice and hardware facts: one code path for cpu, xpu and cuda.

Why: the recipe never branches on the device beyond what this module returns, so a
laptop CPU, an Intel GPU and an NVIDIA GPU run the same code.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: CPU flags that decide bf16 matmul speed on Intel Xeons (AMX since Sapphire Rapids).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx_vnni")


class DeviceError(RuntimeError):
    """The requested device is not available here."""


@dataclass(frozen=True)
class DeviceInfo:
    """What the run is computing on, recorded in the log and summary.json."""

    type: str  # "cpu" | "xpu" | "cuda"
    index: int | None
    name: str
    isa: dict[str, bool] = field(default_factory=dict)
    threads: int = 1

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type if self.index is None else f"{self.type}:{self.index}")

    def describe(self) -> str:
        isa = ",".join(k for k, v in self.isa.items() if v) or "none"
        extra = f" isa={isa} threads={self.threads}" if self.type == "cpu" else ""
        return f"{self.type}{'' if self.index is None else ':' + str(self.index)} ({self.name}){extra}"


def xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def cpu_isa_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, bool]:
    """Read the ISA flags that matter for bf16 training from /proc/cpuinfo (False when unknown)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return dict.fromkeys(ISA_FLAGS, False)
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {f: f in flags for f in ISA_FLAGS}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def select_device(requested: str, local_rank: int = 0) -> DeviceInfo:
    """Resolve `auto|cpu|xpu|cuda` to a concrete device; `auto` prefers xpu, then cuda, then cpu."""
    if requested == "auto":
        requested = "xpu" if xpu_available() else "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "xpu":
        if not xpu_available():
            raise DeviceError("device 'xpu' requested but torch.xpu.is_available() is False (no Intel GPU or driver)")
        torch.xpu.set_device(local_rank)
        return DeviceInfo("xpu", local_rank, torch.xpu.get_device_name(local_rank))
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device 'cuda' requested but torch.cuda.is_available() is False")
        torch.cuda.set_device(local_rank)
        return DeviceInfo("cuda", local_rank, torch.cuda.get_device_name(local_rank))
    if requested == "cpu":
        return DeviceInfo("cpu", None, cpu_name(), cpu_isa_flags(), torch.get_num_threads())
    raise DeviceError(f"unknown device {requested!r}: use auto, cpu, xpu or cuda")


def native_bf16(device: DeviceInfo) -> bool:
    """Whether bf16 matmuls run on hardware units (else oneDNN emulates them, far slower than fp32)."""
    if device.type in ("xpu", "cuda"):
        return True
    return bool(device.isa.get("amx_bf16") or device.isa.get("avx512_bf16"))


def resolve_dtype(requested: str, device: DeviceInfo) -> tuple[str, str]:
    """Resolve `auto` to bf16 or fp32 for this device; returns (dtype, reason) for the log."""
    if requested != "auto":
        return requested, "asked for in model.dtype"
    if native_bf16(device):
        return "bf16", f"{device.type} computes bf16 natively"
    return "fp32", "this CPU has no AMX or AVX512-BF16, so bf16 matmuls would be emulated"


def synchronize(device: DeviceInfo) -> None:
    """Wait for queued kernels so wall-clock timings are honest."""
    module = _accelerator_module(device)
    if module is not None:
        module.synchronize()


def _accelerator_module(device: DeviceInfo) -> Any | None:
    """`torch.cuda` or `torch.xpu` (the same synchronize and memory-statistics API), None on CPU."""
    return getattr(torch, device.type) if device.type in ("cuda", "xpu") else None


def allocated_memory_bytes(device: DeviceInfo) -> int | None:
    """Accelerator memory held by tensors now, or None on CPU: read after loading, it is what the model
    (a rank's share of it, when sharded) costs before any activation exists."""
    module = _accelerator_module(device)
    return int(module.memory_allocated()) if module is not None else None


def peak_memory_bytes(device: DeviceInfo) -> int | None:
    """Peak accelerator memory, or None on CPU (RSS is recorded separately)."""
    module = _accelerator_module(device)
    return int(module.max_memory_allocated()) if module is not None else None
