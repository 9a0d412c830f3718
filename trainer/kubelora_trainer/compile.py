"""Regional compilation: torch.compile each decoder layer, not the whole model.

Why: compiling the whole loss module traces every layer and the head as one graph (a long wait
before the first step); the decoder's layers are one class run N times, so compiling
the layer (the region) traces it once and every layer reuses that code, guarded on its own
weights. The fusions that pay (RMSNorm, RoPE, SwiGLU and the LoRA adds into fewer kernels) are all
inside a layer. The embedding and the final norm stay eager; the head's cross-entropy is the
one other region compiled (`loss.head_cross_entropy`: the fp32 upcast and softmax over the vocabulary
fused), unless `training.lossChunk` slices it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .rundir import COMPILE_CACHE_DIR

#: Compiled variants one code object may hold: one per layer in the worst case (guards on a
#: layer's own attributes) times a few shapes; past torch's default (8) layers would silently run
#: eager.
RECOMPILE_LIMIT = 256


#: Planned optimizer steps from which an unset `training.compileLayers` compiles. The compile pays
#: back (its wait / the time it saves a step) after ~75 steps on the 2-core AMX VM, ~100-140 on one
#: H200 and ~210 on the 16-core AMX host (docs/benchmarks.md, "Regional compilation by default for
#: long runs"); 300 leaves room for a slower compile or a smaller gain.
AUTO_MIN_STEPS = 300


def choose_compile_layers(setting: bool | None, *, planned_steps: int, device_type: str, dtype: str,
                          excluded_by: str | None) -> tuple[bool, str]:
    """(compile the decoder layers?, reason for the log) from `training.compileLayers`.

    Unset, it compiles only where that was measured to be faster over the whole run: bf16 on a GPU
    or a CPU (1.5-2.2x steady against the eager defaults), a run long enough to pay back the
    compile's wait (`AUTO_MIN_STEPS`), and a toolchain inductor can build with. `excluded_by` names
    a setting the combination was never measured with (FSDP, DeepSpeed, whole-model compile, ...).
    """
    if setting is not None:
        return setting, f"training.compileLayers is {str(setting).lower()}"
    if excluded_by:
        return False, f"not by default with {excluded_by}"
    if dtype != "bf16":
        return False, f"by default only in bf16, where it was measured (this run computes in {dtype})"
    if device_type not in ("cpu", "cuda", "xpu"):
        return False, f"not by default on {device_type}"
    if planned_steps < AUTO_MIN_STEPS:
        return False, f"{planned_steps} steps do not pay back the compile's wait (from {AUTO_MIN_STEPS} they do)"
    missing = missing_toolchain(device_type)
    if missing:
        return False, missing
    return True, f"{planned_steps} steps in bf16 on {device_type} pay back the compile's wait"


def missing_toolchain(device_type: str) -> str | None:
    """What inductor would lack to build kernels for this device, or None.

    Why check first: on a CPU inductor compiles C++ (a compiler and Python's headers: its kernels
    carry Python bindings), on a GPU it writes Triton; without them the first step fails, so an
    unset `compileLayers` stays eager there instead.
    """
    if device_type == "cpu":
        cxx = os.environ.get("CXX") or "g++"
        if shutil.which(cxx) is None:
            return f"no C++ compiler ({cxx}) for inductor's CPU kernels"
        headers = Path(sysconfig.get_paths()["include"], "Python.h")
        if not headers.is_file():
            return f"no Python headers ({headers}) for inductor's CPU kernels"
        return None
    try:
        import triton  # noqa: F401
    except ImportError:
        return "no Triton for inductor's GPU kernels"
    return None


_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
_set_here: str | None = None  # the value `cache_in_run_dir` set last (a later run in this process may move it)


def cache_in_run_dir(run_dir: Path, rank: int) -> Path | None:
    """Keep torch.compile's on-disk caches (inductor's compiled graphs and kernels, AOTAutograd's
    graphs) in the run dir, unless ``TORCHINDUCTOR_CACHE_DIR`` names a folder of the user's; returns
    the folder, or None.

    Why: their default is under /tmp, a new emptyDir in every pod, so every attempt of a job (after
    a preemption, a suspend, a lost node) compiled from scratch. The run dir is the one place every
    attempt mounts again. On the 2-core AMX VM a 4-step run of SmolLM2-135M with `compileLayers`
    took 128 s with an empty cache and 43 s with the cache a first run left (docs/benchmarks.md). One folder a
    rank: ranks may sit on different nodes and write at once. Nothing is written here until
    something compiles, which is after the run took its run dir (recipe.py)."""
    global _set_here
    current = os.environ.get(_CACHE_ENV)
    # Inductor writes its default into the variable the first time it uses a cache (the CPU's ISA
    # check does, before any model is built): that value is not a choice.
    if current and current not in (_set_here, _inductor_default()):
        return None  # the user's (or the image's) choice
    folder = run_dir.resolve() / COMPILE_CACHE_DIR / f"rank-{rank}"
    _set_here = os.environ[_CACHE_ENV] = str(folder)  # inductor reads it at each cache access
    return folder


def _inductor_default() -> str | None:
    try:
        from torch._inductor.runtime.runtime_utils import default_cache_dir
    except ImportError:  # a torch that moved it: only an unset variable counts as the default then
        return None
    return os.path.abspath(default_cache_dir())


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks of a transformers causal LM (the `layers` list of its decoder)."""
    base: Any = getattr(model, "get_base_model", lambda: model)()
    layers = getattr(base.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(base).__name__} has no decoder `layers` list to compile one by one")
    return layers


def compile_layers(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile every decoder layer in place (`nn.Module.compile`); returns how many.

    ``mode`` is torch.compile's (``reduce-overhead``: each layer's kernels replayed as a CUDA graph,
    `training.deviceGraphs`)."""
    import torch._dynamo.config as dynamo_config

    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), RECOMPILE_LIMIT))
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend, mode=mode)
    return len(layers)


def uncompiled(model: nn.Module) -> None:
    """Undo `compile_layers` (`nn.Module.compile` keeps the original forward)."""
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None


def eager_while(compiled: bool) -> contextlib.AbstractContextManager[Any]:
    """Compiled regions run as plain eager code for the duration: evaluation and generation.

    Why: the compiled code pays for the training step's shapes. Held-out batches have other lengths
    and generation calls each layer once per new token with a growing KV cache, so under compilation
    every new shape would be traced and compiled again (a minute each on a CPU, with `deviceGraphs`
    also recorded as another graph), for a few forward passes that eager runs as fast.
    """
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()
