"""Real training of SmolLM2-135M-Instruct on the bundled tasks (a few minutes on 2 cores).

This is where "it really trains" is pinned: held-out loss falls and held-out exact match rises
from the base model's 0, and the exported adapter reproduces the in-memory model.
"""

from __future__ import annotations

import json

import pytest
import torch
from kubelora_trainer.config import parse_config
from kubelora_trainer.recipe import LoRAFineTuneRecipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory: pytest.TempPathFactory) -> LoRAFineTuneRecipe:
    run_dir = tmp_path_factory.mktemp("smollm2") / "run"
    cfg = parse_config({
        "model": {"nameOrPath": "smollm2-135m"},
        "data": {"path": "sample://train.jsonl", "evalPath": "sample://heldout.jsonl", "maxEvalSamples": 48,
                 "cutoffLen": 256},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targetModules": "all-linear"},
        "training": {"maxSteps": 24, "microBatchSize": 4, "learningRate": 1e-3, "warmupSteps": 4,
                     "loggingSteps": 1, "evalSteps": 12, "seed": 42},
        "evaluation": {"maxExactMatchSamples": 48, "maxNewTokens": 16},
        "output": {"dir": str(run_dir)},
        "device": "cpu",
    })
    recipe = LoRAFineTuneRecipe(cfg)
    recipe.summary = recipe.run()  # type: ignore[attr-defined]
    return recipe


def test_real_model_learns_the_tasks(smollm2_run: LoRAFineTuneRecipe) -> None:
    s = smollm2_run.summary  # type: ignore[attr-defined]
    # Pinned short curve: the base model scores 0 and has eval loss > 3 on these tasks.
    assert s["exact_match_before"] == 0.0
    assert s["eval_loss_before"] > 3.0
    assert s["eval_loss_after"] < 0.6 * s["eval_loss_before"]
    assert s["exact_match_after"] >= 0.15
    history = [json.loads(x) for x in (smollm2_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in history if r["kind"] == "train"]
    assert sum(train[-6:]) / 6 < 0.7 * sum(train[:6]) / 6
    evals = [r["loss"] for r in history if r["kind"] == "eval"]
    assert evals == sorted(evals, reverse=True), f"eval loss should fall at every eval: {evals}"


def test_summary_records_the_hardware(smollm2_run: LoRAFineTuneRecipe) -> None:
    s = json.loads((smollm2_run.run_dir / "summary.json").read_text())
    assert s["device"] == "cpu" and s["dtype"] in ("bf16", "fp32")
    assert set(s["cpu_isa"]) >= {"avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}
    assert s["adapter"]["sha256"] and s["adapter"]["size_bytes"] > 0
    assert s["data"]["packing"] is True


def test_real_adapter_reloads_to_the_same_logits(smollm2_run: LoRAFineTuneRecipe) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = smollm2_run
    enc = recipe.tokenizer(["Convert 3 kilometers to meters."], return_tensors="pt")
    recipe.model.eval()
    with torch.no_grad():
        in_memory = recipe.model(**enc).logits
        base = AutoModelForCausalLM.from_pretrained(recipe.source.location, dtype=in_memory.dtype)
        reloaded = PeftModel.from_pretrained(base, recipe.run_dir / "adapter").eval()
        torch.testing.assert_close(reloaded(**enc).logits, in_memory, atol=2e-4, rtol=1e-4)
