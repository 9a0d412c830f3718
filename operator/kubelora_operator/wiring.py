"""Wiring: how N worker pods find each other and become one torch.distributed job.

Why pure builders: names, ranks, env and command lines are where multi-node jobs silently break
(a wrong WORLD_SIZE hangs at the first collective), so each piece is a small function with a test.

Naming and DNS: worker i is the pod `<name>-worker-<i>` with `hostname: <name>-worker-<i>` and
`subdomain: <name>-workers`, the headless Service (publishNotReadyAddresses, so names resolve before
readiness) giving it the stable name `<name>-worker-<i>.<name>-workers.<namespace>.svc`.
MASTER_ADDR is worker 0's name (loopback when there is only one worker: no DNS dependency).

Launchers (each behind the trainer's wrapper `python -m kubelora_trainer.launch -- LAUNCHER ...`,
which carries the trainer's exit class and one-line message through the launcher; see
kubelora_trainer.contract):

* `torchrun` (default, fully supported): every worker runs
  `torchrun --nnodes N --nproc-per-node P --node-rank i --master-addr <worker-0> --master-port 29500
  -m kubelora_trainer.cli run /etc/kubelora/config.yaml` (static rendezvous on worker 0's TCPStore, no
  SSH, no extra daemons). Workers first wait (bounded) until worker 0's DNS name resolves.
* `mpirun` (opt-in, Intel MPI Hydra, MPI Operator's design): without SSH, Hydra cannot start remote
  proxies, and the alternatives (PMIx servers, `-bootstrap` plugins) need a resource manager that
  Kubernetes is not. So every worker runs a non-root sshd on port 2222 (host and client key from a
  kubernetes.io/ssh-auth Secret mounted at /etc/kubelora-ssh); workers 1..N-1 only run sshd, worker 0
  starts its own sshd, waits until every peer's sshd accepts connections, and runs
  `mpirun -n N*P -ppn P -f /etc/kubelora/hostfile python -m kubelora_trainer.cli run ...` with each
  process deriving RANK/LOCAL_RANK/WORLD_SIZE from PMI. The job is done when worker 0 exits; the
  operator then deletes the sshd workers. The image must ship Intel MPI and openssh-server.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from kubelora_trainer.contract import LAUNCH_MODULE, METRICS_PORT_ENV, TRAINER_MODULE

from .api import LoRAFineTuneSpec, S3CredentialsSecret
from .k8s_types import parse_quantity
from .names import CACHE_DIR, CONFIG_DIR, CONFIG_FILE, SSH_DIR, TMP_DIR
from .settings import OperatorSettings

HOSTFILE = f"{CONFIG_DIR}/hostfile"
WAIT_SCRIPT = f"{CONFIG_DIR}/wait-for-peers.py"
SSHD_CONFIG = f"{CONFIG_DIR}/sshd_config"
SSH_PRIVATE_KEY = f"{SSH_DIR}/ssh-privatekey"
SSH_PUBLIC_KEY = f"{SSH_DIR}/ssh-publickey"

#: Shipped in the ConfigMap (`wait-for-peers.py TIMEOUT PORT HOST...`): waits (bounded) until each
#: host resolves (PORT 0) or accepts TCP connections, then returns either way, so slow DNS never
#: becomes a silent hang: the launcher's own timeout reports it.
WAIT_FOR_PEERS_PY = (
    '"""Wait until peers resolve (port 0) or accept connections; give up after TIMEOUT seconds."""\n'
    "import socket, sys, time\n"
    "deadline = time.time() + float(sys.argv[1]); port = int(sys.argv[2])\n"
    "for host in sys.argv[3:]:\n"
    "    while time.time() < deadline:\n"
    "        try:\n"
    "            socket.create_connection((host, port), 2).close() if port else socket.getaddrinfo(host, None)\n"
    "            break\n"
    "        except OSError:\n"
    "            time.sleep(1)\n"
)

#: Per-process shell under mpirun: torch.distributed's env:// reads RANK etc., MPI provides PMI_*.
_MPI_RANK_SHIM = (
    'export RANK="${PMI_RANK:-$OMPI_COMM_WORLD_RANK}" WORLD_SIZE="${PMI_SIZE:-$OMPI_COMM_WORLD_SIZE}" '
    'LOCAL_RANK="${MPI_LOCALRANKID:-$OMPI_COMM_WORLD_LOCAL_RANK}"; exec python -m '
)


def service_name(name: str) -> str:
    """The headless Service that gives workers DNS names."""
    return f"{name}-workers"


def worker_name(name: str, index: int) -> str:
    """Pod name and hostname of worker `index` (stable across restarts)."""
    return f"{name}-worker-{index}"


def worker_host(name: str, namespace: str, index: int) -> str:
    """DNS name of worker `index` through the headless Service."""
    return f"{worker_name(name, index)}.{service_name(name)}.{namespace}.svc"


@dataclass(frozen=True)
class Topology:
    """Shape of the job: pods, processes per pod."""

    workers: int
    procs_per_worker: int

    @property
    def world_size(self) -> int:
        """Processes in total."""
        return self.workers * self.procs_per_worker


def topology(spec: LoRAFineTuneSpec, device: str) -> Topology:
    """The job's shape on the placed device."""
    return Topology(spec.workers, spec.procs_per_worker(device))


