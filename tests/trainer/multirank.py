"""Helpers shared by the multi-process engine tests (test_deepspeed.py, test_fsdp*.py): run results,
adapter logits, checkpoint comparison and restarts, for any engine (DDP, ZeRO, FSDP)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .operator_env import launch, plan_workers
from .test_distributed import _losses


def _ok(results: list[subprocess.CompletedProcess[str]]) -> list[subprocess.CompletedProcess[str]]:
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return results


def _summary(run_dir: Path) -> dict:
    return dict(json.loads((run_dir / "summary.json").read_text()))


def _logits(model: object) -> object:
    import torch

    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[operator]


def _base_logits(model_dir: Path) -> object:
    import torch
    from transformers import AutoModelForCausalLM

    return _logits(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())


def _adapter_logits(model_dir: Path, adapter: Path) -> object:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return _logits(PeftModel.from_pretrained(base, str(adapter)).eval())


def _run_one(cfg: dict, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "KUBELORA_TERMINATION_LOG": str(tmp_path / "t.log")}
    return subprocess.run([sys.executable, "-m", "kubelora_trainer.cli", "run", str(path)], env=env,
                          capture_output=True, text=True, timeout=300)


def _same_checkpoint(a: Path, b: Path) -> None:
    """Two checkpoints hold the same trainable weights and AdamW state (same names, shapes, values)."""
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "trainable.safetensors")), load_file(str(b / "trainable.safetensors"))
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert wa[name].shape == wb[name].shape and torch.allclose(wa[name], wb[name], atol=1e-5), name
    oa, ob = (torch.load(d / "optimizer.pt", weights_only=True) for d in (a, b))
    assert sorted(oa["state"]) == sorted(ob["state"]) and len(oa["state"]) == len(wa)
    assert oa["param_groups"][0]["lr"] == pytest.approx(ob["param_groups"][0]["lr"])
    for i, sa in oa["state"].items():
        assert float(sa["step"]) == float(ob["state"][i]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            scale = float(sa[key].abs().max()) or 1.0
            assert float((sa[key] - ob["state"][i][key]).abs().max()) <= 1e-4 * scale, (i, key)


def _restart_from(checkpoint: Path, spec: dict, root: Path, name: str) -> list[float]:
    """A job restarted on a run dir that holds `checkpoint` (resume: auto), with the world size of `spec`."""
    workers = plan_workers(spec, root, name=name)
    target = root / "output" / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint, target)
    _ok(launch(workers))
    return _losses(root / "output")


def _held(stderr: str, marker: str) -> tuple[int, int]:
    """(held, total) from rank 0's "... this rank holds N of M parameter elements" line containing `marker`."""
    line = next(x for x in stderr.splitlines() if marker in x)
    held, total = (int(w) for w in line.split("holds ")[1].split(" parameter")[0].split(" of "))
    return held, total


def _trains_like_plain(run1: Path, run2: Path, model_dir: Path, steps: int) -> tuple[dict, dict]:
    """A sharded run (`run2`, which also wrote merged/) against the plain run of the same global batch
    (`run1`): same loss curve, eval loss, generations, adapter files and logits; returns both summaries."""
    import torch
    from transformers import AutoModelForCausalLM

    reference, sharded = _losses(run1), _losses(run2)
    assert len(reference) == len(sharded) == steps
    for a, b in zip(reference, sharded, strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    assert reference[-1] < reference[0]  # it trained (the curve is not flat)
    s1, s2 = _summary(run1), _summary(run2)
    assert s2["world_size"] == 2 and s2["params"] == s1["params"]  # full sizes, not shard sizes
    assert s2["eval_loss_before"] == pytest.approx(s1["eval_loss_before"], rel=1e-5)
    assert s2["eval_loss_after"] == pytest.approx(s1["eval_loss_after"], rel=1e-4)
    assert s2["exact_match_samples"] == s1["exact_match_samples"] == 4  # every rank took part in generation
    assert (run2 / "samples.md").read_text() == (run1 / "samples.md").read_text()
    # Rank 0 alone published: the same files, an adapter peft loads, the same logits.
    assert sorted(p.name for p in (run2 / "adapter").iterdir()) == sorted(p.name for p in (run1 / "adapter").iterdir())
    ref_logits, logits = (_adapter_logits(model_dir, d / "adapter") for d in (run1, run2))
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)  # type: ignore[arg-type]
    assert not torch.allclose(logits, _base_logits(model_dir), atol=1e-3)  # type: ignore[arg-type]  # trained
    merged = AutoModelForCausalLM.from_pretrained(s2["merged"], dtype=torch.float32).eval()
    assert torch.allclose(_logits(merged), logits, atol=1e-4)  # type: ignore[arg-type]
    return s1, s2


def _layer_heavy_llama(out: Path, hidden: int, intermediate: int, layers: int) -> Path:
    """A random Llama with SmolLM2's tokenizer and a tied embedding whose weights sit mostly in its
    layers (memory checks: holding half of it or all of it must be visible), saved at `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from . import smollm2_tokenizer

    tok = smollm2_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
