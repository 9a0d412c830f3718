"""DeepSpeed ZeRO (stage 2 or 3) under the trainer's own loop: config, engine, and gathering.

Why kubelora drives DeepSpeed itself rather than through the Hugging Face Trainer integration:
the recipe owns the batch (one seeded global permutation sliced per rank), the loss (only
labelled positions reach the output head, normalised by the label count of the *global* batch),
the LR schedule and its rank-independent checkpoints. DeepSpeed here only partitions weights,
gradients and optimizer state and reduces gradients; everything the user sees stays the same as a
DDP run, so a ZeRO-3 loss curve can be compared with a DDP one step by step.

What this module does for the recipe, and nothing else:

- ``prepare``: validate `distributed.deepspeed*` early (one-line errors, exit 2) and fix the stage;
- ``build_config``: the DeepSpeed JSON from the trainer's settings, or the user's file checked
  against what the loop needs (batch shape, no optimizer/scheduler/fp16 of DeepSpeed's own);
- ``partitioned_loading``: under ZeRO-3 the base model is *built* partitioned (each rank creates
  and keeps only its shard of every weight), so a model that does not fit one device still loads;
- ``ZeroRun``: the engine with torch's AdamW as client optimizer; backward/step in the shape of
  the recipe's loop; the full (gathered) trainable weights and AdamW state in the layout of
  ``torch.optim.AdamW.state_dict()`` for checkpoints, and their inverse for resume.

Over 400 lines on purpose: every part reads DeepSpeed's config keys or engine internals, and keeping
them in one module keeps the next DeepSpeed upgrade's changes in one place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, TrainerConfig
from .distributed import DistributedError, WorldView

log = logging.getLogger("kubelora.zero")

# DeepSpeed's ZeRO-3 calls these torch.distributed functions on every step; torch warns each time.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor).*",
                        category=FutureWarning)

#: DeepSpeed's own defaults for the two adapter-sized settings (deepspeed/runtime/zero/config.py).
_DS_REDUCE_BUCKET = int(5e8)
_DS_PERSISTENCE = int(1e5)

#: DeepSpeed keys that would take over what the recipe owns.
_OWNED_BY_TRAINER = ("optimizer", "scheduler")


@dataclass(frozen=True)
class ZeroSettings:
    """What `distributed.deepspeedStage/deepspeedConfig` asked for, validated before any model loads."""

    stage: int
    user_config: dict[str, Any] | None
    source: str  # "trainer settings" or the JSON path


def wanted(cfg: TrainerConfig) -> bool:
    return bool(cfg.distributed.deepspeed_stage or cfg.distributed.deepspeed_config)


def _import_deepspeed(device_type: str | None = None) -> Any:
    """Import DeepSpeed with its accelerator pinned to the trainer's device (it would otherwise pick
    the first one it detects, e.g. CUDA for a `device: cpu` run on a GPU host)."""
    if device_type is not None:
        os.environ.setdefault("DS_ACCELERATOR", device_type)
    try:
        import deepspeed
    except ImportError as err:
        raise DistributedError(
            f"distributed.deepspeedStage/deepspeedConfig needs the deepspeed package ({err}): "
            "DS_BUILD_OPS=0 pip install 'kubelora[deepspeed]'"
        ) from None
    return deepspeed


def load_user_config(path: str) -> dict[str, Any]:
    """Read `distributed.deepspeedConfig`: a missing file or bad JSON is one line, not a traceback."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"distributed.deepspeedConfig: file not found: {p}") from None
    except OSError as err:
        raise ConfigError(f"distributed.deepspeedConfig: cannot read {p}: {err.strerror}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"distributed.deepspeedConfig: {p} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"distributed.deepspeedConfig: {p} must hold a JSON object at the top level")
    return raw


