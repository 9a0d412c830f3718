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
from kubelora_trainer.model import DTYPES, attention_kernel, load_model, materialize
from kubelora_trainer.recipe import LoRAFineTuneRecipe

from .conftest import tiny_config
from .logits_tolerance import assert_adapter_shows, assert_logits_close


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_qlora_trains_a_4bit_base_and_its_adapter_reloads_and_merges(
    tiny_model_dir: Path, tmp_path: Path, dtype: str
) -> None:
    """Both compute dtypes, pinned: `auto` would test fp32 on AVX2 CPUs and bf16 on AMX ones."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "run"
    cfg = parse_config(tiny_config(
        tiny_model_dir, run_dir,
        model={"quantization": "nf4", "dtype": dtype},
        training={"maxSteps": 16, "microBatchSize": 4, "learningRate": 1e-2},
    ))
    recipe = LoRAFineTuneRecipe(cfg)
    summary = recipe.run()
    assert summary["dtype"] == dtype
    base_layers = [m for m in recipe.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(base_layers) == 2 * 7  # every linear layer of both blocks is 4-bit
    assert summary["eval_loss_after"] < summary["eval_loss_before"]

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tok(["Sort these numbers: 3, 1, 2"], return_tensors="pt")
    recipe.model.eval()
    # A freshly quantized base loaded as the run (and `kubelora-train eval`) loads it, plain peft on top.
    load = {"dtype": DTYPES[dtype], "attn_implementation": attention_kernel(cfg.model, "cpu")}
    with torch.no_grad():
        in_memory = recipe.model(**batch).logits
        base = load_model(materialize(cfg.model), cfg.model, "cpu", dtype)
        reloaded = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
        assert_logits_close(reloaded(**batch).logits, in_memory, dtype)
        with reloaded.disable_adapter():
            assert_adapter_shows(in_memory, reloaded(**batch).logits, dtype)

    out = tmp_path / "merged-out"
    assert cli.main(["merge", str(run_dir / "adapter"), "--output", str(out)]) == 0
    merged_dir = next(out.glob("merged*"))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, **load).eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    with torch.no_grad():  # the adapter on the full-precision base, folded in
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **load)
        on_plain = PeftModel.from_pretrained(plain, run_dir / "adapter").eval()
        # bf16: W + BA rounded once to bf16 vs W x + B(A x) rounded per product.
        assert_logits_close(merged(**batch).logits, on_plain(**batch).logits, dtype, ulps=2)


def test_a_4bit_base_computes_alike_in_training_and_eval_and_across_a_save(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """On AVX512-BF16/AMX CPUs bitsandbytes repacked 4-bit weights at the first eval forward (other
    logits than training's) and `state_dict()` unpacked them lossily: the run's base drifted."""
    from transformers import AutoTokenizer

    cfg = parse_config(tiny_config(tiny_model_dir, tmp_path / "run", model={"quantization": "nf4"})).model
    model = load_model(materialize(cfg), cfg, "cpu", "fp32")
    batch = AutoTokenizer.from_pretrained(tiny_model_dir)(["Sort these numbers: 3, 1, 2"], return_tensors="pt")
    with torch.no_grad():
        training = model.train()(**batch).logits
        evaluating = model.eval()(**batch).logits
        model.state_dict()  # what every adapter and checkpoint save does
        after_save = model(**batch).logits
    torch.testing.assert_close(evaluating, training)
    torch.testing.assert_close(after_save, training)


def test_merge_during_a_qlora_run_is_refused_with_the_way_out(tiny_model_dir: Path, tmp_path: Path) -> None:
    raw = tiny_config(tiny_model_dir, tmp_path / "run", model={"quantization": "nf4"}, output={"merge": True})
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="kubelora-train merge"):
        load_config(path)
