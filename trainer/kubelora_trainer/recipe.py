"""The LoRA fine-tuning run, top to bottom in one class.

Read `LoRAFineTuneRecipe.run` first: it is the whole story (guard the run dir, load, prepare
data, measure the base model, train with checkpoints, measure again, publish). Everything it
calls is either a short method below or a small module with one job. `setup` builds what
training needs: each setup step returns what it builds and only `setup` keeps it.

Longer than 400 lines on purpose: the run's story (pre-flight, setup, resume checks, measuring,
the loop, publishing) stays readable in one class; what has one job of its own is a module.

Distributed runs use the same code: each optimizer step takes a *global* batch of rows from
one seeded permutation; rank r takes its slice of each micro-batch, and the loss is divided
by the label-token count of the whole global batch. A 2-process job with micro-batch b thus
computes the same gradients as a 1-process job with micro-batch 2b.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import contract, fsdp, fused_lora, rundir, segment_attention, zero
from . import distributed as dist_
from . import engine as engine_
from .batching import choose_padding_free
from .compile import cache_in_run_dir, choose_compile_layers, compile_layers, eager_while
from .config import TrainerConfig, TrainingConfig, dump_config
from .data import PackedRow, PreparedData, build_datasets, collate, collate_flat, encode_prompt
from .device import DeviceInfo, allocated_memory_bytes, peak_memory_bytes, resolve_dtype, select_device, synchronize
from .evaluate import GenerationResult, eval_loss, exact_match, generate
from .export import (
    INIT_ADAPTER_DIR,
    SUMMARY_FILE,
    plot_loss,
    save_adapter,
    save_initial_adapter,
    save_merged,
    write_samples,
    write_summary,
)
from .lora import trainable_parameters
from .loss import CausalLMLoss, count_label_tokens
from .metrics import ConsoleProgress, MetricsLog, ProgressState
from .model import DTYPES, ModelSource, load_lora_model, load_tokenizer, materialize
from .rundir import RunDirError

log = logging.getLogger("kubelora.trainer")

BASELINE_FILE = "baseline.json"


@dataclass(frozen=True)
class Runtime:
    """Where and how this process computes: built once by `LoRAFineTuneRecipe.setup_runtime`."""

    device: DeviceInfo
    dtype: str  # resolved: bf16, fp16 or fp32
    autocast: Callable[[], contextlib.AbstractContextManager]
    backend: str | None  # the process group's backend; None for a single process
    source: ModelSource
    zero_settings: Any  # zero.prepare's result when DeepSpeed is wanted, else None


@dataclass(frozen=True)
class StepPlan:
    """Rows per optimizer step and how many steps the run takes."""

    global_batch: int
    steps_per_epoch: int
    total_steps: int


def plan_steps(t: TrainingConfig, n_rows: int, world: int) -> StepPlan:
    global_batch = t.micro_batch_size * t.gradient_accumulation_steps * world
    steps_per_epoch = n_rows // global_batch
    if steps_per_epoch == 0:
        raise RunDirError(
            f"{n_rows} training rows are fewer than one global batch of {global_batch} "
            f"(microBatchSize x gradientAccumulationSteps x {world} processes): add data or lower the batch"
        )
    return StepPlan(global_batch, steps_per_epoch, t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch)))


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """The seeded permutation of the training rows that an epoch's optimizer steps take in slices.

    Why a function of its own: a run resumed at any step must draw the same rows as an uninterrupted
    one, and a comparison (the benchmark's hand-written loop) can feed another loop the same batches.
    """
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()


class Preempted(RuntimeError):  # noqa: N818 - it is a signal, not a bug
    """SIGTERM arrived; a checkpoint was written and the run can resume."""


class TrainingDiverged(RuntimeError):  # noqa: N818 - a state of the run, like Preempted
    """A step's loss or gradient norm was not finite: the update has made the adapter NaN/inf.

    Why stop: every later step and checkpoint would carry the non-finite weights, and the run would
    end by publishing them. Raised before the step's checkpoint, so the newest checkpoint holds
    finite weights; a restart from it replays the same data at the same settings, so the CLI treats
    this as bad input (exit 2) and says which settings to change.
    """


def fused_adamw(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch has a fused AdamW kernel for these parameters' device (cuda, xpu and cpu in torch 2.4+).

    Why: LoRA has hundreds of small tensors (420 on SmolLM2-135M, 224 on a 1B Llama); the default
    per-tensor (CPU) or multi-tensor (GPU) step launches a handful of kernels per tensor, the fused
    one a kernel per group: 19.4 -> 4.6 ms a step for SmolLM2's 420 tensors on 2 CPU cores, the same
    update within fp32 rounding (docs/benchmarks.md). The sharded engines keep torch's default
    (DeepSpeed flattens the parameters itself; FSDP's are DTensors).
    """
    import torch.optim.optimizer as torch_optimizer

    supported = getattr(torch_optimizer, "_get_fused_kernels_supported_devices", lambda: ["cuda"])()
    return bool(params) and all(p.device.type in supported and p.is_floating_point() for p in params)


class LoRAFineTuneRecipe:
    """One fine-tuning run of a causal LM with a LoRA adapter."""

    def __init__(self, cfg: TrainerConfig, progress: ProgressState | None = None) -> None:
        self.cfg = cfg
        self.progress = progress or ProgressState()
        self.run_dir = Path(cfg.output.dir)
        self.world = dist_.world_from_env()
        self._stop_requested = False
        self.history: list[dict[str, Any]] = []
        self._run_id: str | None = None
        self.initial_adapter: Path | None = None  # olora/pissa: saved by keep_initial_adapter, after the pre-flight
        self.claim = rundir.RunDirClaim(self.run_dir, writer=self.world.is_main)
        self.metrics: MetricsLog | None = None  # opened by guard_run_dir, the run's first step
        self.train_tokens_before = 0  # tokens of the sessions before a resume (maybe_resume)
        self._perm: list[int] = []  # the current epoch's row order (rows_for_step)
        self._perm_epoch: int | None = None

    # What `setup` builds, each by one step that returns it (the steps never set attributes themselves).
    rt: Runtime
    tokenizer: Any
    data: PreparedData
    eval_prompts: list[tuple[str, str | None]]
    model: Any  # the peft model
    loss_module: torch.nn.Module
    eval_batches: list[dict[str, torch.Tensor]]
    padding_free: bool
    param_counts: dict[str, int]
    plan: StepPlan
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    engine: engine_.Engine

    @property
    def device(self) -> DeviceInfo:
        return self.rt.device

    @property
    def dtype(self) -> str:
        return self.rt.dtype

    @property
    def global_batch(self) -> int:
        return self.plan.global_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        # Operator attempts of one run (same KUBELORA_RUN_ID) wait for an earlier attempt to let go.
        self.claim.lock(self.run_id(), wait_s=rundir.SAME_RUN_WAIT_S if os.environ.get(contract.RUN_ID_ENV) else 0)
        try:
            return self._run_claimed(t0)
        finally:
            self.claim.release()

    def _run_claimed(self, t0: float) -> dict[str, Any]:
        """The run while rank 0 holds the run dir: nothing written there outlasts a failure before `take_run_dir`."""
        self.guard_run_dir()
        if self.deliver_only():
            return self.summary_on_disk()
        self.setup()
        if self.verdict is rundir.Verdict.REPLACE:
            self.claim.set_aside()
        dist_.barrier(self.world)  # no rank reads checkpoints before the replaced run is out of the way
        with self.engine.gathered() if self.needs_initial_adapter else contextlib.nullcontext():
            self.keep_initial_adapter()
        start_step = self.maybe_resume()
        self.take_run_dir()
        before = self.measure_before(start_step)
        self.progress.update(phase=1)
        train_stats = self.train(start_step)
        self.progress.update(phase=2)
        after = self.measure(self.eval_prompts, label="after")
        with self.engine.gathered():  # ZeRO-3: full LoRA weights on every rank while rank 0 exports
            summary = self.publish(before, after, train_stats, wall_s=time.monotonic() - t0)
        self.progress.update(phase=3)
        dist_.barrier(self.world)
        return summary

    # ------------------------------------------------------------------ setup
    def deliver_only(self) -> bool:
        """A finished run whose S3 delivery did not complete (the pod died mid-upload) only uploads.

        The upload is idempotent for the same run id, so a restarted pod finishes the delivery
        instead of being refused for "overwriting" its own finished adapter. Only this run's own
        work (same owner id and settings, `guard_run_dir`) is delivered: a re-created resource
        never ships the adapter of the resource it replaced.
        """
        if self.verdict is not rundir.Verdict.DELIVER:
            return False
        if self.world.is_main:
            assert self.cfg.output.s3 is not None  # DELIVER needs a target
            log.info("run already finished in %s: delivering it to %s", self.run_dir, self.cfg.output.s3.uri)
            self.deliver()
        return True

    def summary_on_disk(self) -> dict[str, Any]:
        if not self.world.is_main:
            return {}
        return dict(json.loads((self.run_dir / SUMMARY_FILE).read_text()))

    def run_id(self) -> str:
        """Who this run is, for "never overwrite another run's artifact": the operator passes the
        resource UID in KUBELORA_RUN_ID; a laptop run gets a uuid, kept in the run dir's owner file
        across resumes (written with it once the pre-flight passed)."""
        if self._run_id is None:
            self._run_id = rundir.run_id_for(self.run_dir)
        return self._run_id

    def check_delivery_target(self) -> None:
        """Fail at start, not after hours of training, when the bucket is unusable or taken."""
        if self.cfg.output.s3 is not None and self.world.is_main:
            from .artifacts import check_target

            check_target(self.cfg.output.s3, run_id=self.run_id())

    def deliver(self) -> dict[str, Any] | None:
        """Upload the finished run to S3 (manifest last); no-op for a run dir that stays local."""
        if self.cfg.output.s3 is None:
            return None
        from .artifacts import upload_run

        info = upload_run(self.run_dir, self.cfg.output.s3, include_merged=self.cfg.output.merge,
                          run_id=self.run_id())
        log.info("delivered to %s (manifest %s)", info.uri, info.manifest_uri)
        return info.to_dict()

    def guard_run_dir(self) -> None:
        """Judge, without writing, what this run may do with the run dir (rundir.judge): another
        run's work or other settings are refused, a finished run is only replaced when asked."""
        self.result_fields = rundir.result_fields(self.cfg, self.world.world_size)
        self.verdict = rundir.judge(self.run_dir, self.run_id(), self.result_fields,
                                    overwrite=self.cfg.output.overwrite, deliverable=self.cfg.output.s3 is not None,
                                    allow_changed=self.cfg.training.resume_allow_changed)
        if self.verdict is not rundir.Verdict.DELIVER:
            self.check_delivery_target()
        self.metrics = MetricsLog(self.run_dir, enabled=self.world.is_main, tracking=self.cfg.tracking)

    @property
    def needs_initial_adapter(self) -> bool:
        return self.cfg.lora.init in ("olora", "pissa")

    def keep_initial_adapter(self) -> None:
        """olora/pissa: save the untrained adapter (before a resume loads trained weights).

        Here, not at model load: only after the pre-flight checks and after a replaced run was set
        aside, so its initial adapter is never reused; removed again if the run stops before
        `take_run_dir`.
        """
        if self.needs_initial_adapter and self.world.is_main:
            self.claim.track(INIT_ADAPTER_DIR)
            self.initial_adapter = save_initial_adapter(self.model, self.run_dir)

    def take_run_dir(self) -> None:
        """Every pre-flight check passed (resume included): record owner and config; training starts."""
        self.claim.commit(self.run_id(), self.result_fields, dump_config(self.cfg))

    def setup(self, through_model: bool = False) -> None:
        """Build what training needs, in order. Each step returns what it builds (as torchtune's recipes
        do) and only this method keeps it, so what depends on what is read here.

        `through_model` stops once the model is loaded (tests that inspect what a rank holds)."""
        self.rt = self.setup_runtime()
        self.tokenizer, self.data = self.setup_data(self.rt.source)
        # Empty for data kinds without answers (text, tokens): exact match is then off, eval loss remains.
        self.eval_prompts = self.data.eval_prompts[: self.cfg.evaluation.max_exact_match_samples]
        self.ds_config = (zero.build_config(self.cfg, self.rt.zero_settings, self.rt.dtype, self.world.world_size)
                          if self.rt.zero_settings is not None else None)
        # The step plan comes before the model: whether to compile depends on the run's length.
        self.plan = plan_steps(self.cfg.training, len(self.data.train_rows), self.world.world_size)
        self.compiled_layers = self.setup_compile_choice(self.rt, self.plan)
        self.model = self.setup_model(self.rt, self.ds_config)
        self.padding_free = self.setup_fast_paths(self.model, self.compiled_layers)
        self.eval_batches = self.build_eval_batches(self.padding_free)
        self.loss_module = self.setup_loss(self.model, self.compiled_layers)
        trainable, total = trainable_parameters(self.model)
        self.param_counts = {"trainable": trainable, "total": total}
        self.model_memory_bytes = allocated_memory_bytes(self.rt.device)
        log.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
        if through_model:
            return
        self.optimizer, self.scheduler = self.setup_optimizer(self.model)
        # One engine (plain/DDP or DeepSpeed ZeRO) answers backward, step, no_sync and checkpoint state.
        self.engine = engine_.build(self.loss_module, self.model, self.optimizer, self.ds_config,
                                    self.cfg.training.max_grad_norm, self.world, self.rt.device.index,
                                    sharded_by_fsdp=fsdp.wanted(self.cfg))
        if self.engine.sharded:
            self.loss_module = self.engine.module  # ZeRO-3 evaluates through the engine (it gathers weights)
        self.progress.update(total_steps=self.plan.total_steps)

    def setup_runtime(self) -> Runtime:
        """Device, process group, compute dtype and the model's source (converted GGUF included)."""
        device = select_device(self.cfg.device, self.world.local_rank)
        if self.cfg.ipex:
            try:
                import intel_extension_for_pytorch  # noqa: F401
            except ImportError:
                raise RuntimeError(
                    "ipex: true needs intel_extension_for_pytorch (retired; only in the legacy image with torch "
                    "2.8) - stock PyTorch already uses oneDNN/AMX on CPU and supports xpu"
                ) from None
        # DeepSpeed settings are checked here, before any model loads (bad JSON: one line, exit 2).
        zero_settings = zero.prepare(self.cfg, device.type) if zero.wanted(self.cfg) else None
        if fsdp.wanted(self.cfg):
            fsdp.prepare(self.cfg)
        # Before the process group exists: transformers' save_pretrained writes only on global rank 0
        # once one does, and every rank converts a GGUF into its own (pod-local) cache.
        source = materialize(self.cfg.model)
        backend = dist_.resolve_backend(self.cfg.distributed.backend, device.type)
        dist_.init_process_group(self.world, backend, self.cfg.distributed.timeout_s)
        dtype_name, dtype_reason = resolve_dtype(self.cfg.model.dtype, device)
        dtype = DTYPES[dtype_name]
        use_autocast = self.cfg.training.autocast and dtype != torch.float32
        autocast: Callable[[], contextlib.AbstractContextManager] = (
            (lambda: torch.autocast(device_type=device.type, dtype=dtype))
            if use_autocast
            else contextlib.nullcontext
        )
        rt = Runtime(device=device, dtype=dtype_name, autocast=autocast,
                     backend=backend if self.world.distributed else None, source=source,
                     zero_settings=zero_settings)
        log.info("device %s, dtype %s (%s), world %d (%s)", device.describe(), dtype_name, dtype_reason,
                 self.world.world_size, rt.backend or "single process")
        return rt

    def setup_data(self, source: ModelSource) -> tuple[Any, PreparedData]:
        tokenizer = load_tokenizer(source, self.cfg.model)
        data = build_datasets(self.cfg.data, tokenizer, self.cfg.training.seed)
        log.info("data: %s", data.stats)
        return tokenizer, data

    def setup_model(self, rt: Runtime, ds_config: dict[str, Any] | None) -> Any:
        """The base model with a fresh LoRA adapter, on the training device."""
        if fsdp.wanted(self.cfg):  # each rank builds only its shards
            model = fsdp.load_sharded(rt.source, self.cfg, rt.device.torch_device, rt.dtype, self.world)
            log.info("model loaded: this rank holds %d of %d parameter elements", *fsdp.held_summary(model))
            return model
        with zero.partitioned_loading(ds_config, self.world):  # ZeRO-3: each rank builds only its shards
            model = load_lora_model(rt.source, self.cfg.model, rt.device, rt.dtype,
                                    lora=self.cfg.lora, seed=self.cfg.training.seed)
        if ds_config is not None:
            log.info("model loaded: this rank holds %d of %d parameter elements", *zero.held_summary(model))
        model.to(rt.device.torch_device)  # LoRA weights; 4-bit base weights were packed there already
        return model

    def setup_compile_choice(self, rt: Runtime, plan: StepPlan) -> bool:
        """Whether the decoder layers are compiled (`training.compileLayers`, or the default for this
        run's device, dtype and length: `compile.choose_compile_layers`)."""
        c = self.cfg
        excluded = [name for name, on in (
            ("training.compile", c.training.compile),
            ("training.gradientCheckpointing", c.training.gradient_checkpointing),
            ("distributed.fsdp", fsdp.wanted(c)),
            ("DeepSpeed", rt.zero_settings is not None),
            ("model.quantization", c.model.quantization != "none"),
        ) if on]
        wanted, why = choose_compile_layers(c.training.compile_layers, planned_steps=plan.total_steps,
                                            device_type=rt.device.type, dtype=rt.dtype,
                                            excluded_by=", ".join(excluded) or None)
        log.info("regional compilation %s (%s)", "on" if wanted else "off", why)
        return wanted

    def setup_loss(self, model: Any, compiled_layers: bool) -> torch.nn.Module:
        """The module the loop runs forward on (after the fast paths changed the model's layers)."""
        if self.cfg.training.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        t = self.cfg.training
        mode = "reduce-overhead" if t.device_graphs else None  # torch.compile's name for device graphs
        if compiled_layers or t.compile:
            cache = cache_in_run_dir(self.run_dir, self.world.rank)
            if cache is not None:
                log.info("compiled code is cached in %s: a resumed attempt reuses it", cache)
        if compiled_layers:
            log.info("regional compilation: %d decoder layers compiled as one%s", compile_layers(model, mode=mode),
                     ", replayed as device graphs" if mode else "")
        loss_module: torch.nn.Module = CausalLMLoss(model, chunk=t.loss_chunk,
                                                    head_backend="inductor" if compiled_layers else None)
        if t.compile:
            loss_module = torch.compile(loss_module, mode=mode)  # type: ignore[assignment]
        return loss_module

    #: The clock of the `saveMinutes` cadence (tests step it by hand).
    save_clock: Callable[[], float] = staticmethod(time.monotonic)

    def build_eval_batches(self, padding_free: bool) -> list[dict[str, torch.Tensor]]:
        """Held-out rows in the training batch format (flat or padded: known once the model is loaded).

        Eval rows are single short samples: batches are 4x wider than training so each matmul is big
        enough that OpenMP's per-op synchronisation does not dominate on a busy or throttled CPU.
        """
        pad = int(self.tokenizer.pad_token_id)
        rows, size = self.data.eval_rows, 4 * self.cfg.training.micro_batch_size
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        return [collate_flat(c) if padding_free else collate(c, pad) for c in chunks]

    def setup_fast_paths(self, model: Any, compiled_layers: bool) -> bool:
        """Choose the batch format (and enable per-sample attention for flat batches) and the fused
        LoRA forward (see their modules for why); returns whether batches are padding-free.

        `batching.choose_padding_free` decides from the settings, device and dtype; a model that cannot
        attend per sample trains on padded rows.
        """
        t = self.cfg.training
        wanted, why = choose_padding_free(t.padding_free, t.compile or compiled_layers, self.rt.device.type,
                                         self.rt.dtype)
        padding_free = False
        if wanted:
            no_segments = segment_attention.unsupported_reason(model.get_base_model().config)
            if no_segments:
                log.info("padded batches: %s", no_segments)
            else:
                padding_free = True
                log.info("attention: %s (padding-free batches: %s)", segment_attention.enable(model), why)
        else:
            log.info("padded batches (%s)", why)
        if t.fused_lora:
            log.info("fused LoRA forward on %d layers%s", fused_lora.enable(model, fold=t.fold_lora),
                     ", rank-r product folded into the base GEMM where out >= 2 x in (fused_lora.folds)" if t.fold_lora else "")
        return padding_free

    def setup_optimizer(self, model: Any) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        t = self.cfg.training
        params = [p for p in model.parameters() if p.requires_grad]
        sharded = self.ds_config is not None or fsdp.wanted(self.cfg)
        optimizer = torch.optim.AdamW(
            params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
            weight_decay=t.weight_decay, fused=True if fused_adamw(params) and not sharded else None,
        )
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda)

    def lr_lambda(self, step: int) -> float:
        """Warmup from 0 then cosine/linear decay to 0, or constant."""
        t = self.cfg.training
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.lr_scheduler == "constant":
            return 1.0
        span = max(1, self.total_steps - t.warmup_steps)
        frac = min(1.0, (step - t.warmup_steps) / span)
        return 0.5 * (1 + math.cos(math.pi * frac)) if t.lr_scheduler == "cosine" else 1.0 - frac

    def maybe_resume(self) -> int:
        """Load the newest complete checkpoint (or the one named) and return its step."""
        resume = self.cfg.training.resume
        self.train_tokens_before = 0
        if resume == "never":
            return 0
        if resume == "auto":
            ref = ckpt.latest(self.run_dir)
        else:
            path = Path(resume)
            if not (path / ckpt.STATE_FILE).is_file():
                raise RunDirError(f"training.resume: {path} is not a complete checkpoint (no {ckpt.STATE_FILE})")
            ref = ckpt.CheckpointRef(int(json.loads((path / ckpt.STATE_FILE).read_text())["step"]), path)
        if ref is None:
            return 0
        state = ckpt.read_state(ref)  # refuse before loading anything
        self._check_same_global_batch(ref, state)
        self._check_same_settings(ref, state)
        self.engine.load(ref, self.scheduler)
        self._apply_optimizer_settings()
        self.train_tokens_before = int(state.get("train_tokens", 0))
        assert self.metrics is not None  # guard_run_dir opened it
        self.metrics.truncate_after(ref.step)
        self.history = self.metrics.read()
        log.info("resumed from %s at step %d", ref.path, ref.step)
        return ref.step

    def _check_same_global_batch(self, ref: ckpt.CheckpointRef, state: dict[str, Any]) -> None:
        """Refuse a resume whose rows per optimizer step differ from the checkpoint's.

        The data position is ``step x global batch`` and the loss curve depends on the batch, so a
        changed product would silently skip or repeat rows and move the resumed curve off an
        uninterrupted run's (docs/benchmarks.md). More or fewer processes are fine when the product
        stays (docs/troubleshooting.md).
        """
        saved = state.get("global_batch")
        if saved is None or int(saved) == self.global_batch:
            return
        raise RunDirError(
            f"checkpoint {ref.path} was trained with {saved} rows per optimizer step, this run has "
            f"{self.global_batch} (microBatchSize x gradientAccumulationSteps x {self.world.world_size} "
            f"processes): keep the product at {saved} to resume, or start over (training.resume: never, "
            "or a new output dir)"
        )

    def settings(self) -> dict[str, Any]:
        """The settings a checkpoint belongs to: those that define the result (`rundir.result_fields`,
        global batch included, so the process count may change) less `output`, which does not touch
        training."""
        return ckpt.settings_record({k: v for k, v in self.result_fields.items() if k != "output"})

    def _check_same_settings(self, ref: ckpt.CheckpointRef, state: dict[str, Any]) -> None:
        """Refuse to resume a checkpoint trained with other settings, naming each, unless allowed.

        Why: a resumed run with a new learning rate would keep the checkpoint's schedule, apply a new
        lora.alpha to weights trained with the old one, and report the new settings.
        `training.resumeAllowChanged` lets named settings change knowingly.
        """
        saved = state.get("settings")
        if saved is None:
            log.warning("checkpoint %s was written before checkpoints recorded their settings: cannot check that "
                        "this run's settings match it; resuming", ref.path)
            return
        current = self.settings()
        allowed = set(self.cfg.training.resume_allow_changed)
        unknown = sorted(allowed - current["fields"].keys())
        if unknown:
            raise RunDirError(
                f"training.resumeAllowChanged names {', '.join(unknown)}: not a setting a checkpoint records "
                f"(those are {', '.join(sorted(current['fields']))})"
            )
        changes = ckpt.changed_settings(saved, current)
        refused = {k: v for k, v in changes.items() if k not in allowed}
        if refused:
            raise RunDirError(
                f"checkpoint {ref.path} was trained with other settings: {ckpt.describe_changes(refused)}: "
                "resume with the checkpoint's settings, allow the change with training.resumeAllowChanged: "
                f"[{', '.join(refused)}], or start over (training.resume: never, or a new output dir)"
            )
        if changes:
            log.warning("resuming %s with changed settings (training.resumeAllowChanged): %s", ref.path,
                        ckpt.describe_changes(changes))

    def _apply_optimizer_settings(self) -> None:
        """Make this run's optimiser settings the ones in force after a resume.

        Loading a checkpoint restores AdamW's param-group settings and the scheduler's base learning
        rate from it; they equal this run's unless `training.resumeAllowChanged` let them differ, and
        then the allowed values must be what trains (and what config.yaml reports).
        """
        t = self.cfg.training
        lr = t.learning_rate * self.lr_lambda(self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group.update(initial_lr=t.learning_rate, lr=lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                         weight_decay=t.weight_decay)
        self.scheduler.base_lrs = [t.learning_rate] * len(self.optimizer.param_groups)

    # ------------------------------------------------------------------ measuring
    def measure(self, prompts: list[tuple[str, str | None]], label: str) -> dict[str, Any]:
        """Held-out loss (all ranks) and generations (rank 0)."""
        loss = self.held_out_loss()
        results: list[GenerationResult] = []
        # Under ZeRO-3 every rank generates (each forward gathers weights from all); rank 0 keeps the text.
        if (self.world.is_main or self.engine.sharded) and self.cfg.evaluation.exact_match and prompts:
            ids = [encode_prompt(p, self.tokenizer, self.data.cfg) for p, _ in prompts]
            with self.eager():
                gen = generate(
                    self.model, ids, int(self.tokenizer.pad_token_id), self.tokenizer.eos_token_id,
                    self.cfg.evaluation.max_new_tokens, self.rt.device.torch_device, self.rt.autocast,
                    synced=self.engine.sharded and self.world.distributed,
                )
            texts = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
            results = [GenerationResult(p, a, g) for (p, a), g in zip(prompts, texts, strict=True)]
        em = exact_match(results)
        log.info("%s: eval loss %.4f, exact match %s", label, loss, "n/a" if em is None else f"{em:.3f}")
        return {"eval_loss": loss, "exact_match": em, "results": results}

    def eager(self) -> contextlib.AbstractContextManager[Any]:
        """Compiled layers run eagerly for evaluation (`compile.eager_while`)."""
        return eager_while(self.cfg.training.compile or self.compiled_layers)

    def held_out_loss(self) -> float:
        """Loss over the held-out rows (all ranks), compiled layers run eagerly."""
        with self.eager():
            return eval_loss(self.loss_module, self.eval_batches, self.rt.device.torch_device, self.rt.autocast,
                             self.world)

    def measure_before(self, start_step: int) -> dict[str, Any] | None:
        """The base model's figures; stored so a resumed run still reports them."""
        path = self.run_dir / BASELINE_FILE
        if start_step > 0 and path.is_file():
            saved = json.loads(path.read_text())
            return {**saved, "results": [GenerationResult(**r) for r in saved.get("results", [])]}
        if not self.cfg.evaluation.before:
            return None
        before = self.measure(self.eval_prompts, label="before")
        if self.world.is_main:
            ckpt.write_json_atomic(path, {
                "eval_loss": before["eval_loss"], "exact_match": before["exact_match"],
                "results": [r.__dict__ for r in before["results"]],
            })
            self.record({"step": 0, "epoch": 0.0, "kind": "eval", "loss": before["eval_loss"],
                         "exact_match": before["exact_match"]})
        return before

    # ------------------------------------------------------------------ training
    def rows_for_step(self, step: int) -> list[PackedRow]:
        """The global batch of an optimizer step: a slice of the epoch's seeded permutation."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._perm_epoch != epoch:
            self._perm = epoch_order(len(self.data.train_rows), self.cfg.training.seed, epoch)
            self._perm_epoch = epoch
        picked = self._perm[index * self.global_batch : (index + 1) * self.global_batch]
        return [self.data.train_rows[i] for i in picked]

    def micro_batches(self, rows: list[PackedRow]) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the global batch, in accumulation order."""
        mbs, world = self.cfg.training.micro_batch_size, self.world.world_size
        pad = int(self.tokenizer.pad_token_id)
        for a in range(self.cfg.training.gradient_accumulation_steps):
            chunk = rows[a * mbs * world : (a + 1) * mbs * world]
            mine = chunk[self.world.rank * mbs : (self.world.rank + 1) * mbs]
            yield collate_flat(mine) if self.padding_free else collate(mine, pad)

    def train(self, start_step: int) -> dict[str, Any]:
        t = self.cfg.training
        console = ConsoleProgress(self.total_steps, enabled=self.world.is_main)
        cadence = ckpt.SaveCadence(t.save_steps, t.save_minutes, clock=self.save_clock)
        self._install_sigterm()
        self.engine.module.train()
        tokens_this_session = 0
        train_time = 0.0
        step = start_step
        inputs = self.step_inputs(start_step) if start_step < self.total_steps else None
        for step in range(start_step, self.total_steps):
            synchronize(self.rt.device)
            t_step = time.monotonic()
            torch.manual_seed(t.seed * 1_000_003 + step * 1009 + self.world.rank)
            assert inputs is not None
            step_tokens, batches, global_labels = inputs
            # On the training device: one host sync per step (at the log) instead of one per micro-batch,
            # and the all-reduce below runs on the tensors nccl/xccl can reduce.
            loss_total = torch.zeros((), dtype=torch.float32, device=self.rt.device.torch_device)
            for i, batch in enumerate(batches):
                moved = {k: v.to(self.rt.device.torch_device) for k, v in batch.items()}
                sync = i == len(batches) - 1 or not self.world.distributed
                with self.engine.no_sync(sync), self.rt.autocast():
                    loss_sum, _ = self.engine.module(**moved)
                self.engine.backward(loss_sum * self.world.world_size / global_labels)
                loss_total += loss_sum.detach().float()
            grad_norm = self.engine.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            dist_.all_reduce_sum(loss_total, self.world)
            # The next step's batches are built on the host while the device still runs this one.
            inputs = self.step_inputs(step + 1) if step + 1 < self.total_steps else None
            synchronize(self.rt.device)
            train_time += time.monotonic() - t_step
            tokens_this_session += step_tokens
            done = step + 1
            loss, norm = float(loss_total) / global_labels, float(grad_norm)
            self._log_step(done, loss, norm, step_tokens, tokens_this_session, train_time, start_step, console)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise TrainingDiverged(
                    f"training diverged at step {done}: loss {loss:.4g}, gradient norm {norm:.4g}; nothing was "
                    f"published and no checkpoint holds the non-finite weights; lower training.learningRate "
                    f"(now {t.learning_rate:g}) or raise training.warmupSteps (now {t.warmup_steps})"
                )
            if t.eval_steps and done % t.eval_steps == 0 and done < self.total_steps:
                loss = self.held_out_loss()
                self.record({"step": done, "epoch": done / self.steps_per_epoch, "kind": "eval", "loss": loss})
                self.progress.update(eval_loss=loss)
            decision = cadence.decide(done, done == self.total_steps, self._stop_requested, self.world,
                                      self.rt.device.torch_device)
            if decision.save:
                self.save_checkpoint(done, tokens_this_session)
                cadence.saved()
            if decision.stop:
                raise Preempted(f"stopped by SIGTERM after step {done}; checkpoint written, resume continues there")
        return {
            "steps": self.total_steps,
            "steps_this_session": self.total_steps - start_step,
            "train_tokens": self.train_tokens_before + tokens_this_session,
            "train_tokens_this_session": tokens_this_session,
            "train_wall_s": train_time,
            "train_tokens_per_s": tokens_this_session / train_time if train_time else 0.0,
        }

    def step_inputs(self, step: int) -> tuple[int, list[dict[str, torch.Tensor]], int]:
        """A step's tokens, this rank's micro-batches (on the host) and the global batch's label count."""
        rows = self.rows_for_step(step)
        return sum(len(r) for r in rows), list(self.micro_batches(rows)), self._global_label_count(rows)

    def _global_label_count(self, rows: list[PackedRow]) -> int:
        """Label tokens of the whole global batch: every rank knows all rows, so no collective."""
        pad = int(self.tokenizer.pad_token_id)
        return max(1, sum(count_label_tokens(collate([r], pad)) for r in rows))

    def _log_step(self, done: int, loss: float, grad_norm: float, step_tokens: int, tokens: int,
                  train_time: float, start_step: int, console: ConsoleProgress) -> None:
        t = self.cfg.training
        tps = tokens / train_time if train_time else 0.0
        steps_done = done - start_step
        eta = (self.total_steps - done) * (train_time / steps_done) if steps_done else math.nan
        lr = float(self.scheduler.get_last_lr()[0])
        self.progress.update(step=done, epoch=done / self.steps_per_epoch, train_loss=loss,
                             tokens_per_second=tps, eta_seconds=eta,
                             train_tokens=self.train_tokens_before + tokens)
        if done % t.logging_steps == 0 or done == self.total_steps:
            self.record({"step": done, "epoch": round(done / self.steps_per_epoch, 4), "kind": "train",
                         "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": step_tokens,
                         "tokens_per_s": round(tps, 1), "elapsed_s": round(train_time, 4)})
            console.line(done, loss, lr, tps, eta)

    def record(self, entry: dict[str, Any]) -> None:
        assert self.metrics is not None  # guard_run_dir opened it
        self.history.append(entry)
        self.metrics.append(entry)

    def save_checkpoint(self, step: int, tokens_this_session: int) -> None:
        state = {"train_tokens": self.train_tokens_before + tokens_this_session,
                 "world_size": self.world.world_size, "total_steps": self.total_steps,
                 "global_batch": self.global_batch, "settings": self.settings()}
        # Every rank enters (ZeRO gathers its partitions); rank 0 writes one world-independent format.
        self.engine.save(self.run_dir, step, self.scheduler, state, self.cfg.training.save_total_limit,
                         self.world.is_main)
        dist_.barrier(self.world)

    def _install_sigterm(self) -> None:
        """Kubernetes stops pods with SIGTERM: finish the step, checkpoint, exit resumable."""
        def handler(signum: int, frame: object) -> None:
            self._stop_requested = True
        with contextlib.suppress(ValueError):  # not in the main thread (tests)
            signal.signal(signal.SIGTERM, handler)

    # ------------------------------------------------------------------ publishing
    def publish(self, before: dict[str, Any] | None, after: dict[str, Any], train_stats: dict[str, Any],
                wall_s: float) -> dict[str, Any]:
        """Rank 0 writes adapter, optional merged model, plot, samples and (last) the summary."""
        if not self.world.is_main:
            return {}
        self.record({"step": self.total_steps, "epoch": self.total_steps / self.steps_per_epoch,
                     "kind": "eval", "loss": after["eval_loss"], "exact_match": after["exact_match"]})
        adapter = save_adapter(self.model, self.run_dir, self.tokenizer, self.initial_adapter)
        if self.cfg.output.plot:
            plot_loss(self.history, self.run_dir / "loss.png")
        write_samples(self.run_dir / "samples.md", before["results"] if before else None, after["results"],
                      self.cfg.evaluation.sample_prompts)
        weights = adapter / "adapter_model.safetensors"
        summary = {
            "run_id": self.run_id(),
            "artifact_uri": self.cfg.output.s3.uri.rstrip("/") if self.cfg.output.s3 else None,
            "device": self.rt.device.type,
            "device_name": self.rt.device.name,
            "cpu_isa": self.rt.device.isa,
            "threads": self.rt.device.threads,
            "dtype": self.rt.dtype,
            "world_size": self.world.world_size,
            "backend": self.rt.backend,
            "zero_stage": self.engine.zero_stage,
            "model": self.cfg.model.name_or_path,
            "params": self.param_counts,
            **train_stats,
            "wall_s": round(wall_s, 2),
            "eval_loss_before": before["eval_loss"] if before else None,
            "eval_loss_after": after["eval_loss"],
            "exact_match_before": before["exact_match"] if before else None,
            "exact_match_after": after["exact_match"],
            "exact_match_samples": len(after["results"]),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_device_memory_bytes": peak_memory_bytes(self.rt.device),
            "model_device_memory_bytes": self.model_memory_bytes,
            "data": self.data.stats,
            "adapter": {"path": str(adapter), "sha256": contract.sha256_file(weights), "size_bytes": weights.stat().st_size},
        }
        if self.cfg.output.merge:
            summary["merged"] = str(
                zero.save_merged_from_adapter(self.rt.source, self.cfg.model, self.rt.dtype, adapter, self.run_dir,
                                              self.tokenizer)
                if self.engine.sharded else save_merged(self.model, self.run_dir, self.tokenizer))
        write_summary(self.run_dir, summary)
        self.claim.finish()  # the new run is finished: the run it replaced can go
        self.deliver()
        return summary

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        dist_.destroy(self.world)