def prepare(cfg: TrainerConfig, device_type: str) -> ZeroSettings:
    """Check everything that can be checked before a model loads; DeepSpeed must be importable."""
    dist = cfg.distributed
    user = load_user_config(dist.deepspeed_config) if dist.deepspeed_config else None
    stage = int(dist.deepspeed_stage)
    if user is not None:
        for key in _OWNED_BY_TRAINER:
            if key in user:
                raise ConfigError(
                    f"distributed.deepspeedConfig: remove {key!r}: kubelora trains with torch's AdamW and its "
                    "own LR schedule (training.*)"
                )
        if (user.get("fp16") or {}).get("enabled") is True:
            raise ConfigError("distributed.deepspeedConfig: fp16 is not supported (use bf16 or fp32)")
        json_stage = (user.get("zero_optimization") or {}).get("stage", 0)
        if json_stage not in (2, 3):
            raise ConfigError(
                f"distributed.deepspeedConfig: zero_optimization.stage is {json_stage!r}; kubelora supports 2 or 3"
            )
        if stage and stage != json_stage:
            raise ConfigError(
                f"distributed.deepspeedStage is {stage} but deepspeedConfig sets zero_optimization.stage "
                f"{json_stage}: set one of them"
            )
        stage = int(json_stage)
    if cfg.model.dtype == "fp16":
        raise ConfigError("DeepSpeed runs need model.dtype bf16, fp32 or auto (fp16 is not supported)")
    if cfg.training.compile:
        raise ConfigError("training.compile is not supported together with DeepSpeed")
    _import_deepspeed(device_type)
    return ZeroSettings(stage, user, dist.deepspeed_config or "trainer settings")


def build_config(cfg: TrainerConfig, settings: ZeroSettings, dtype: str, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: the user's JSON (checked) or one built from the trainer's settings.

    The batch shape always comes from the trainer (it slices the data); `managed_gradient_
    accumulation: false` makes `engine.step()` the accumulation boundary, matching the recipe's loop
    of several backward passes and one optimizer step.
    """
    t = cfg.training
    batch = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world_size,
    }
    if settings.user_config is None:
        ds: dict[str, Any] = {
            "zero_optimization": {"stage": settings.stage},
            "gradient_clipping": t.max_grad_norm or 0.0,
            "bf16": {"enabled": dtype == "bf16"},
            "fp16": {"enabled": False},
        }
    else:
        ds = json.loads(json.dumps(settings.user_config))
        for key, ours in batch.items():
            theirs = ds.get(key, "auto")
            if theirs != "auto" and theirs != ours:
                raise ConfigError(
                    f"distributed.deepspeedConfig sets {key} {theirs!r} but the trainer's settings give {ours} "
                    "(training.microBatchSize, gradientAccumulationSteps, world size): use \"auto\" or remove it"
                )
        ds.setdefault("gradient_clipping", t.max_grad_norm or 0.0)
        ds.setdefault("bf16", {"enabled": dtype == "bf16"})
    ds.update(batch)
    ds["managed_gradient_accumulation"] = False
    ds.setdefault("steps_per_print", 1 << 30)  # the trainer logs its own progress
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _ensure_process_group(world: WorldView) -> None:
    """DeepSpeed needs torch.distributed even for one process; without a launcher it would try MPI."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _join(deepspeed: Any, world: WorldView) -> None:
    """What DeepSpeed needs before it partitions anything (`zero.Init` or `initialize`), idempotent."""
    _ensure_process_group(world)
    # DeepSpeed reads these from the env (torchrun sets them; a single process or an MPI launcher does not).
    for key, value in (("RANK", world.rank), ("WORLD_SIZE", world.world_size), ("LOCAL_RANK", world.local_rank)):
        os.environ.setdefault(key, str(value))
    _skip_shm_comm_op(deepspeed)
    # DeepSpeed's comm layer over the existing process group, as `deepspeed.initialize` sets it up; `zero.Init`
    # reads the world size from it while it checks the config, before it would set it up itself (as size 1).
    deepspeed.init_distributed(dist_backend=deepspeed.accelerator.get_accelerator().communication_backend_name(),
                               dist_init_required=False)


@contextlib.contextmanager
def partitioned_loading(ds_config: dict[str, Any] | None, world: WorldView) -> Iterator[None]:
    """ZeRO-3: every model `from_pretrained` builds inside is created under `deepspeed.zero.Init`.

    Why: loading the whole base on each device and letting `deepspeed.initialize` partition it
    afterwards needs one device to hold the whole model, the very case ZeRO-3 is for (7B+ in bf16 across
    cards). transformers' DeepSpeed integration (a live `HfDeepSpeedConfig`) makes `from_pretrained`
    partition each module's weights as it is constructed and then copy the checkpoint in one module at
    a time (rank 0 reads the values, the module is gathered, filled, re-partitioned), so no rank ever
    holds more than its shards plus one module. LoRA attached inside the context sees the partitioned
    base (peft gathers the base weight where an init needs it, e.g. PiSSA/OLoRA); its own small
    weights are plain tensors that `deepspeed.initialize` partitions with the rest.

    The integration is switched off again on exit: a later `from_pretrained` (the merged export
    loads a fresh base on rank 0 alone) must not enter a collective the other ranks never join.
    Nothing happens for ZeRO-2 or without DeepSpeed (`ds_config` None).
    """
    stage = int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))
    if stage != 3:
        yield
        return
    deepspeed = _import_deepspeed()
    _join(deepspeed, world)
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    live = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference: hold it here
    try:
        yield
    finally:
        del live
        unset_hf_deepspeed_config()


