"""Two real processes over gloo on 127.0.0.1 train like one process with twice the batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def _launch(cfg: dict, tmp_path: Path, name: str, world: int) -> list[subprocess.CompletedProcess[str]]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "KUBELORA_TERMINATION_LOG": str(tmp_path / f"{name}-{rank}.log")}
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "kubelora_trainer.cli", "run", str(path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def test_two_ranks_match_one_rank_with_double_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    common = {"evaluation": {"exactMatch": False}, "lora": {"dropout": 0.0}}
    single = tiny_config(tiny_model_dir, tmp_path / "single", training={"maxSteps": 8, "microBatchSize": 4}, **common)
    double = tiny_config(tiny_model_dir, tmp_path / "double", training={"maxSteps": 8, "microBatchSize": 2}, **common)
    (one,) = _launch(single, tmp_path, "single", 1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _launch(double, tmp_path, "double", 2)
    for r in two:
        assert r.returncode == 0, r.stderr[-2000:]
    assert "world 2 (gloo)" in two[0].stderr
    reference, distributed = _losses(tmp_path / "single"), _losses(tmp_path / "double")
    assert len(reference) == len(distributed) == 8
    for a, b in zip(reference, distributed, strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    s1 = json.loads((tmp_path / "single" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "double" / "summary.json").read_text())
    assert s2["world_size"] == 2 and s2["backend"] == "gloo"
    assert s2["eval_loss_after"] == pytest.approx(s1["eval_loss_after"], rel=1e-4)
    # Only rank 0 wrote the run dir: one adapter, no stray per-rank files.
    assert sorted(p.name for p in (tmp_path / "double" / "adapter").iterdir()) == sorted(
        p.name for p in (tmp_path / "single" / "adapter").iterdir())


def test_missing_peer_fails_with_a_clear_error_instead_of_hanging(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path / "lonely", distributed={"timeoutS": 10})
    path = tmp_path / "lonely.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "KUBELORA_TERMINATION_LOG": str(tmp_path / "t.log")}
    done = subprocess.run([sys.executable, "-m", "kubelora_trainer.cli", "run", str(path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "could not join the process group" in done.stderr
    assert not (tmp_path / "lonely" / "adapter").exists()


@pytest.mark.slow
def test_each_rank_converts_the_gguf_into_its_own_cache(tmp_path: Path) -> None:
    """Pods have pod-local caches: every rank converts SmolLM2's GGUF itself (regression: with a
    process group up, transformers saved the converted weights on rank 0 only)."""
    cfg = {
        "model": {"nameOrPath": "smollm2-135m", "dtype": "fp32"},
        "data": {"path": "sample://train.jsonl", "evalPath": "sample://heldout.jsonl", "maxSamples": 16,
                 "maxEvalSamples": 2, "cutoffLen": 64},
        "training": {"maxSteps": 1, "microBatchSize": 1},
        "evaluation": {"exactMatch": False, "before": False},
        "output": {"dir": str(tmp_path / "run")},
        "device": "cpu",
    }
    path = tmp_path / "gguf.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "KUBELORA_CACHE": str(tmp_path / f"cache{rank}"),
               "KUBELORA_TERMINATION_LOG": str(tmp_path / f"t{rank}.log")}
        procs.append(subprocess.Popen([sys.executable, "-m", "kubelora_trainer.cli", "run", str(path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-2000:]
    for rank in range(2):
        (converted,) = [d for d in (tmp_path / f"cache{rank}" / "models").iterdir() if d.is_dir()]
        assert (converted / "model.safetensors").is_file() and (converted / "config.json").is_file()
