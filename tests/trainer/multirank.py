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
