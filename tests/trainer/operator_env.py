"""Worker processes wired exactly as the operator wires its pods, on 127.0.0.1.

Why: a multi-worker job breaks silently where the operator's env and the trainer's reading of it
disagree (a wrong WORLD_SIZE hangs at the first collective). Tests that build RANK/WORLD_SIZE by hand
prove the trainer, not that pairing. Here a LoRAFineTune goes through the operator's own placement
(`decide_placement`, on fake AMX nodes) and planning (`plan`, which calls `wiring.worker_env`), and each
planned pod's env and ConfigMap become one local trainer process:

* mount paths (/etc/kubelora, /output, /cache, /tmp, /dev/shm) map to directories under `root`, per
  pod where the volume is per pod (emptyDir), in env values and in the config text, as the e2e node
  agent does;
* worker 0's DNS name (MASTER_ADDR, `<name>-worker-0.<name>-workers.<ns>.svc`) maps to 127.0.0.1;
  master and metrics ports are free ports given to the operator's settings;
* the process env is that env plus PATH and the offline switches of the hub libraries, nothing of the
  test process (no stray RANK or MASTER_PORT can leak in).

The trainer never imports the operator; only this test helper imports both.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubelora_operator.api import LoRAFineTuneResource
from kubelora_operator.names import CACHE_DIR, CONFIG_DIR, CONFIG_FILE, OUTPUT_DIR, SHM_DIR, TMP_DIR
from kubelora_operator.placement import decide_placement
from kubelora_operator.plan import CONFIG_KEY, plan
from kubelora_operator.settings import OperatorSettings

from tests.operator import amx_node
from tests.s3server import free_port

NAMESPACE = "team-a"


@dataclass
class PlannedWorker:
    index: int
    env: dict[str, str]  # the pod's env, mapped to this machine
    argv: list[str]  # the trainer CLI on the pod's config file
    pod: dict[str, Any]  # the planned Pod manifest, as the operator would create it
    torchrun: list[str]  # the pod command's torchrun argv, "torchrun" first (what the launch wrapper runs)


def plan_workers(
    spec: dict[str, Any], root: Path, name: str = "dist", run_dir: Path | None = None
) -> list[PlannedWorker]:
    """Plan `spec` (a LoRAFineTune spec) with the operator and map each worker pod to this machine
    (pod dirs under `root`; the run dir, /output, at `run_dir` or root/output)."""
    resource = LoRAFineTuneResource.from_body(
        {"metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}", "generation": 1}, "spec": spec}
    )
    settings = OperatorSettings(master_port=free_port(), metrics_port=free_port())
    nodes = [amx_node(f"amx-{i}") for i in range(resource.spec.workers)]
    decision = decide_placement(resource.spec, nodes, settings)
    assert decision.ok, decision.reason
    planned = plan(resource, decision, settings)

    run_dir, config_dir = run_dir or root / "output", root / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    workers = []
    for index, pod in enumerate(planned.pods):
        pod_dir = root / f"pod-{index}"
        mounts = {
            CONFIG_DIR: config_dir,
            OUTPUT_DIR: run_dir,  # one run dir, as on the RWX claim of a multi-worker job
            CACHE_DIR: pod_dir / "cache",  # emptyDir: each pod converts/caches for itself
            TMP_DIR: pod_dir / "tmp",
            SHM_DIR: pod_dir / "shm",
        }
        for local in mounts.values():
            local.mkdir(parents=True, exist_ok=True)
        container = pod["spec"]["containers"][0]
        assert {m["mountPath"] for m in container["volumeMounts"]} <= set(mounts), container["volumeMounts"]
        env: dict[str, str] = {}
        for var in container["env"]:
            assert "value" in var, f"{var['name']}: only plain values are mapped here ({var})"
            env[var["name"]] = _map(var["value"], mounts)
        if ".svc" in env["MASTER_ADDR"]:
            env["MASTER_ADDR"] = "127.0.0.1"
        env["KUBELORA_TERMINATION_LOG"] = str(pod_dir / "termination-log")  # the kubelet's terminationMessagePath
        script = shlex.split(container["command"][-1].splitlines()[-1])
        assert script[:6] == ["exec", "python", "-m", "kubelora_trainer.launch", "--", "torchrun"], script
        workers.append(
            PlannedWorker(index, env, [sys.executable, "-m", "kubelora_trainer.cli", "run", _map(CONFIG_FILE, mounts)],
                          pod, script[5:])
        )
    (config_dir / CONFIG_KEY).write_text(_map_text(planned.config_map["data"][CONFIG_KEY], run_dir))
    return workers


def _map(value: str, mounts: dict[str, Path]) -> str:
    for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if value == mount or value.startswith(mount + "/"):
            return str(local) + value[len(mount):]
    return value


def _map_text(text: str, run_dir: Path) -> str:
    """The config names the run dir /output (the only pod path in a trainer config)."""
    cfg = yaml.safe_load(text)
    assert cfg["output"]["dir"] == OUTPUT_DIR, cfg["output"]
    cfg["output"]["dir"] = str(run_dir)
    return yaml.safe_dump(cfg, sort_keys=False)


def process_env(worker: PlannedWorker) -> dict[str, str]:
    """The pod's env plus what an image provides (PATH) and the offline switches; nothing else."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return {**base, **worker.env}


def launch(workers: list[PlannedWorker], timeout: float = 600) -> list[subprocess.CompletedProcess[str]]:
    """Start every worker's trainer process at once; wait for all of them."""
    procs = [
        subprocess.Popen(w.argv, env=process_env(w), cwd=w.env["HOME"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for w in workers
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results
