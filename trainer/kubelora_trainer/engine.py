"""The training engine: one seam between the recipe's loop and how gradients are synchronised.

Why: the recipe's loop is the same for one process, DDP and DeepSpeed ZeRO; only wrapping the
module, backward, the optimizer step (with clipping), accumulation without sync, checkpoint state
and "full LoRA weights on every rank" differ. Each engine answers those, so the recipe never asks
which one it has.

- ``PlainEngine``: one process, or DDP over the process group (the loss module wrapped in
  ``DistributedDataParallel``, ``no_sync`` on every micro-batch but the last);
- ``ZeroEngine``: DeepSpeed ZeRO-2/3 (``zero.ZeroRun``), which reduces and clips in its own step;
- ``FsdpEngine``: PyTorch FSDP2 over a model `fsdp.load_sharded` built already sharded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from . import checkpoint as ckpt
from . import fsdp, zero
from .distributed import WorldView


class Engine(Protocol):
    """What the recipe calls; `module` is what the loop runs forward on (and evaluates)."""

    module: nn.Module
    zero_stage: int

    @property
    def sharded(self) -> bool:
        """Whether weights are partitioned across ranks (then every rank takes part in generation)."""
        ...

    def no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> torch.Tensor | float:
        """Reduce, clip, update; returns the pre-clip global gradient norm.

        A 0-dim device tensor where the engine can: reading it (``float``) waits for the device, so
        the recipe reads it when the step is logged, after the optimizer's kernels are queued, not
        between backward and the update (where the device would idle while the host launches them).
        """
        ...

    def gathered(self) -> contextlib.AbstractContextManager:
        """Full trainable weights on every rank for the duration (a collective under ZeRO-3)."""
        ...

    def save(self, run_dir: Path, step: int, scheduler: Any, state: dict[str, Any], keep: int | None,
             is_main: bool) -> None: ...

    def load(self, ref: ckpt.CheckpointRef, scheduler: Any) -> None: ...


class PlainEngine:
    """A single process, or DDP when the world has more than one rank."""

    zero_stage = 0
    sharded = False

    def __init__(self, loss_module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                 max_grad_norm: float | None, world: WorldView, device_index: int | None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.module: nn.Module = loss_module
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.module = DDP(loss_module, device_ids=[device_index] if device_index is not None else None)

    def no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        if last_micro_batch or not hasattr(self.module, "no_sync"):
            return contextlib.nullcontext()
        return self.module.no_sync()  # type: ignore[operator]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]
        limit = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        self.optimizer.step()
        return norm.detach()

    def gathered(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def save(self, run_dir: Path, step: int, scheduler: Any, state: dict[str, Any], keep: int | None,
             is_main: bool) -> None:
        if is_main:
            ckpt.save(run_dir, step, self.model, self.optimizer, scheduler, state, keep=keep)

    def load(self, ref: ckpt.CheckpointRef, scheduler: Any) -> None:
        ckpt.load(ref, self.model, self.optimizer, scheduler)


class ZeroEngine:
    """DeepSpeed ZeRO around the loss module (`zero.ZeroRun`); checkpoints in the plain engine's format."""

    sharded = True

    def __init__(self, run: zero.ZeroRun) -> None:
        self.run = run
        self.module: nn.Module = run.engine
        self.zero_stage = run.stage

    def no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # `managed_gradient_accumulation: false`: step() is the boundary

    def backward(self, loss: torch.Tensor) -> None:
        self.run.backward(loss)

    def step(self) -> float:
        return self.run.step()

    def gathered(self) -> contextlib.AbstractContextManager:
        return self.run.gathered_trainable()

    def save(self, run_dir: Path, step: int, scheduler: Any, state: dict[str, Any], keep: int | None,
             is_main: bool) -> None:
        weights, optimizer_state = self.run.full_state(step)  # a collective: every rank gathers
        if is_main:
            ckpt.write(run_dir, step, weights, optimizer_state, scheduler.state_dict(), state, keep=keep)

    def load(self, ref: ckpt.CheckpointRef, scheduler: Any) -> None:
        self.run.load_full_state(*ckpt.read(ref))  # every rank reads the same rank-independent files
        ckpt.load_scheduler(ref, scheduler)


class FsdpEngine:
    """FSDP2 (`fsdp.shard`): forward/backward hooks gather each layer and reduce-scatter the LoRA
    gradients; the optimizer and clipping are torch's own over DTensor parameters."""

    zero_stage = 0
    sharded = True

    def __init__(self, loss_module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                 max_grad_norm: float | None) -> None:
        fsdp.shard_root(loss_module, model)
        self.module: nn.Module = loss_module
        self.model = model
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm

    def no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Set for the backward that follows the forward (FSDP reads the flag in its post-backward hook):
        accumulate unsharded LoRA gradients locally and reduce-scatter them once, on the last micro-batch."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.set_requires_gradient_sync(last_micro_batch, recurse=False)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]
        limit = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        norm = fsdp.grad_norm(torch.nn.utils.clip_grad_norm_(params, limit))
        self.optimizer.step()
        return norm

    def gathered(self) -> contextlib.AbstractContextManager:
        return fsdp.gathered_trainable(self.model)

    def save(self, run_dir: Path, step: int, scheduler: Any, state: dict[str, Any], keep: int | None,
             is_main: bool) -> None:
        weights, optimizer_state = fsdp.full_state(self.model, self.optimizer)  # a collective
        if is_main:
            ckpt.write(run_dir, step, weights, optimizer_state, scheduler.state_dict(), state, keep=keep)

    def load(self, ref: ckpt.CheckpointRef, scheduler: Any) -> None:
        fsdp.load_full_state(self.model, self.optimizer, *ckpt.read(ref))
        ckpt.load_scheduler(ref, scheduler)


def build(loss_module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
          ds_config: dict[str, Any] | None, max_grad_norm: float | None, world: WorldView,
          device_index: int | None, sharded_by_fsdp: bool = False) -> Engine:
    """DeepSpeed when a ZeRO config was built for this run, FSDP when the model was built sharded
    (`fsdp.load_sharded`), the plain engine otherwise."""
    if sharded_by_fsdp:
        return FsdpEngine(loss_module, model, optimizer, max_grad_norm)
    if ds_config is not None:
        return ZeroEngine(zero.ZeroRun.start(loss_module, model, optimizer, ds_config, world))
    return PlainEngine(loss_module, model, optimizer, max_grad_norm, world, device_index)
