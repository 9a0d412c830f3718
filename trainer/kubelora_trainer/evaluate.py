"""Held-out measurements: eval loss, greedy generations and exact match.

Why exact match: the bundled tasks have one right answer each, so "the adapter helped" is a
number (held-out answers reproduced exactly), not an impression of a few samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .distributed import WorldView, all_reduce_sum


@dataclass(frozen=True)
class GenerationResult:
    prompt: str
    answer: str | None
    generated: str

    @property
    def correct(self) -> bool:
        return self.answer is not None and normalize(self.generated) == normalize(self.answer)


def normalize(text: str) -> str:
    """Exact match up to surrounding whitespace (case and punctuation count)."""
    return " ".join(text.strip().split())


def partitions_weights(module: torch.nn.Module) -> bool:
    """True for a DeepSpeed ZeRO-3 engine or an FSDP root: its forward gathers each layer's weights from
    all ranks, so every rank must run the same number of forward passes (a rank alone would wait forever)."""
    from torch.distributed.fsdp import FSDPModule

    check = getattr(module, "zero_optimization_partition_weights", None)
    return bool(check()) if callable(check) else isinstance(module, FSDPModule)


@torch.no_grad()
def eval_loss(
    loss_module: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    world: WorldView,
) -> float:
    """Token-weighted mean loss over this rank's share of `batches`, summed over ranks."""
    was_training = loss_module.training
    loss_module.eval()
    total = torch.zeros(2, dtype=torch.float32, device=device)  # reduced on the device (nccl/xccl)
    lockstep = partitions_weights(loss_module)
    rounds = -(-len(batches) // world.world_size)
    for r in range(rounds):
        i = r * world.world_size + world.rank
        if i >= len(batches) and not lockstep:
            continue
        # Under ZeRO-3 a rank without a batch of its own still runs one (and discards it) so that
        # every rank takes part in every layer's weight gathering.
        moved = {k: v.to(device) for k, v in batches[min(i, len(batches) - 1)].items()}
        with autocast():
            loss_sum, count = loss_module(**moved)
        if i < len(batches):
            total += torch.stack([loss_sum.detach().float(), torch.as_tensor(count, device=device).float()])
    all_reduce_sum(total, world)
    loss_module.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    eos_token_id: int | None,
    max_new_tokens: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    batch_size: int = 16,
    synced: bool = False,
) -> list[list[int]]:
    """Greedy completions (new token ids only), batched with left padding; each row stops at EOS.

    Takes prompt ids rather than text so the caller can encode prompts exactly as training did
    (`data.encode_prompt`: same special-token prefix). `synced`: every rank runs this same call
    (ZeRO-3, where each forward gathers weights from all ranks); generation then continues until
    all ranks are done (transformers' `synced_gpus`).
    """
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            chunk = [list(p) for p in prompt_ids[start : start + batch_size]]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p) :] = 1
            with autocast():
                out = model.generate(  # type: ignore[operator]
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=pad_token_id,
                    eos_token_id=eos_token_id,
                    synced_gpus=synced,
                )
            for row in out[:, width:].tolist():
                if eos_token_id is not None and eos_token_id in row:
                    row = row[: row.index(eos_token_id)]
                outputs.append(row)
    finally:
        model.train(was_training)
    return outputs


def exact_match(results: Sequence[GenerationResult]) -> float | None:
    """Fraction of scored results that are exactly right (None when nothing has an answer)."""
    scored = [r for r in results if r.answer is not None]
    if not scored:
        return None
    return sum(r.correct for r in scored) / len(scored)
