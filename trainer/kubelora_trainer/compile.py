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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .rundir import COMPILE_CACHE_DIR

#: Compiled variants one code object may hold: one per layer in the worst case (guards on a
#: layer's own attributes) times a few shapes; past torch's default (8) layers would silently run
#: eager.
RECOMPILE_LIMIT = 256


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
