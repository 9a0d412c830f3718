"""The trainer-operator contract: exit codes, env names, the exit records and the termination message.

Why one module: the operator reads what the trainer writes (exit class, termination message) and
sets what the trainer reads (env). Both sides spell each fact from here, so they cannot drift. The
operator imports this module; the trainer never imports the operator. No torch import: the
operator image has no torch.

Exit classes (most significant first, as `kubelora_trainer.launch` reduces several processes):

* 2 `EXIT_BAD_INPUT`: the input is wrong (config, data, model, run dir, or settings under which the
  training diverged to NaN); a restart cannot help.
* 143 `EXIT_PREEMPTED`: SIGTERM after a checkpoint; resume without counting a failure.
* 1 `EXIT_RETRYABLE`: anything else (crash, store unreachable); a restart from a checkpoint may help.

Why exit records: a launcher (torchrun, mpirun) turns any failed child into its own exit 1, so the
class is lost between the trainer and the pod. Each trainer process therefore writes its class and
one-line message into its own file in the directory named by `KUBELORA_EXIT_DIR` (one file per
process: several local ranks never overwrite each other), and the pod's entrypoint reads them after
the launcher returned.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_RETRYABLE = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 143
#: Reduction order of several processes' classes: the first one present wins.
EXIT_PRIORITY = (EXIT_BAD_INPUT, EXIT_PREEMPTED, EXIT_RETRYABLE)

TRAINER_MODULE = "kubelora_trainer.cli"
LAUNCH_MODULE = "kubelora_trainer.launch"

EXIT_DIR_ENV = "KUBELORA_EXIT_DIR"
"""Set by `kubelora_trainer.launch` for the launcher's children: where each process records its exit."""
TERMINATION_LOG_ENV = "KUBELORA_TERMINATION_LOG"
"""Overrides the termination-message path (tests, and hosts without /dev/termination-log)."""
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
METRICS_PORT_ENV = "KUBELORA_METRICS_PORT"
"""Port of rank 0's Prometheus endpoint (the operator scrapes it for status.progress)."""
RUN_ID_ENV = "KUBELORA_RUN_ID"
"""The resource's uid: the identity of the run (its run dir and artifact belong to it)."""

TERMINATION_MESSAGE_MAX_BYTES = 4096
"""The kubelet keeps at most 4096 bytes of a container's termination message."""


def termination_log_path() -> Path:
    """Where this container's termination message goes."""
    return Path(os.environ.get(TERMINATION_LOG_ENV, DEFAULT_TERMINATION_LOG))


def one_line(text: str) -> str:
    """A message as the termination message carries it: one line, at most the kubelet's limit."""
    line = " ".join(text.split())
    return line.encode()[:TERMINATION_MESSAGE_MAX_BYTES].decode(errors="ignore")


def write_termination_message(text: str, path: Path | None = None) -> None:
    """Write the termination message into the file the kubelet mounted, or create it where its directory
    is writable; neither: not in a pod, nothing to write. The existing file is checked on its own because
    a non-root container cannot write `/dev`, only the mounted `/dev/termination-log` in it (checking the
    directory alone loses every message on a real node: docs/benchmarks.md, "Figures behind design choices")."""
    target = path or termination_log_path()
    writable_file = target.is_file() and os.access(target, os.W_OK)
    if writable_file or (target.parent.is_dir() and os.access(target.parent, os.W_OK)):
        with contextlib.suppress(OSError):
            target.write_bytes(text.encode()[:TERMINATION_MESSAGE_MAX_BYTES])


# --------------------------------------------------------------------------- success message


#: Prometheus names of the trainer's gauges: this prefix + the ProgressState key (`kubelora_step`, ...).
METRIC_PREFIX = "kubelora_"


def success_message(
    uri: str | None, sha256: str | None, size_bytes: int | None, metrics: Mapping[str, float] | None = None
) -> str:
    """The termination message of a finished run: `{"artifact": {"uri"?, "sha256", "sizeBytes"},
    "metrics": {gauge: value}}` (the operator turns it into status.artifact and the final status.progress;
    nulls and non-finite values are left out). The final gauges travel here because a run shorter than one
    progress scrape would otherwise end with no step or loss in its status."""
    artifact: dict[str, Any] = {"sha256": sha256, "sizeBytes": size_bytes}
    if uri:
        artifact["uri"] = uri
    out: dict[str, Any] = {"artifact": artifact}
    finite = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if finite:
        out["metrics"] = finite
    return json.dumps(out, separators=(",", ":"))


def _success_json(message: str | None) -> dict[str, Any] | None:
    text = (message or "").strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("artifact"), dict):
        return None
    return data


def parse_success_message(message: str | None) -> dict[str, Any] | None:
    """status.artifact from a success message (valid fields only), or None for anything else (an error line)."""
    data = _success_json(message)
    if data is None:
        return None
    art = data["artifact"]
    out: dict[str, Any] = {}
    for key in ("uri", "sha256"):
        if isinstance(art.get(key), str) and art[key]:
            out[key] = art[key]
    size = art.get("sizeBytes")
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        out["sizeBytes"] = size
    return out


def parse_success_metrics(message: str | None) -> dict[str, float]:
    """The final gauges (`kubelora_step` -> value) of a success message; empty for anything else."""
    data = _success_json(message)
    metrics = data.get("metrics") if data else None
    if not isinstance(metrics, dict):
        return {}
    return {
        str(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


# --------------------------------------------------------------------------- exit records


@dataclass(frozen=True)
class ExitRecord:
    """One trainer process's exit class and one-line message."""

    code: int
    message: str


def write_exit_record(code: int, message: str, directory: Path) -> None:
    """Record this process's exit in its own file (by pid), atomically (written aside, then renamed)."""
    directory.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"code": code, "message": message})
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(body)
        os.replace(tmp, directory / f"exit-{os.getpid()}.json")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_exit_records(directory: Path) -> list[ExitRecord]:
    """Every complete record in `directory`, oldest first (the first failure usually explains the rest)."""
    files = sorted(directory.glob("exit-*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    out: list[ExitRecord] = []
    for path in files:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(path.read_text())
            out.append(ExitRecord(int(data["code"]), str(data.get("message") or "")))
    return out


def record_exit(code: int, message: str, termination_log: Path | None = None) -> None:
    """Report this process's exit: an exit record under a launcher wrapper, else the termination message.

    Under the wrapper only the wrapper writes the termination message: several ranks writing one file
    would leave whichever came last, not the one that explains the failure."""
    directory = os.environ.get(EXIT_DIR_ENV)
    if directory:
        with contextlib.suppress(OSError):
            write_exit_record(code, message, Path(directory))
        return
    write_termination_message(message, termination_log)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks: the digest `status.artifact.sha256` and the manifest carry,
    which the operator's client checks a download against."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
