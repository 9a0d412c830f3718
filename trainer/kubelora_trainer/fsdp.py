"""PyTorch FSDP2 (`fully_shard`) for LoRA: the frozen base sharded from the moment it exists.

Why a second sharding engine beside DeepSpeed ZeRO-3: FSDP2 is part of torch (no extra package,
no JIT ops), shards per decoder layer with explicit prefetch of the next layer, and its parameters
are plain DTensors that torch's AdamW, gradient clipping and `distribute_tensor` understand, so the
recipe's own optimizer, loss and checkpoints work unchanged.

How a rank gets its shards without ever holding the whole base (`load_sharded`):

1. the model is built from its config on the meta device (no storage; buffers such as RoPE's
   `inv_freq` stay real);
2. LoRA is attached with peft as in any run (same seed, same RNG draws, so the same initial
   adapter as a single-process run); the adapter's small weights stay real;
3. each decoder layer becomes one FSDP unit, and the embedding, final norm and output head (tied
   or not) one more unit grouped over the decoder and the head, which is where the loss and
   generation both enter;
4. `to_empty` allocates each rank's shards only; every rank then reads its own rows of every base
   weight straight from the safetensors files (`safe_open(...).get_slice`), no collective and no
   full tensor anywhere.

Only the adapter's gradients are reduced (the base has none); with bf16 the base shards stay bf16,
LoRA keeps fp32 shards (the optimizer's masters) and is all-gathered in bf16 for compute
(`MixedPrecisionPolicy`), gradients are reduced in fp32.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

from .config import ConfigError, TrainerConfig
from .distributed import DistributedError, WorldView
from .model import DTYPES, ModelError, ModelSource, attention_kernel

#: LoRA inits that read the base weights (impossible on the meta device before the shards exist).
_BASE_READING_INITS = ("olora", "pissa", "loftq")


def wanted(cfg: TrainerConfig) -> bool:
    return bool(cfg.distributed.fsdp)


def prepare(cfg: TrainerConfig) -> None:
    """Refuse, before any model loads, what the sharded build cannot do (one line, exit 2)."""
    why = None
    if cfg.model.quantization != "none":
        why = "model.quantization (4-bit bitsandbytes weights cannot be sharded as DTensors)"
    elif cfg.lora.init in _BASE_READING_INITS:
        why = f"lora.init {cfg.lora.init} (it reads the base weights, which no rank holds whole)"
    elif cfg.lora.modules_to_save:
        why = "lora.modulesToSave (it trains base modules; FSDP here trains the adapter only)"
    elif cfg.model.dtype == "fp16":
        why = "model.dtype fp16 (use bf16 or fp32)"
    elif cfg.training.compile or cfg.training.compile_layers:
        why = "training.compile/compileLayers (not tried with FSDP yet)"
    if why:
        raise ConfigError(f"distributed.fsdp does not support {why}")


def _ensure_process_group() -> None:
    """FSDP needs torch.distributed even for one process (then nothing is sharded)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _checkpoint_files(source: ModelSource, revision: str | None) -> dict[str, Path]:
    """Checkpoint key -> safetensors file that holds it (one file or an index of shards)."""
    from transformers.utils import cached_file

    def find(name: str) -> Path | None:
        found = cached_file(source.location, name, revision=revision, local_files_only=source.local_files_only,
                            _raise_exceptions_for_missing_entries=False)
        return Path(found) if found else None

    index = find("model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {f: find(f) for f in set(weight_map.values())}
        return {key: files[f] for key, f in weight_map.items() if files[f] is not None}  # type: ignore[misc]
    single = find("model.safetensors")
    if single is None:
        raise ModelError(f"distributed.fsdp reads safetensors weights; {source.describe()} has none "
                         "(convert it with save_pretrained(safe_serialization=True))")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def _checkpoint_key(name: str) -> str:
    """peft's parameter name -> the base checkpoint's: drop the wrapper prefix and `base_layer`."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def shard_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows of dim 0 that FSDP2 gives `rank` (torch.chunk's split: ceil-sized, the last may be short)."""
    size = -(-rows // world)
    start = min(rows, rank * size)
    return start, min(rows, start + size)


def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's storage of a parameter (its shard for a DTensor)."""
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


def _fill_base_shards(model: nn.Module, source: ModelSource, revision: str | None, world: WorldView) -> None:
    """Copy each frozen weight's rows of this rank from the checkpoint; nothing else is read."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, Shard

    where = _checkpoint_files(source, revision)
    handles: dict[Path, Any] = {}
    with contextlib.ExitStack() as stack, torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                continue
            key = _checkpoint_key(name)
            if key not in where:
                raise ModelError(f"distributed.fsdp: the checkpoint of {source.describe()} has no {key!r}")
            if where[key] not in handles:
                handles[where[key]] = stack.enter_context(safe_open(str(where[key]), framework="pt"))
            part = handles[where[key]].get_slice(key)
            mine = local(p)
            if isinstance(p, DTensor) and p.placements[0] == Shard(0) and p.dim() > 0:
                start, end = shard_rows(p.shape[0], world.rank, world.world_size)
                if end - start != mine.shape[0]:
                    raise DistributedError(f"fsdp: shard of {name} has {mine.shape[0]} rows, expected {end - start}")
                mine.copy_(part[start:end] if end > start else mine)
            else:
                mine.copy_(part[:])


def _keep_adapter_real() -> contextlib.AbstractContextManager:
    """peft moves each new adapter module to its base layer's device: on a meta base that would drop
    the initialised LoRA values. While attaching, a move *to meta* changes only the dtype (as in any
    run, the adapter is first cast to the base's dtype); every other move happens as asked."""
    to = nn.Module.to

    def to_unless_meta(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)  # noqa: SLF001 - Module.to's own parser
        if device is not None and device.type == "meta":
            return to(self, dtype=dtype) if dtype is not None else self
        return to(self, *args, **kwargs)

    return mock.patch.object(nn.Module, "to", to_unless_meta)


def shard(model: nn.Module, device_type: str, dtype: str, world: WorldView) -> None:
    """One FSDP unit per decoder layer, one over the decoder's remainder (embedding, norm) and the head."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (world.world_size,))
    mp = (MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32) if dtype != "fp32"
          else MixedPrecisionPolicy())
    base: Any = model.get_base_model()  # type: ignore[operator]
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"distributed.fsdp needs a decoder with a `layers` list; {type(decoder).__name__} has none")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard([decoder, head], mesh=mesh, mp_policy=mp)
    # Prefetch: without it a layer's all-gather is issued only when its forward starts, so the
    # device waits for every gather in forward; asking each layer to start the next one's (and, in
    # backward, the previous one's) overlaps the gathers with compute.
    for i, layer in enumerate(layers):
        if i + 1 < len(layers):
            layer.set_modules_to_forward_prefetch([layers[i + 1]])  # type: ignore[operator]
        if i > 0:
            layer.set_modules_to_backward_prefetch([layers[i - 1]])  # type: ignore[operator]


def shard_root(loss_module: nn.Module, model: nn.Module) -> None:
    """Make the module the training loop calls (the loss) FSDP's root, and initialise it now.

    Why: the loss enters the decoder and the head separately, and FSDP allows one root, which runs
    the end-of-backward work (waiting for the gradient reduce-scatter). The root holds no parameters
    of its own. Initialising it here, not at its first forward, keeps the units under it non-root
    even when generation (which enters through the causal LM, not the loss) runs first.
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = next(p.device_mesh for p in model.parameters() if isinstance(p, DTensor))
    fully_shard(loss_module, mesh=mesh)
    loss_module._get_fsdp_state()._lazy_init()  # type: ignore[operator]  # noqa: SLF001 - no public spelling


def load_sharded(source: ModelSource, cfg: TrainerConfig, device: torch.device, dtype: str,
                 world: WorldView) -> nn.Module:
    """The peft model with the base sharded over the ranks and the adapter initialised (see module doc)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .lora import attach_lora

    _ensure_process_group()
    m = cfg.model
    try:
        config = AutoConfig.from_pretrained(source.location, revision=m.revision, trust_remote_code=m.trust_remote_code,
                                            local_files_only=source.local_files_only)
    except OSError as err:
        raise ModelError(f"cannot load model {source.describe()}: {str(err).splitlines()[0]}") from None
    with init_empty_weights(include_buffers=False):
        base = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=m.trust_remote_code,
                                                attn_implementation=attention_kernel(m, device.type))
    base.tie_weights()  # from_config on the meta device leaves a tied head untied
    base.config.use_cache = False
    for p in base.parameters():
        p.requires_grad_(False)
    with _keep_adapter_real():
        model = attach_lora(base, cfg.lora, cfg.training.seed)
    shard(model, device.type, dtype, world)
    real = {n: local(t).detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]
            if not local(t).is_meta}
    model.to_empty(device=device)  # each rank's shards only
    with torch.no_grad():
        for n, t in [*model.named_parameters(), *model.named_buffers()]:
            if n in real:
                local(t).copy_(real[n])
    _fill_base_shards(model, source, m.revision, world)
    return model


def held_summary(model: nn.Module) -> tuple[int, int]:
    """(parameter elements this rank stores, elements of the full model): shards count their rows,
    and a unit's gathered (unsharded) copy counts in full while it is alive."""
    held = total = 0
    for p in model.parameters():
        total += p.numel()
        held += local(p).numel()
    return held + gathered_elements(model), total


def gathered_elements(model: nn.Module) -> int:
    """Elements of unsharded parameter copies that currently hold storage (inside a unit's forward/backward)."""
    from torch.distributed.fsdp import FSDPModule

    count = 0
    groups = {}  # a unit over several modules (decoder and head) shares one group: count it once
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group  # noqa: SLF001 - no public view of gathered state
            if group is not None:
                groups[id(group)] = group
    for group in groups.values():
        for fp in group.fsdp_params:
            unsharded = getattr(fp, "_unsharded_param", None)
            if unsharded is not None and unsharded.untyped_storage().size() > 0:
                count += unsharded.numel()
    return count


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor), on the CPU."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu").contiguous()


def _like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `p` (this rank's slice for a DTensor; no collective: every rank holds `full`)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=local(p).device, dtype=p.dtype)
    if isinstance(p, DTensor):
        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    return full


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Trainable weights by name and AdamW's state_dict with whole tensors: the plain engine's
    checkpoint layout, so it resumes with any world size and any engine. A collective."""
    weights = {n: _full(p) for n, p in _trainable(model)}
    saved = optimizer.state_dict()
    state = {i: {k: _full(v) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in s.items()}
             for i, s in sorted(saved["state"].items())}
    return weights, {"state": state, "param_groups": saved["param_groups"]}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any]) -> None:
    """Inverse of `full_state`: every rank read the same files and keeps its own rows."""
    named = _trainable(model)
    missing = [n for n, _ in named if n not in weights]
    if missing:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:3]}")
    with torch.no_grad():
        for name, p in named:
            local(p).copy_(local(_like(weights[name], p)))
    params = [p for _, p in named]
    state = {i: {k: _like(v, params[int(i)]) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in s.items()}
             for i, s in optimizer_state.get("state", {}).items()}
    optimizer.load_state_dict({"state": state, "param_groups": optimizer_state["param_groups"]})


@contextlib.contextmanager
def gathered_trainable(model: nn.Module) -> Iterator[None]:
    """Whole LoRA weights on every rank for the duration (peft's save_pretrained reads them); the
    base stays sharded. A collective: every rank enters, in the same module order."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.requires_grad and local(p) is not p:
                swapped.append((module, name, p))
                module._parameters[name] = nn.Parameter(_full(p).to(local(p).device), requires_grad=True)  # noqa: SLF001
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p  # noqa: SLF001


def grad_norm(total: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ over DTensor gradients returns a DTensor: its value as a plain tensor on the device
    (no copy to the host, so the step does not wait for it)."""
    from torch.distributed.tensor import DTensor

    return (total.full_tensor() if isinstance(total, DTensor) else total).detach()
