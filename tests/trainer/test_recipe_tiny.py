"""A whole run on a tiny random Llama: outputs, export fidelity, resume after a kill.

Fast mechanics checks (seconds). A random 2-layer model barely moves under LoRA, so claims
about learning (loss falls, exact match rises) live in test_smollm2.py, on the real model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from kubelora_trainer.config import parse_config
from kubelora_trainer.recipe import LoRAFineTuneRecipe

from .conftest import tiny_config

REQUIRED_SUMMARY_KEYS = {
    "device", "dtype", "train_tokens", "train_tokens_per_s", "steps", "wall_s", "eval_loss_before",
    "eval_loss_after", "exact_match_before", "exact_match_after",
}


def _probe_batch(tokenizer) -> dict[str, torch.Tensor]:  # noqa: ANN001
    enc = tokenizer(["Sort these numbers: 3, 1, 2", "What is 7 plus 5?"], return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[LoRAFineTuneRecipe, dict]:
    run_dir = tmp_path_factory.mktemp("run") / "out"
    cfg = parse_config(tiny_config(tiny_model_dir, run_dir, training={"maxSteps": 12, "evalSteps": 6}))
    recipe = LoRAFineTuneRecipe(cfg)
    summary = recipe.run()
    return recipe, summary


def test_run_writes_every_output(finished_run: tuple[LoRAFineTuneRecipe, dict]) -> None:
    recipe, summary = finished_run
    run_dir = recipe.run_dir
    for rel in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl",
                "metrics.csv", "loss.png", "samples.md", "summary.json", "config.yaml"):
        assert (run_dir / rel).is_file(), rel
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk.keys() >= REQUIRED_SUMMARY_KEYS
    assert on_disk["steps"] == 12 and on_disk["device"] == "cpu" and on_disk["dtype"] == "fp32"
    assert on_disk["train_tokens"] > 0 and on_disk["train_tokens_per_s"] > 0
    assert recipe.optimizer.defaults["fused"] is True  # torch's fused AdamW on CPU (recipe.fused_adamw)
    assert on_disk["model_device_memory_bytes"] is None  # recorded on accelerators only
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if r["kind"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in history if r["kind"] == "eval"] == [0, 6, 12]
    assert "step,epoch,kind,loss" in (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Fine-tuned:" in (run_dir / "samples.md").read_text()
    # No temporary build directories are left behind.
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".adapter")]


def test_saved_adapter_reloads_to_the_same_logits(finished_run: tuple[LoRAFineTuneRecipe, dict],
                                                   tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe, _ = finished_run
    batch = _probe_batch(recipe.tokenizer)
    recipe.model.eval()
    with torch.no_grad():
        in_memory = recipe.model(**batch).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, recipe.run_dir / "adapter").eval()
        from_disk = reloaded(**batch).logits
    torch.testing.assert_close(from_disk, in_memory, atol=1e-5, rtol=1e-5)
    # The adapter changed the model: equality above is not trivially base == base.
    with torch.no_grad(), reloaded.disable_adapter():
        assert (reloaded(**batch).logits - from_disk).abs().max() > 1e-3


def test_merged_model_matches_adapter_in_bf16(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Merged weights loaded by plain transformers give the adapter's logits within bf16 tolerance."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "bf16"
    cfg = parse_config(tiny_config(tiny_model_dir, run_dir, model={"dtype": "bf16"},
                                   training={"maxSteps": 4}, output={"merge": True}))
    LoRAFineTuneRecipe(cfg).run()
    assert (run_dir / "merged" / "model.safetensors").is_file()
    tok = __import__("transformers").AutoTokenizer.from_pretrained(run_dir / "merged")
    batch = _probe_batch(tok)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        adapted = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
        merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.bfloat16).eval()
        a = adapted(**batch).logits.float()
        m = merged(**batch).logits.float()
    assert merged.dtype == torch.bfloat16
    assert not hasattr(merged, "peft_config")
    # bf16 keeps ~3 significant digits; logits here are O(1).
    torch.testing.assert_close(m, a, atol=5e-2, rtol=2e-2)


def test_olora_adapter_applies_to_the_original_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    """olora moves weight out of the base during init; the exported adapter must undo that."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = parse_config(tiny_config(tiny_model_dir, tmp_path / "olora", lora={"init": "olora"},
                                   training={"maxSteps": 4}, evaluation={"exactMatch": False}))
    recipe = LoRAFineTuneRecipe(cfg)
    recipe.run()
    batch = _probe_batch(recipe.tokenizer)
    recipe.model.eval()
    with torch.no_grad():
        in_memory = recipe.model(**batch).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, recipe.run_dir / "adapter").eval()
        torch.testing.assert_close(reloaded(**batch).logits, in_memory, atol=1e-4, rtol=1e-4)


def _train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert len(steps) == len(set(steps)), f"duplicate steps in the history: {steps}"
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_killed_run_resumes_with_the_same_loss_curve(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGKILL after a checkpoint, restart with resume: auto -> continues at that step, same curve."""
    overrides = {"training": {"maxSteps": 60, "saveSteps": 5, "saveTotalLimit": 2},
                 "lora": {"dropout": 0.1},  # dropout makes the RNG part of what must resume exactly
                 "evaluation": {"exactMatch": False, "before": False}}
    reference_dir = tmp_path / "reference"
    LoRAFineTuneRecipe(parse_config(tiny_config(tiny_model_dir, reference_dir, **overrides))).run()
    reference = _train_losses(reference_dir)

    run_dir = tmp_path / "killed"
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, run_dir, **overrides)))
    cmd = [sys.executable, "-m", "kubelora_trainer.cli", "run", str(cfg_path)]
    env = {**os.environ, "KUBELORA_TERMINATION_LOG": str(tmp_path / "termination-log")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = run_dir / "checkpoints" / "step-000010" / "state.json"
    deadline = time.monotonic() + 300
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run_dir / "summary.json").exists()
    killed_at = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert 10 <= killed_at < 60

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"at step {killed_at}" in done.stderr
    resumed = _train_losses(run_dir)
    assert sorted(resumed) == sorted(reference) == list(range(1, 61))
    for step in range(1, 61):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5), step
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["steps_this_session"] == 60 - killed_at


def test_resume_with_a_different_global_batch_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Rows per step x step is the data position: a changed global batch would skip or repeat rows."""
    from kubelora_trainer.recipe import RunDirError

    first = tmp_path / "first"
    quick = {"exactMatch": False, "before": False}
    LoRAFineTuneRecipe(parse_config(tiny_config(tiny_model_dir, first, training={"maxSteps": 4, "saveSteps": 2},
                                                evaluation=quick))).run()
    checkpoint = first / "checkpoints" / "step-000002"
    assert json.loads((checkpoint / "state.json").read_text())["global_batch"] == 2
    second = tmp_path / "second"
    cfg = parse_config(tiny_config(tiny_model_dir, second, evaluation=quick,
                                   training={"maxSteps": 4, "microBatchSize": 4, "resume": str(checkpoint)}))
    with pytest.raises(RunDirError, match="trained with 2 rows per optimizer step, this run has 4"):
        LoRAFineTuneRecipe(cfg).run()
    assert not (second / "summary.json").exists() and not (second / "adapter").exists()
    # The same product from another split resumes.
    cfg = parse_config(tiny_config(tiny_model_dir, second, evaluation=quick,
                                   training={"maxSteps": 4, "microBatchSize": 1, "gradientAccumulationSteps": 2,
                                             "resume": str(checkpoint)}))
    assert LoRAFineTuneRecipe(cfg).run()["steps_this_session"] == 2
