"""Two real processes over gloo on 127.0.0.1 train like one process with twice the batch.

The processes get the env that the operator's planning renders for each worker pod of a LoRAFineTune
(operator_env.py: operator placement + plan, mount paths and worker 0's DNS name mapped to this machine).
"""

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
from .operator_env import launch, plan_workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def _spec(tiny_model_dir: Path, workers: int, micro_batch: int) -> dict:
    """A LoRAFineTune spec: the trainer sections of tiny_config plus the operator's own fields."""
    cfg = tiny_config(tiny_model_dir, Path("unused"), training={"maxSteps": 8, "microBatchSize": micro_batch},
                      evaluation={"exactMatch": False}, lora={"dropout": 0.0})
    del cfg["output"], cfg["device"]
    return {**cfg, "device": "cpu", "workers": workers, "resources": {"cpu": "1", "memory": "2Gi"},
            "output": {"pvc": {"claimName": "runs"}}}


def test_two_ranks_match_one_rank_with_double_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    """2 workers x micro batch 2 == 1 worker x micro batch 4, each process started with exactly the env
    that the operator's planning gives its pod (tests/trainer/operator_env.py), not a hand-made one."""
    single = plan_workers(_spec(tiny_model_dir, 1, 4), tmp_path / "single", name="single")
    double = plan_workers(_spec(tiny_model_dir, 2, 2), tmp_path / "double", name="double")

    # The operator's wiring, as planned: one rank per pod, worker 0's DNS name as rendezvous, and the
    # pod command's torchrun flags agreeing with the env.
    assert [(w.env["RANK"], w.env["WORLD_SIZE"], w.env["LOCAL_RANK"]) for w in double] == [("0", "2", "0"),
                                                                                          ("1", "2", "0")]
    planned_addr = {v["value"] for w in double for v in w.pod["spec"]["containers"][0]["env"]
                    if v["name"] == "MASTER_ADDR"}
    assert planned_addr == {"double-worker-0.double-workers.team-a.svc"}
    for w in double:
        flags = dict(zip(w.torchrun[1::2], w.torchrun[2::2], strict=False))  # after "torchrun"
        assert flags["--node-rank"] == w.env["RANK"] and flags["--nnodes"] == "2"
        assert flags["--master-port"] == w.env["MASTER_PORT"] == double[0].env["MASTER_PORT"]
        assert w.env["OMP_NUM_THREADS"] == "1" and w.env["KUBELORA_CACHE"].startswith(str(tmp_path / "double"))
    assert single[0].env["WORLD_SIZE"] == "1" and single[0].env["MASTER_ADDR"] == "127.0.0.1"

    (one,) = launch(single)
    assert one.returncode == 0, one.stderr[-2000:]
    two = launch(double)
    for r in two:
        assert r.returncode == 0, r.stderr[-2000:]
    assert "world 2 (gloo)" in two[0].stderr
    run1, run2 = tmp_path / "single" / "output", tmp_path / "double" / "output"
    reference, distributed = _losses(run1), _losses(run2)
    assert len(reference) == len(distributed) == 8
    for a, b in zip(reference, distributed, strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    s1 = json.loads((run1 / "summary.json").read_text())
    s2 = json.loads((run2 / "summary.json").read_text())
    assert s1["world_size"] == 1 and s2["world_size"] == 2 and s2["backend"] == "gloo"
    assert s2["run_id"] == "uid-double"  # KUBELORA_RUN_ID from the plan
    assert s2["eval_loss_after"] == pytest.approx(s1["eval_loss_after"], rel=1e-4)
    # Only rank 0 wrote the run dir: one adapter, no stray per-rank files.
    assert sorted(p.name for p in (run2 / "adapter").iterdir()) == sorted(p.name for p in (run1 / "adapter").iterdir())
    assert json.loads((tmp_path / "double" / "pod-0" / "termination-log").read_text())["artifact"]["sha256"] == (
        s2["adapter"]["sha256"])


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
    process group up, transformers saved the converted weights on rank 0 only). Env from the operator's
    plan: KUBELORA_CACHE is each pod's own /cache emptyDir."""
    spec = {
        "device": "cpu", "workers": 2, "resources": {"cpu": "1", "memory": "2Gi"},
        "model": {"nameOrPath": "smollm2-135m", "dtype": "fp32"},
        "data": {"path": "sample://train.jsonl", "evalPath": "sample://heldout.jsonl", "maxSamples": 16,
                 "maxEvalSamples": 2, "cutoffLen": 64},
        "training": {"maxSteps": 1, "microBatchSize": 1},
        "evaluation": {"exactMatch": False, "before": False},
        "output": {"pvc": {"claimName": "runs"}},
    }
    workers = plan_workers(spec, tmp_path, name="gguf")
    for r in launch(workers, timeout=900):
        assert r.returncode == 0, r.stderr[-2000:]
    for w in workers:
        (converted,) = [d for d in (Path(w.env["KUBELORA_CACHE"]) / "models").iterdir() if d.is_dir()]
        assert (converted / "model.safetensors").is_file() and (converted / "config.json").is_file()


def test_two_ranks_with_compiled_layers_match_one_rank(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`compileLayers` (on by default for long bf16 runs, several processes included) inside DDP: each
    rank's compiled layers and DDP's gradient hooks give the one-process curve."""

    def spec(workers: int, micro_batch: int) -> dict:
        s = _spec(tiny_model_dir, workers, micro_batch)
        s["training"].update(compileLayers=True, maxSteps=4)
        return s

    (one,) = launch(plan_workers(spec(1, 4), tmp_path / "single", name="single"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = launch(plan_workers(spec(2, 2), tmp_path / "double", name="double"))
    for r in two:
        assert r.returncode == 0, r.stderr[-2000:]
    assert "regional compilation on" in two[0].stderr and "world 2 (gloo)" in two[0].stderr
    reference, distributed = _losses(tmp_path / "single" / "output"), _losses(tmp_path / "double" / "output")
    assert len(reference) == len(distributed) == 4
    for a, b in zip(reference, distributed, strict=True):
        assert b == pytest.approx(a, rel=1e-4)