def held_summary(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank stores, elements of the full model): its shards plus any full copies.

    A partitioned parameter counts its shard (`ds_tensor`) and, when gathered or persistent (small
    ones DeepSpeed keeps whole), its full data too; a plain parameter counts in full.
    """
    held = total = 0
    for p in model.parameters():
        total += int(getattr(p, "ds_numel", p.numel()))
        held += p.data.numel() + (int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else 0)
    return held, total


def fit_to_adapter(ds_config: dict[str, Any], model: torch.nn.Module) -> None:
    """Size the ZeRO-3 settings that depend on the adapter, where the config leaves them unset.

    - `reduce_bucket_size`: every trainable element (capped at DeepSpeed's 5e8). Only LoRA weights
      have gradients, a few MB to a few hundred: one bucket reduces them in one collective per step,
      and the bucket is allocated up front (DeepSpeed's 5e8 default held 2 GB of fp32 for ~22 MB of
      gradients on a 1B model).
    - `stage3_param_persistence_threshold`: the largest adapter tensor (never below DeepSpeed's 1e5),
      so LoRA A/B stay whole on every rank instead of being all-gathered twice per micro-batch in
      hundreds of latency-bound messages; but below the smallest frozen matrix of the base, so the
      base itself is still partitioned. Their gradients and AdamW state are partitioned either way.

    And the settings that bound how much of the *base* a rank holds gathered at once, sized to one
    decoder layer (`_layer_elements`) where DeepSpeed's are sized for a model of 1e9+ elements:

    - `stage3_max_reuse_distance` one layer (DeepSpeed: 1e9 elements): a gathered weight is released
      after its layer's forward and gathered again for its backward, as FSDP does. With the default, any
      model under ~1e9 elements kept (almost) every weight gathered from forward to backward, so a
      ZeRO-3 rank held about the whole base, more than a DDP rank (`tests/trainer/test_fsdp_memory.py`);
    - `stage3_prefetch_bucket_size` one layer (DeepSpeed: 5e7): fetch the next layer while this one
      computes, and no further;
    - `stage3_max_live_parameters` three layers (DeepSpeed: 1e9): the current, the prefetched, slack.
    """
    zero_cfg = ds_config.setdefault("zero_optimization", {})
    if int(zero_cfg.get("stage", 0)) != 3:
        return
    trainable = [int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad]
    frozen_matrices = [int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()
                       if not p.requires_grad and len(getattr(p, "ds_shape", p.shape)) >= 2]
    zero_cfg.setdefault("reduce_bucket_size", max(1, min(sum(trainable), _DS_REDUCE_BUCKET)))
    persist = max(_DS_PERSISTENCE, max(trainable, default=0))
    if frozen_matrices:
        persist = min(persist, min(frozen_matrices) - 1)
    zero_cfg.setdefault("stage3_param_persistence_threshold", persist)
    layer = _layer_elements(model)
    if layer:
        zero_cfg.setdefault("stage3_max_reuse_distance", layer)
        zero_cfg.setdefault("stage3_prefetch_bucket_size", layer)
        zero_cfg.setdefault("stage3_max_live_parameters", 3 * layer)


def _layer_elements(model: torch.nn.Module) -> int | None:
    """Elements of the largest decoder layer (full sizes, also when partitioned); None when the model
    has no `layers` list to measure."""
    base: Any = getattr(model, "get_base_model", lambda: model)()
    layers = getattr(getattr(base, "get_decoder", lambda: None)(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        return None
    return max(sum(int(getattr(p, "ds_numel", p.numel())) for p in layer.parameters()) for layer in layers)


def _skip_shm_comm_op(deepspeed: Any) -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op.

    Why: that op serves only DeepSpeed's tensor-parallel *inference* all-reduce, which ZeRO training
    never calls, yet building it runs g++ on first use (docs/deepspeed.md) and needs a compiler in
    the image. Marking it incompatible makes the backend fall back to torch.distributed's all-reduce.
    """
    with contextlib.suppress(Exception):  # an internal of DeepSpeed: if it moves, the op just gets built
        ops = deepspeed.ops.__compatible_ops__
        for name in list(ops):
            if "shm_comm" in name:
                ops[name] = False


class ZeroRun:
    """A DeepSpeed engine around the recipe's loss module, with the hooks the recipe calls."""

    def __init__(self, engine: Any, model: torch.nn.Module, stage: int) -> None:
        self.engine = engine
        self.model = model
        self.stage = stage
        self.deepspeed = _import_deepspeed()

    @classmethod
    def start(cls, loss_module: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              ds_config: dict[str, Any], world: WorldView) -> ZeroRun:
        """Partition `loss_module` (which holds `model`) and wrap the client AdamW.

        The LR scheduler stays on `optimizer`: DeepSpeed keeps its param-group dicts (only their
        `params` now point at flat fp32 partitions), so LambdaLR's writes reach the real update.
        """
        deepspeed = _import_deepspeed()
        _join(deepspeed, world)
        fit_to_adapter(ds_config, model)
        engine, _, _, _ = deepspeed.initialize(model=loss_module, optimizer=optimizer, config=ds_config,
                                               dist_init_required=False)
        managed = getattr(engine, "managed_gradient_accumulation", None)
        if managed is None or managed():
            raise DistributedError(
                f"deepspeed {deepspeed.__version__} ignores managed_gradient_accumulation: false, which the "
                "trainer's accumulation loop needs: install deepspeed>=0.19.8,<0.20"
            )
        run = cls(engine, model, int(ds_config["zero_optimization"]["stage"]))
        log.info("DeepSpeed ZeRO-%d over %d process(es): %s", run.stage, world.world_size, run.partition_summary())
        return run

    # ------------------------------------------------------------------ training
    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is already normalised by the global label count (and x world size, which ZeRO's
        gradient averaging divides out, as DDP's does): no extra 1/accumulation scaling."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """Reduce, clip (gradient_clipping), update; returns the pre-clip global gradient norm."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # ------------------------------------------------------------------ what ranks hold
    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def partition_summary(self) -> str:
        """How much of the model this rank holds: proof that ZeRO-3 really partitioned it."""
        held, total = held_summary(self.model)
        return f"this rank holds {held} of {total} parameter elements"

    @contextlib.contextmanager
    def gathered_trainable(self) -> Iterator[None]:
        """Full trainable (LoRA) weights on every rank for the duration, e.g. for peft's save_pretrained.

        A collective: every rank must enter. The frozen base stays partitioned.
        """
        params = [p for _, p in self.trainable()]
        with self.deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield

    # ------------------------------------------------------------------ checkpoints
    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer.optimizer  # the client AdamW, stepped over flat fp32 partitions

    def _flat_partitions(self) -> list[torch.Tensor]:
        """This rank's flat fp32 master partitions: the tensors the client AdamW keeps state for
        (stage 3 takes them out of its param groups between steps, so ask the ZeRO optimizer)."""
        zopt = self.engine.optimizer
        flats = getattr(zopt, "fp32_partitioned_groups_flat", None)  # stage 3
        if flats is None:
            flats = zopt.single_partition_of_fp32_groups  # stage 1/2
        return list(flats)

    def full_state(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Trainable fp32 weights by name and an AdamW state_dict as a DDP run would write it.

        A collective (every rank gathers every tensor); the result is rank- and world-independent,
        so kubelora's checkpoint format resumes with any world size, with or without DeepSpeed.
        """
        utils = self.deepspeed.utils  # imported through _import_deepspeed (an optional dependency)
        safe_get_full_fp32_param, safe_get_full_optimizer_state = (utils.safe_get_full_fp32_param,
                                                                    utils.safe_get_full_optimizer_state)
        inner = self._inner_optimizer()
        has_state = any(len(inner.state.get(flat, {})) for flat in self._flat_partitions())
        weights: dict[str, torch.Tensor] = {}
        state: dict[int, dict[str, torch.Tensor]] = {}
        for idx, (name, p) in enumerate(self.trainable()):
            weights[name] = safe_get_full_fp32_param(p).detach().to("cpu").reshape(p.ds_shape if hasattr(
                p, "ds_shape") else p.shape).contiguous()
            if has_state:
                state[idx] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().to("cpu").reshape(
                        weights[name].shape),
                    "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().to("cpu").reshape(
                        weights[name].shape),
                }
        groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
        groups[0]["params"] = list(range(len(weights)))
        for g in groups[1:]:
            g["params"] = []
        return weights, {"state": state, "param_groups": groups}

    def load_full_state(self, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
        """Inverse of `full_state` (every rank reads the same files): weights into the partitioned
        model params and the fp32 masters, AdamW moments and step into the flat partitions."""
        utils = self.deepspeed.utils
        safe_set_full_fp32_param, safe_set_full_optimizer_state = (utils.safe_set_full_fp32_param,
                                                                    utils.safe_set_full_optimizer_state)
        named = self.trainable()
        missing = [n for n, _ in named if n not in weights]
        if missing:
            raise RuntimeError(f"checkpoint does not match the model: missing {missing[:3]}")
        params = [p for _, p in named]
        with self.deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
            for name, p in named:
                p.data.copy_(weights[name].to(p.dtype).reshape(p.data.shape))
        for name, p in named:
            safe_set_full_fp32_param(p, weights[name].float())
        saved = optimizer_state.get("state", {})
        if not saved:
            return
        inner = self._inner_optimizer()
        step = float(next(iter(saved.values()))["step"])
        for flat in self._flat_partitions():  # AdamW creates its state lazily at the first step: do it now
            if not inner.state.get(flat):
                inner.state[flat] = {"step": torch.tensor(step), "exp_avg": torch.zeros_like(flat),
                                     "exp_avg_sq": torch.zeros_like(flat)}
            else:
                inner.state[flat]["step"] = torch.tensor(step)
        for idx, (_, p) in enumerate(named):
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, saved[idx][key].float(), key)
        for saved_group, group in zip(optimizer_state.get("param_groups", []), inner.param_groups, strict=False):
            group.update({k: v for k, v in saved_group.items() if k != "params"})


def save_merged_from_adapter(source: Any, model_cfg: Any, dtype: str, adapter: Path, run_dir: Path,
                             tokenizer: Any) -> Path:
    """`merged/` without gathering the whole partitioned base: rank 0 loads the base afresh on CPU and
    folds in the adapter it just published (the same result as merging the in-memory model)."""
    from peft import PeftModel

    from .export import save_merged
    from .model import load_model

    base = load_model(source, model_cfg, "cpu", dtype)
    return save_merged(PeftModel.from_pretrained(base, str(adapter)), run_dir, tokenizer)
