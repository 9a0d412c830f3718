"""Collectives run on tensors the process group's backend can reduce.

Why: every CPU test used gloo, which reduces CPU tensors, so a loop that all-reduced CPU tensors over
nccl (2x H200: "No backend type associated with device type cpu" at the end of step 1) passed them
all. These tests pin the device check that now guards every collective, and run the helpers on two
real gloo ranks under a process group whose only backend serves CPU through a device map, as the
accelerator defaults (`cpu:gloo,cuda:nccl`) do.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from kubelora_trainer.distributed import (
    AUTO_BACKENDS,
    DistributedError,
    WorldView,
    all_reduce_sum,
    any_rank,
    backend_devices,
    check_collective_device,
    resolve_backend,
)
from kubelora_trainer.evaluate import eval_loss


def test_a_cpu_tensor_over_a_device_only_backend_is_refused_with_the_reason() -> None:
    cpu = torch.zeros(1)
    for backend in ("nccl", "xccl", "cuda:nccl"):
        with pytest.raises(DistributedError, match="reduces only"):
            check_collective_device(cpu, backend)
    for backend in ("gloo", "cpu:gloo,cuda:nccl", "cpu:gloo,xpu:xccl", "cpu:gloo"):
        check_collective_device(cpu, backend)


def test_auto_gives_accelerators_a_cpu_backend_beside_the_device_one() -> None:
    assert resolve_backend("auto", "cpu") == "gloo"
    assert resolve_backend("auto", "cuda") == "cpu:gloo,cuda:nccl"
    assert backend_devices(AUTO_BACKENDS["xpu"]) == {"cpu": "gloo", "xpu": "xccl"}
    assert resolve_backend("nccl", "cuda") == "nccl"  # a single name stays: the user asked for it


class _SumLoss(torch.nn.Module):
    """Stands in for CausalLMLoss: (sum of the batch's values, their count), as tensors on its device."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.sum(), torch.tensor(x.numel(), device=x.device)


def _rank(rank: int, port: int, out: dict[int, tuple[bool, bool, float]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A device map naming CPU, as the accelerator defaults do: get_backend() reports the map.
    dist.init_process_group("cpu:gloo", rank=rank, world_size=2)
    try:
        world = WorldView(rank=rank, world_size=2)
        cpu = torch.device("cpu")
        only_rank1, nobody = any_rank([rank == 1, False], world, cpu)
        batches = [{"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0])}, {"x": torch.tensor([6.0])}]
        loss = eval_loss(_SumLoss(), batches, cpu, lambda: torch.autocast("cpu", enabled=False), world)
        total = all_reduce_sum(torch.tensor([float(rank + 1)]), world)
        assert float(total) == 3.0
        out[rank] = (only_rank1, nobody, loss)
    finally:
        dist.destroy_process_group()


def test_agreement_and_eval_loss_over_two_real_ranks() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(port, out), nprocs=2, join=True)
    # Both ranks agree that some rank wanted to stop, and that nobody did in the second round.
    assert out[0][:2] == out[1][:2] == (True, False)
    # Token-weighted mean over all batches, whichever rank evaluated which: (1+2+3+6)/4.
    assert out[0][2] == out[1][2] == pytest.approx(3.0)