def master_addr(name: str, namespace: str, topo: Topology) -> str:
    """Worker 0's address; loopback for a single worker (no DNS needed)."""
    return "127.0.0.1" if topo.workers == 1 else worker_host(name, namespace, 0)


def hostfile(name: str, namespace: str, topo: Topology) -> str:
    """Intel MPI hostfile (`host:slots` per line) from the workers' DNS names."""
    return "".join(f"{worker_host(name, namespace, i)}:{topo.procs_per_worker}\n" for i in range(topo.workers))


def sshd_config(settings: OperatorSettings) -> str:
    """sshd configuration for non-root sshd in workers (launcher mpirun)."""
    return (
        f"Port {settings.ssh_port}\n"
        f"HostKey {SSH_PRIVATE_KEY}\n"
        f"AuthorizedKeysFile {SSH_PUBLIC_KEY}\n"
        f"PidFile {TMP_DIR}/sshd.pid\n"
        "StrictModes no\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\n"
        "UsePAM no\n"
        "PrintMotd no\n"
    )


# --------------------------------------------------------------------------- environment


def _plain(env: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": k, "value": v} for k, v in env.items()]


def rank_env(name: str, namespace: str, index: int, topo: Topology, settings: OperatorSettings) -> dict[str, str]:
    """torch.distributed wiring of worker `index` (RANK/LOCAL_RANK only when it runs one process)."""
    env = {
        "MASTER_ADDR": master_addr(name, namespace, topo),
        "MASTER_PORT": str(settings.master_port),
        "WORLD_SIZE": str(topo.world_size),
        "NNODES": str(topo.workers),
        "NODE_RANK": str(index),
        "NPROC_PER_NODE": str(topo.procs_per_worker),
    }
    if topo.procs_per_worker == 1:
        env["RANK"] = str(index)
        env["LOCAL_RANK"] = "0"
    return env


def omp_threads(spec: LoRAFineTuneSpec, topo: Topology) -> int:
    """Threads per process: the worker's CPU request split over its processes (at least 1)."""
    cores = parse_quantity(spec.resources.cpu)
    return max(1, int(cores // topo.procs_per_worker))


def thread_env(spec: LoRAFineTuneSpec, device: str, topo: Topology, settings: OperatorSettings) -> dict[str, str]:
    """OMP_NUM_THREADS matching the CPU request (both devices: host threads must not oversubscribe);
    on cpu also the settings' OpenMP tuning (KMP_BLOCKTIME, ...)."""
    env = {"OMP_NUM_THREADS": str(omp_threads(spec, topo))}
    if device == "cpu":
        env.update(settings.cpu_env)
    return env


def ccl_env(spec: LoRAFineTuneSpec, settings: OperatorSettings) -> dict[str, str]:
    """oneCCL/libfabric env: the settings' defaults, spec.distributed.cclEnv winning."""
    return {**settings.ccl_env, **spec.distributed.ccl_env}


def runtime_env(settings: OperatorSettings) -> dict[str, str]:
    """Writable homes and caches under the read-only root filesystem, and the metrics port."""
    return {
        "HOME": TMP_DIR,
        "XDG_CACHE_HOME": CACHE_DIR,
        "HF_HOME": f"{CACHE_DIR}/huggingface",
        "KUBELORA_CACHE": f"{CACHE_DIR}/kubelora",
        "MPLCONFIGDIR": f"{TMP_DIR}/matplotlib",
        "PYTHONUNBUFFERED": "1",
        METRICS_PORT_ENV: str(settings.metrics_port),
    }


def mpi_env(settings: OperatorSettings) -> dict[str, str]:
    """How Hydra reaches the workers' sshd (launcher mpirun)."""
    ssh_args = (
        f"-p {settings.ssh_port} -i {SSH_PRIVATE_KEY} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
    )
    return {
        "I_MPI_HYDRA_BOOTSTRAP": "ssh",
        "I_MPI_HYDRA_BOOTSTRAP_EXEC_EXTRA_ARGS": ssh_args,
        "I_MPI_HYDRA_HOST_FILE": HOSTFILE,
    }


def _secret_ref(var: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def s3_secret_env(cred: S3CredentialsSecret | None) -> list[dict[str, Any]]:
    """AWS_* variables from an S3 credentials Secret (output.s3 for workers, sources.s3 for the fetch pod)."""
    if cred is None:
        return []
    out = [
        _secret_ref("AWS_ACCESS_KEY_ID", cred.name, cred.access_key_id_key),
        _secret_ref("AWS_SECRET_ACCESS_KEY", cred.name, cred.secret_access_key_key),
    ]
    if cred.session_token_key:
        out.append(_secret_ref("AWS_SESSION_TOKEN", cred.name, cred.session_token_key))
    return out


def hub_token_env(spec: LoRAFineTuneSpec) -> list[dict[str, Any]]:
    """HF_TOKEN from secrets.hubTokenSecret (the workers', or the fetch pod's when it caches the hub model)."""
    hub = spec.secrets.hub_token_secret
    return [_secret_ref("HF_TOKEN", hub.name, hub.key)] if hub is not None else []


def secret_env(spec: LoRAFineTuneSpec) -> list[dict[str, Any]]:
    """Credentials, only ever as secretKeyRef (never values in manifests, ConfigMaps or status). No hub
    token when the fetch pod cached the hub model: the workers then load it offline (fetch.py)."""
    from .fetch import hub_model_source  # fetch imports this module

    out: list[dict[str, Any]] = [] if hub_model_source(spec) else hub_token_env(spec)
    s3 = spec.output.s3
    if s3 is not None:
        out += s3_secret_env(s3.credentials_secret)
    return out


def worker_env(
    name: str, namespace: str, index: int, spec: LoRAFineTuneSpec, device: str, settings: OperatorSettings
) -> list[dict[str, Any]]:
    """The complete env of worker `index`, in a stable order; spec.distributed.env comes last and wins
    (names the operator manages are rejected by validate_spec before this runs)."""
    from .fetch import worker_hub_env  # fetch imports this module

    topo = topology(spec, device)
    merged: dict[str, dict[str, Any]] = {}
    parts: list[list[dict[str, Any]]] = [
        _plain(rank_env(name, namespace, index, topo, settings)),
        _plain({**runtime_env(settings), **worker_hub_env(spec)}),
        _plain(thread_env(spec, device, topo, settings)),
        _plain(ccl_env(spec, settings)),
    ]
    if spec.distributed.launcher == "mpirun":
        parts.append(_plain(mpi_env(settings)))
    parts.append(secret_env(spec))
    parts.append([e.model_dump(by_alias=True, exclude_none=True) for e in spec.distributed.env])
    for part in parts:
        for var in part:
            merged.pop(var["name"], None)  # a later definition moves to its own position
            merged[var["name"]] = var
    return list(merged.values())


# --------------------------------------------------------------------------- commands


def _wait(hosts: list[str], port: int, settings: OperatorSettings) -> str:
    return shlex.join(["python", WAIT_SCRIPT, str(settings.dns_wait_seconds), str(port), *hosts])


def torchrun_args(name: str, namespace: str, index: int, topo: Topology, settings: OperatorSettings) -> list[str]:
    """torchrun argv of worker `index` (static rendezvous on worker 0, no restarts inside torchrun:
    the operator owns restarts so that they are counted against backoffLimit)."""
    return [
        "torchrun",
        "--nnodes",
        str(topo.workers),
        "--nproc-per-node",
        str(topo.procs_per_worker),
        "--node-rank",
        str(index),
        "--master-addr",
        master_addr(name, namespace, topo),
        "--master-port",
        str(settings.master_port),
        "--max-restarts",
        "0",
        "-m",
        TRAINER_MODULE,
        "run",
        CONFIG_FILE,
    ]


def mpirun_args(topo: Topology) -> list[str]:
    """mpirun argv of the launcher (worker 0)."""
    return [
        "mpirun",
        "-n",
        str(topo.world_size),
        "-ppn",
        str(topo.procs_per_worker),
        "-f",
        HOSTFILE,
        "sh",
        "-c",
        _MPI_RANK_SHIM + f"{TRAINER_MODULE} run {CONFIG_FILE}",
    ]


def launch(argv: list[str]) -> str:
    """`exec` of the launcher behind the trainer's exit-class wrapper (torchrun/mpirun keep only exit 1)."""
    return f"exec {shlex.join(['python', '-m', LAUNCH_MODULE, '--', *argv])}"


def worker_command(
    name: str, namespace: str, index: int, spec: LoRAFineTuneSpec, device: str, settings: OperatorSettings
) -> list[str]:
    """The container command of worker `index` (`/bin/sh -c SCRIPT`: wait for peers, then exec)."""
    topo = topology(spec, device)
    if spec.distributed.launcher == "mpirun":
        sshd = shlex.join(["/usr/sbin/sshd", "-f", SSHD_CONFIG, "-e"])
        if index != 0:
            return ["/bin/sh", "-c", f"exec {sshd} -D"]
        hosts = [worker_host(name, namespace, i) for i in range(topo.workers)]
        script = f"{sshd}\n{_wait(hosts, settings.ssh_port, settings)}\n{launch(mpirun_args(topo))}"
        return ["/bin/sh", "-c", script]
    run = launch(torchrun_args(name, namespace, index, topo, settings))
    if topo.workers == 1:
        return ["/bin/sh", "-c", run]
    wait = _wait([worker_host(name, namespace, 0)], 0, settings)
    return ["/bin/sh", "-c", f"{wait}\n{run}"]
