"""One view of "who am I in the job", whatever launched the process.

Why: torchrun, Intel MPI/MPICH (PMI_*) and Open MPI (OMPI_COMM_WORLD_*) each name rank and
world differently; the recipe only ever asks this module.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
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


def resolve_backend(requested: str, device_type: str) -> str:
    """Map `auto` to the backend of the device; check that asked-for backends exist."""
    if requested == "auto":
        return {"cpu": "gloo", "xpu": "xccl", "cuda": "nccl"}[device_type]
    if requested == "ccl":
        try:
            import oneccl_bindings_for_pytorch  # noqa: F401  (registers the 'ccl' backend)
        except ImportError:
            raise DistributedError(
                "backend 'ccl' needs oneccl_bindings_for_pytorch (retired after torch 2.8; use the legacy image) "
                "- on current PyTorch use 'xccl' for Intel GPUs"
            ) from None
    if requested == "xccl" and not (hasattr(dist, "is_xccl_available") and dist.is_xccl_available()):
        raise DistributedError("backend 'xccl' is not available in this PyTorch build (needs PyTorch >= 2.8 with XPU)")
    return requested


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
    """Sum a tensor over ranks (identity in a single process)."""
    if world.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(world: WorldView) -> None:
    if world.distributed:
        dist.barrier()


def broadcast_object(obj: object, world: WorldView) -> object:
    """Send a small picklable object from rank 0 to everyone."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def destroy(world: WorldView) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
