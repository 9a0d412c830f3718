"""The trainer's fast paths compute exactly what the plain paths compute.

Padding-free batches with per-sample attention (``collate_flat`` + ``segment_attention``) and the
fused LoRA forward (``fused_lora``) exist only for speed: loss, gradients and whole loss curves
must match the padded, peft-forward path within float tolerance, and nothing they change may
leak into saved files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kubelora_trainer import fused_lora, segment_attention
from kubelora_trainer.config import LoraSettings, parse_config
from kubelora_trainer.data import PackedRow, collate, collate_flat, pack
from kubelora_trainer.data.tokenize import TokenizedExample
from kubelora_trainer.lora import attach_lora
from kubelora_trainer.loss import CausalLMLoss, count_label_tokens
from kubelora_trainer.recipe import LoRAFineTuneRecipe

from .conftest import tiny_config


def _example(n: int, prompt: int, offset: int) -> TokenizedExample:
    ids = [(offset + i) % 500 + 10 for i in range(n)]
    return TokenizedExample(input_ids=ids, labels=[-100] * prompt + ids[prompt:])


def _rows() -> list[PackedRow]:
    examples = [_example(n, p, 37 * i) for i, (n, p) in enumerate([(21, 9), (13, 4), (30, 11), (8, 3), (17, 6),
                                                                    (25, 10), (11, 5), (19, 7)])]
    return pack(examples, max_len=48)


def test_collate_flat_holds_the_same_tokens_and_labels_as_collate() -> None:
    rows = _rows()
    assert any(r.is_packed for r in rows)
    flat = collate_flat(rows)
    total = sum(len(r) for r in rows)
    assert flat["input_ids"].shape == flat["labels"].shape == flat["position_ids"].shape == (1, total)
    starts = flat["seq_starts"].tolist()
    assert starts[0] == 0 and starts[-1] == total
    assert len(starts) - 1 == sum(len(r.seq_lens) for r in rows)
    # every sample starts at position 0 and nowhere else
    assert (flat["position_ids"][0] == 0).nonzero().flatten().tolist() == starts[:-1]
    assert count_label_tokens(flat) == sum(count_label_tokens(collate([r], 0)) for r in rows)
    with pytest.raises(ValueError):
        collate_flat([])


def _tiny_lora_model(model_dir: Path, attn: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    model = attach_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0), seed=3)
    with torch.no_grad():  # B starts at zero: give it values so the LoRA path shows in outputs and gradients
        gen = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _loss_and_grads(module: CausalLMLoss, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    loss_sum, _ = module(**batch)
    loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return float(loss_sum.detach()), grads


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_flat_segments_and_fused_lora_match_the_padded_peft_path(tiny_model_dir: Path, attn: str) -> None:
    rows = _rows()
    model = _tiny_lora_model(tiny_model_dir, attn)
    module = CausalLMLoss(model)
    ref_loss, ref_grads = _loss_and_grads(module, collate(rows, pad_token_id=0))

    assert segment_attention.enable(model) == f"kubelora_segments_{attn}"
    assert fused_lora.enable(model) == 2 * 7  # 2 layers x q/k/v/o/gate/up/down
    loss, grads = _loss_and_grads(module, collate_flat(rows))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # The padded batch still works with both enabled (eval/generation take the fallback path).
    loss_padded, _ = _loss_and_grads(module, collate(rows, pad_token_id=0))
    assert loss_padded == pytest.approx(ref_loss, rel=1e-5)

    segment_attention.disable(model)
    fused_lora.disable(model)
    assert model.get_base_model().config._attn_implementation == attn


def test_segments_never_attend_across_samples(tiny_model_dir: Path) -> None:
    """Changing one sample's tokens changes no other sample's hidden states."""
    model = _tiny_lora_model(tiny_model_dir, "eager").eval()
    segment_attention.enable(model)
    rows = _rows()
    flat = collate_flat(rows)
    decoder = model.get_base_model().get_decoder()
    starts = flat["seq_starts"].tolist()

    def hidden(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return decoder(input_ids=ids, position_ids=flat["position_ids"], use_cache=False,
                           kubelora_segments=segment_attention.segment_bounds(flat["seq_starts"])).last_hidden_state

    before = hidden(flat["input_ids"])
    changed = flat["input_ids"].clone()
    changed[0, starts[1]:starts[2]] = 77  # rewrite the second sample
    after = hidden(changed)
    torch.testing.assert_close(after[0, : starts[1]], before[0, : starts[1]])
    torch.testing.assert_close(after[0, starts[2]:], before[0, starts[2]:])
    assert not torch.allclose(after[0, starts[1]:starts[2]], before[0, starts[1]:starts[2]])


def _train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("kind") == "train"]


def test_fast_and_plain_runs_have_the_same_loss_curve(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Whole recipe: 12 steps with both fast paths == 12 steps without, and the merged config is loadable."""
    curves = {}
    for name, flags in {"fast": True, "plain": False}.items():
        run_dir = tmp_path / name
        cfg = parse_config(tiny_config(
            tiny_model_dir, run_dir,
            training={"maxSteps": 12, "microBatchSize": 4, "paddingFree": flags, "fusedLora": flags},
            data={"packing": True},
            evaluation={"exactMatch": False, "before": False},
            output={"merge": name == "fast"},
        ))
        LoRAFineTuneRecipe(cfg).run()
        curves[name] = _train_losses(run_dir)
    assert len(curves["fast"]) == 12
    assert curves["fast"] == pytest.approx(curves["plain"], rel=1e-4)
    saved = json.loads((tmp_path / "fast" / "merged" / "config.json").read_text())
    assert "kubelora" not in json.dumps(saved)


def test_models_whose_attention_segments_cannot_reproduce_keep_padded_batches() -> None:
    from transformers import LlamaConfig, MistralConfig

    assert segment_attention.unsupported_reason(LlamaConfig()) is None
    assert "sliding-window" in (segment_attention.unsupported_reason(MistralConfig(sliding_window=64)) or "")
    assert segment_attention.unsupported_reason(MistralConfig(sliding_window=None)) is None


@pytest.mark.parametrize(
    ("setting", "device", "dtype", "expected"),
    [(None, "cpu", "fp32", True), (None, "cpu", "bf16", False), (None, "cuda", "bf16", False),
     (None, "xpu", "bf16", False), (True, "cuda", "bf16", True), (True, "cpu", "bf16", True),
     (False, "cpu", "fp32", False)],
)
def test_padding_free_unset_follows_the_device(setting: bool | None, device: str, dtype: str, expected: bool) -> None:
    """Unset: per-sample attention on a CPU in fp32 (saves compute), padded rows on bf16 CPUs (AMX matmuls)
    and GPUs (fewer kernel launches); set, the setting wins; never under whole-model torch.compile."""
    from kubelora_trainer.batching import choose_padding_free

    assert choose_padding_free(setting, False, device, dtype)[0] is expected
    assert choose_padding_free(setting, True, device, dtype) == (False, "torch.compile" if setting is not False
                                                                 else "training.paddingFree is false")
