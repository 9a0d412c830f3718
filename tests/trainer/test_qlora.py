"""QLoRA on CPU: a 4-bit (bitsandbytes nf4) base under LoRA, through the whole recipe and the CLI's merge.

bitsandbytes >= 0.46 runs its 4-bit layers on CPU, so the QLoRA path is tested here for real: the base
layers are packed 4-bit weights, training lowers the held-out loss, the adapter reloads onto a freshly
quantized base to the same logits, and `kubelora-train merge` folds it into an unquantized base that
plain transformers loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kubelora_trainer import cli
from kubelora_trainer.config import ConfigError, load_config, parse_config
from kubelora_trainer.recipe import LoRAFineTuneRecipe

from .conftest import tiny_config


def test_qlora_trains_a_4bit_base_and_its_adapter_reloads_and_merges(tiny_model_dir: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    run_dir = tmp_path / "run"
    cfg = parse_config(tiny_config(
        tiny_model_dir, run_dir,
        model={"quantization": "nf4", "dtype": "auto"},
        training={"maxSteps": 16, "microBatchSize": 4, "learningRate": 1e-2},
    ))
    recipe = LoRAFineTuneRecipe(cfg)
    summary = recipe.run()
    base_layers = [m for m in recipe.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(base_layers) == 2 * 7  # every linear layer of both blocks is 4-bit
    assert summary["eval_loss_after"] < summary["eval_loss_before"]

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tok(["Sort these numbers: 3, 1, 2"], return_tensors="pt")
    recipe.model.eval()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_use_double_quant=True)
    with torch.no_grad():
        in_memory = recipe.model(**batch).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant, device_map={"": "cpu"})
        reloaded = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
        torch.testing.assert_close(reloaded(**batch).logits, in_memory, atol=1e-4, rtol=1e-4)

    out = tmp_path / "merged-out"
    assert cli.main(["merge", str(run_dir / "adapter"), "--output", str(out)]) == 0
    merged_dir = next(out.glob("merged*"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    with torch.no_grad():  # the adapter on the full-precision base, folded in
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        on_plain = PeftModel.from_pretrained(plain, run_dir / "adapter").eval()
        torch.testing.assert_close(merged(**batch).logits, on_plain(**batch).logits, atol=1e-4, rtol=1e-4)


def test_merge_during_a_qlora_run_is_refused_with_the_way_out(tiny_model_dir: Path, tmp_path: Path) -> None:
    raw = tiny_config(tiny_model_dir, tmp_path / "run", model={"quantization": "nf4"}, output={"merge": True})
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="kubelora-train merge"):
        load_config(path)
