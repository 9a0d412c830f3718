"""One view of "who am I in the job", whatever launched the process.

Why: torchrun, Intel MPI/MPICH (PMI_*) and Open MPI (OMPI_COMM_WORLD_*) each name rank and
world differently; the recipe only ever asks this module.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """The process group could not be formed or a backend is unavailable."""


@dataclass(frozen=True)
class WorldView:
    """Rank, world size and local rank of this process, plus where the rendezvous is."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # none | torchrun | mpi

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for n in names:
        if env.get(n, "") != "":
            return int(env[n])
    return None


def world_from_env(env: Mapping[str, str] | None = None) -> WorldView:
    """Build the view from torchrun's or an MPI launcher's environment (single process when neither)."""
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldView(int(env["RANK"]), int(env["WORLD_SIZE"]), _int(env, "LOCAL_RANK") or 0, addr, port, "torchrun")
    rank = _int(env, "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
    size = _int(env, "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
    if rank is not None and size is not None:
        local = _int(env, "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "PALS_LOCAL_RANKID") or 0
        return WorldView(rank, size, local, addr, port, "mpi")
    return WorldView()


# `auto` per device type. On accelerators the process group gets gloo beside the device backend:
# nccl and xccl reduce device tensors only, and a stray CPU-tensor collective, which without gloo fails
# with "No backend type associated with device type cpu", then still works.
AUTO_BACKENDS = {"cpu": "gloo", "cuda": "cpu:gloo,cuda:nccl", "xpu": "cpu:gloo,xpu:xccl"}


def resolve_backend(requested: str, device_type: str) -> str:
    """Map `auto` to the backend(s) of the device; check that asked-for backends exist."""
    if requested == "auto":
        requested = AUTO_BACKENDS[device_type]
    names = backend_devices(requested).values()
    if "ccl" in names:
        try:
            import oneccl_bindings_for_pytorch  # noqa: F401  (registers the 'ccl' backend)
        except ImportError:
            raise DistributedError(
                "backend 'ccl' needs oneccl_bindings_for_pytorch (retired after torch 2.8; use the legacy image) "
                "- on current PyTorch use 'xccl' for Intel GPUs"
            ) from None
    if "xccl" in names and not (hasattr(dist, "is_xccl_available") and dist.is_xccl_available()):
        raise DistributedError("backend 'xccl' is not available in this PyTorch build (needs PyTorch >= 2.8 with XPU)")
    return requested


# Which device types a single-name backend reduces (torch's own table, spelled out so the check
# below needs no process group): a device-only backend rejects CPU tensors.
_SINGLE_BACKEND_DEVICES = {"gloo": ("cpu", "cuda"), "nccl": ("cuda",), "xccl": ("xpu",), "ccl": ("cpu", "xpu"),
                           "mpi": ("cpu", "cuda")}


def backend_devices(backend: str) -> dict[str, str]:
    """`cpu:gloo,cuda:nccl` -> {cpu: gloo, cuda: nccl}; a single name -> the device types it serves."""
    if ":" not in backend:
        return {d: backend for d in _SINGLE_BACKEND_DEVICES.get(backend, ("cpu", "cuda", "xpu"))}
    return dict(part.split(":", 1) for part in backend.split(","))


def check_collective_device(tensor: torch.Tensor, backend: str) -> None:
    """Fail with the reason, not NCCL's "No backend type associated with device type cpu", when a
    collective's tensor lives on a device the process group cannot reduce."""
    served = backend_devices(backend)
    if tensor.device.type not in served:
        raise DistributedError(
            f"collective on a {tensor.device.type} tensor over backend {backend!r}, which reduces only "
            f"{'/'.join(sorted(served))} tensors (a kubelora bug: collectives run on the training device)"
        )


def init_process_group(world: WorldView, backend: str, timeout_s: int) -> None:
    """Join the job's process group; a missing peer ends in an error after `timeout_s`, not a hang."""
    if not world.distributed or dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", world.master_addr)
    os.environ.setdefault("MASTER_PORT", str(world.master_port))
    try:
        dist.init_process_group(
            backend=backend,
            rank=world.rank,
            world_size=world.world_size,
            timeout=_dt.timedelta(seconds=timeout_s),
        )
    except Exception as err:  # noqa: BLE001 - re-raised with the context users need
        raise DistributedError(
            f"rank {world.rank}/{world.world_size} could not join the process group at "
            f"{world.master_addr}:{world.master_port} with backend {backend}: {err}"
        ) from err


def all_reduce_sum(value: torch.Tensor, world: WorldView) -> torch.Tensor:
    """Sum a tensor over ranks in place (identity in a single process).

    The tensor must live on the training device (`on_device` below builds such tensors): the
    device backends (nccl, xccl) reduce nothing else, and gloo-only CPU runs never show the mistake,
    so the device is checked against the group's backend on every call.
    """
    if world.distributed:
        check_collective_device(value, str(dist.get_backend()))
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def any_rank(flags: Sequence[bool], world: WorldView, device: torch.device) -> list[bool]:
    """For each flag, True on every rank when any rank set it: one tiny all-reduce on the training
    device for all of them, so that all ranks take the same decisions (stop, checkpoint) at the same step."""
    if not world.distributed:
        return list(flags)
    value = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    return [v > 0 for v in all_reduce_sum(value, world).tolist()]


def barrier(world: WorldView) -> None:
    if world.distributed:
        dist.barrier()


def destroy(world: WorldView) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
