"""Env, names and command lines that make N pods one distributed job."""

from __future__ import annotations

from kubelora_operator.api import parse_spec
from kubelora_operator.wiring import (
    Topology,
    ccl_env,
    hostfile,
    master_addr,
    mpirun_args,
    omp_threads,
    rank_env,
    secret_env,
    sshd_config,
    torchrun_args,
    worker_command,
    worker_env,
    worker_host,
)

from . import SETTINGS, raw_spec


def test_names() -> None:
    assert worker_host("ft", "ns", 2) == "ft-worker-2.ft-workers.ns.svc"
    assert master_addr("ft", "ns", Topology(3, 1)) == "ft-worker-0.ft-workers.ns.svc"
    assert master_addr("ft", "ns", Topology(1, 4)) == "127.0.0.1"


def test_rank_env_single_process_workers() -> None:
    env = rank_env("ft", "ns", 2, Topology(3, 1), SETTINGS)
    assert env == {
        "MASTER_ADDR": "ft-worker-0.ft-workers.ns.svc",
        "MASTER_PORT": "29500",
        "WORLD_SIZE": "3",
        "NNODES": "3",
        "NODE_RANK": "2",
        "NPROC_PER_NODE": "1",
        "RANK": "2",
        "LOCAL_RANK": "0",
    }


def test_rank_env_multi_process_workers_leave_rank_to_torchrun() -> None:
    env = rank_env("ft", "ns", 1, Topology(2, 4), SETTINGS)
    assert env["WORLD_SIZE"] == "8" and env["NPROC_PER_NODE"] == "4" and env["NODE_RANK"] == "1"
    assert "RANK" not in env and "LOCAL_RANK" not in env


def test_threads_follow_the_cpu_request() -> None:
    assert omp_threads(parse_spec(raw_spec(resources={"cpu": "16"})), Topology(1, 4)) == 4
    assert omp_threads(parse_spec(raw_spec(resources={"cpu": "500m"})), Topology(1, 1)) == 1
    assert omp_threads(parse_spec(raw_spec(resources={"cpu": "7"})), Topology(1, 2)) == 3


def test_ccl_env_spec_overrides_defaults() -> None:
    env = ccl_env(
        parse_spec(raw_spec(distributed={"cclEnv": {"FI_PROVIDER": "psm3", "CCL_KVS_MODE": "pmi"}})), SETTINGS
    )
    assert env["FI_PROVIDER"] == "psm3" and env["CCL_KVS_MODE"] == "pmi"
    assert (
        env["CCL_ATL_TRANSPORT"] == "ofi" and env["CCL_WORKER_COUNT"] == "1" and env["CCL_ZE_IPC_EXCHANGE"] == "sockets"
    )


def test_secrets_only_as_secret_key_refs() -> None:
    spec = parse_spec(
        raw_spec(
            output={
                "pvc": None,
                "s3": {"uri": "s3://b/p", "credentialsSecret": {"name": "s3c", "sessionTokenKey": "tok"}},
            },
            secrets={"hubTokenSecret": {"name": "hf", "key": "token"}},
        )
    )
    assert secret_env(spec) == [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3c", "key": "AWS_ACCESS_KEY_ID"}}},
        {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": "s3c", "key": "AWS_SECRET_ACCESS_KEY"}},
        },
        {"name": "AWS_SESSION_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s3c", "key": "tok"}}},
    ]


def test_worker_env_is_unique_and_spec_env_wins() -> None:
    spec = parse_spec(
        raw_spec(
            distributed={"env": [{"name": "OMP_NUM_THREADS", "value": "2"}, {"name": "WANDB_MODE", "value": "offline"}]}
        )
    )
    env = worker_env("ft", "ns", 0, spec, "cpu", SETTINGS)
    names = [e["name"] for e in env]
    assert len(names) == len(set(names))
    assert names[-2:] == ["OMP_NUM_THREADS", "WANDB_MODE"] and env[-2]["value"] == "2"
    assert {"HOME", "HF_HOME", "KUBELORA_CACHE", "KUBELORA_METRICS_PORT", "KMP_BLOCKTIME"} <= set(names)
    assert "KMP_BLOCKTIME" not in [e["name"] for e in worker_env("ft", "ns", 0, spec, "xpu", SETTINGS)]


def test_torchrun_command_line() -> None:
    args = torchrun_args("ft", "ns", 1, Topology(2, 4), SETTINGS)
    assert args == [
        "torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--node-rank", "1",
        "--master-addr", "ft-worker-0.ft-workers.ns.svc", "--master-port", "29500", "--max-restarts", "0",
        "-m", "kubelora_trainer.cli", "run", "/etc/kubelora/config.yaml",
    ]  # fmt: skip


def test_torchrun_worker_waits_for_worker_zero_dns_only_when_multi_node() -> None:
    one = parse_spec(raw_spec())
    (sh, c, script) = worker_command("ft", "ns", 0, one, "cpu", SETTINGS)
    assert (sh, c) == ("/bin/sh", "-c") and script.startswith("exec python -m kubelora_trainer.launch -- torchrun --nnodes 1")
    two = parse_spec(raw_spec(workers=2))
    script = worker_command("ft", "ns", 1, two, "cpu", SETTINGS)[2]
    wait, run = script.split("\n")
    assert wait == "python /etc/kubelora/wait-for-peers.py 300 0 ft-worker-0.ft-workers.ns.svc"
    assert run.startswith("exec python -m kubelora_trainer.launch -- torchrun --nnodes 2 --nproc-per-node 1 --node-rank 1")


def test_mpirun_design() -> None:
    spec = parse_spec(raw_spec(workers=3, device="xpu", resources={"gpus": 2}, distributed={"launcher": "mpirun"}))
    topo = Topology(3, 2)
    assert hostfile("ft", "ns", topo) == "".join(f"ft-worker-{i}.ft-workers.ns.svc:2\n" for i in range(3))
    assert mpirun_args(topo)[:7] == ["mpirun", "-n", "6", "-ppn", "2", "-f", "/etc/kubelora/hostfile"]
    assert 'RANK="${PMI_RANK' in mpirun_args(topo)[-1]
    launcher = worker_command("ft", "ns", 0, spec, "xpu", SETTINGS)[2].split("\n")
    assert launcher[0] == "/usr/sbin/sshd -f /etc/kubelora/sshd_config -e"
    assert launcher[1].startswith("python /etc/kubelora/wait-for-peers.py 300 2222 ft-worker-0.")
    assert launcher[2].startswith("exec python -m kubelora_trainer.launch -- mpirun -n 6 -ppn 2")
    assert (
        worker_command("ft", "ns", 2, spec, "xpu", SETTINGS)[2]
        == "exec /usr/sbin/sshd -f /etc/kubelora/sshd_config -e -D"
    )
    env = {e["name"]: e.get("value") for e in worker_env("ft", "ns", 0, spec, "xpu", SETTINGS)}
    assert env["I_MPI_HYDRA_BOOTSTRAP"] == "ssh" and "-p 2222" in env["I_MPI_HYDRA_BOOTSTRAP_EXEC_EXTRA_ARGS"]
    assert "Port 2222" in sshd_config(SETTINGS) and "PasswordAuthentication no" in sshd_config(SETTINGS)
