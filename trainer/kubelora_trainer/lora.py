"""Attach a LoRA adapter to the base model, checking target names against the real model.

Why check ourselves: peft's error for a misspelt target is a long traceback; users need the
list of linear modules the model actually has.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import LoraSettings

INIT_MAP: dict[str, bool | str] = {
    "default": True,
    "gaussian": "gaussian",
    "olora": "olora",
    "pissa": "pissa",
    "loftq": "loftq",
}


class LoraTargetError(ValueError):
    """A requested target module does not exist in the model."""


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names of the linear layers a LoRA adapter can target (the output head excluded)."""
    names: set[str] = set()
    output: Any = getattr(model, "get_output_embeddings", lambda: None)()
    for full, module in model.named_modules():
        if module is output:
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def check_targets(model: nn.Module, settings: LoraSettings) -> None:
    """Fail with the model's linear module names when a requested target is not among them."""
    if settings.target_modules == "all-linear":
        return
    available = linear_module_names(model)
    missing = [t for t in settings.target_modules if t not in available]
    if missing:
        raise LoraTargetError(
            f"lora.targetModules {missing} not found in the model; its linear modules are: {', '.join(available)}"
        )


def build_lora_config(settings: LoraSettings):  # noqa: ANN201 - peft type
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias=settings.bias,
        init_lora_weights=INIT_MAP[settings.init],  # type: ignore[arg-type]
        modules_to_save=settings.modules_to_save or None,
        task_type="CAUSAL_LM",
    )


def attach_lora(model: nn.Module, settings: LoraSettings, seed: int):  # noqa: ANN201 - peft type
    """Wrap the model with a fresh adapter; adapter weights are fp32 whatever the base dtype.

    The seed is set right before creation so that adapter init is reproducible across ranks and
    restarts (a resumed run then overwrites it from the checkpoint anyway).
    """
    from peft import get_peft_model

    check_targets(model, settings)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, build_lora_config(settings))
    for name, p in peft_model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
        if "lora_" not in name and p.requires_grad and not settings.modules_to_save and settings.bias == "none":
            p.requires_grad_(False)
    return peft_model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, for the log; full sizes also for ZeRO-3-partitioned weights
    (whose local `numel()` is 0 outside a gather)."""
    sizes = [(p.requires_grad, int(getattr(p, "ds_numel", p.numel()))) for p in model.parameters()]
    return sum(n for grad, n in sizes if grad), sum(n for _, n in sizes)
