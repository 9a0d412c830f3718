"""Who owns a run directory, and how a run takes it, holds it and replaces a finished run in it.

Why this exists: a run directory holds one run's work (checkpoints, adapter, summary) and the
operator mounts the same claim for every attempt of a resource. Without an owner, a re-created
resource (new UID, new spec, new S3 URI) would re-deliver the old resource's adapter as its own, and
two resources pointed at one subPath would train into each other's checkpoints.

The rules (rank 0 enforces them: it is the only rank that writes the run dir, but for each rank's
torch.compile cache under ``.compile-cache/``, compile.py):

* **Owner.** ``owner.json`` records the run id (``KUBELORA_RUN_ID``, which the operator sets to the
  resource UID; a laptop run keeps a uuid in the directory across resumes) and the settings that
  define the result (`result_fields`). A run with another id never finishes, resumes or delivers
  the directory's work, *even with* ``output.overwrite``: in the operator that is another resource's
  artifact, and overwriting it would silently hand one resource's result to another. A run with the
  same id but other settings is refused unless ``output.overwrite: true`` (a laptop user re-running
  with a new learning rate).
* **Exclusive claim.** Rank 0 holds ``flock`` on ``.kubelora.lock`` for the run's whole life, so a
  second run on the directory fails at once and names the holder (pid, host, run id).
* **Pre-flight first.** Nothing is written into the directory (no owner, no config.yaml) until every
  check passed; a run that fails its checks leaves the directory as it found it (or absent).
* **Safe overwrite.** The run being replaced is moved into ``.previous/`` only once the new run has
  passed its checks, moved back if the new run fails before training, and deleted only after the new
  run wrote its summary. A crash during training leaves it in ``.previous/`` (move it back by hand).

Directories written before owner files existed are judged by ``summary.json``'s ``run_id`` (or the
old ``run_id`` file); one with neither is adopted, so an in-flight run survives the upgrade.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import contract
from .config import TrainerConfig
from .export import SUMMARY_FILE, is_finished

OWNER_FILE = "owner.json"
LOCK_FILE = ".kubelora.lock"
PREVIOUS_DIR = ".previous"
#: torch.compile's caches (compile.cache_in_run_dir): keyed by what they compiled, so a run that
#: replaces another keeps them instead of moving them into `.previous/`.
COMPILE_CACHE_DIR = ".compile-cache"
LEGACY_RUN_ID_FILE = "run_id"
#: How long an operator attempt waits for an earlier attempt of the *same* run to let go of the
#: directory (a pod on a partitioned node whose NFS lock outlives it); anything else fails at once.
SAME_RUN_WAIT_S = 120.0


class RunDirError(RuntimeError):
    """The output directory cannot be used for this run (bad input: exit 2)."""


class Verdict(enum.Enum):
    """What a run may do with the directory it was pointed at."""

    NEW = "new"  # nothing of this run's to continue: train from the start
    CONTINUE = "continue"  # this run's unfinished work: resume it
    DELIVER = "deliver"  # this run, finished, with an S3 target: only (re-)upload
    REPLACE = "replace"  # this run's id, replaced on request (output.overwrite)


@dataclass(frozen=True)
class Owner:
    """The run a directory belongs to; `fields` is None for a directory from before owner files."""

    run_id: str
    fields: dict[str, Any] | None


def run_id_for(run_dir: Path) -> str:
    """This run's id: KUBELORA_RUN_ID (the resource UID), else the directory owner's, else a new uuid.

    A new uuid is not written here: a laptop run's id reaches the directory with its owner file,
    once the pre-flight passed.
    """
    given = os.environ.get(contract.RUN_ID_ENV)
    if given:
        return given
    owner = read_owner(run_dir)
    return owner.run_id if owner is not None else uuid.uuid4().hex


def result_fields(cfg: TrainerConfig, world_size: int) -> dict[str, Any]:
    """The settings that define a run's result, as in the YAML (camelCase).

    Left out on purpose: how the work is split or watched (micro-batch split, device, logging,
    eval/save cadence, resume, compile, kernels, deepspeed), so a run may resume with another
    number of processes at the same global batch (docs/troubleshooting.md).
    """
    t = cfg.training
    hyper = t.model_dump(mode="json", by_alias=True, include={
        "epochs", "max_steps", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
        "lr_scheduler", "warmup_steps", "max_grad_norm", "seed"})
    return {
        "model": cfg.model.model_dump(mode="json", by_alias=True,
                                      include={"name_or_path", "gguf_file", "revision", "dtype", "quantization"}),
        "data": cfg.data.model_dump(mode="json", by_alias=True),
        "lora": cfg.lora.model_dump(mode="json", by_alias=True),
        "training": {**hyper, "globalBatch": t.micro_batch_size * t.gradient_accumulation_steps * world_size},
        "output": {"merge": cfg.output.merge, "s3": cfg.output.s3.uri if cfg.output.s3 else None},
    }


def _flat(fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, dict) and value and prefix.count(".") < 1:  # sections; fieldMap stays a value
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`lora.r: 4 -> 8`, one per changed setting, in a stable order."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_owner(run_dir: Path) -> Owner | None:
    """The directory's owner, or None for an empty (or pre-owner-file, id-less) directory."""
    owner = _read_json(run_dir / OWNER_FILE)
    if owner is not None and owner.get("run_id"):
        return Owner(str(owner["run_id"]), owner.get("fields"))
    summary = _read_json(run_dir / SUMMARY_FILE)
    if summary is not None and summary.get("run_id"):
        return Owner(str(summary["run_id"]), None)
    with contextlib.suppress(OSError):
        legacy = (run_dir / LEGACY_RUN_ID_FILE).read_text().strip()
        if legacy:
            return Owner(legacy, None)
    return None


def judge(run_dir: Path, run_id: str, fields: dict[str, Any], *, overwrite: bool, deliverable: bool,
          allow_changed: Collection[str] = ()) -> Verdict:
    """Decide what this run may do with `run_dir`, or refuse with one line that says the way out.

    Read-only, so every rank can judge the same shared directory. `allow_changed`
    (training.resumeAllowChanged) names settings an unfinished run may resume with changed; a
    finished run is never continued or delivered under other settings.
    """
    owner = read_owner(run_dir)
    finished = is_finished(run_dir)
    if owner is None:
        if not finished:
            return Verdict.NEW
        owner = Owner(run_id, None)  # a finished run that never recorded an id: still not overwritten unasked
    if owner.run_id != run_id:
        handover = "" if finished else f" (or only its {OWNER_FILE}, to let this run continue its checkpoints)"
        ignored = " output.overwrite does not apply: it only replaces a run with the same id." if overwrite else ""
        raise RunDirError(
            f"output dir {run_dir} belongs to run {owner.run_id} ({OWNER_FILE}), not to this run ({run_id}): a run "
            f"directory holds one run's work.{ignored} Delete the directory{handover}, or use another output.dir "
            "(on a cluster another output.pvc.subPath)"
        )
    changed = differences(owner.fields, fields) if owner.fields is not None else []
    if not finished:
        changed = [c for c in changed if c.split(":", 1)[0] not in allow_changed]
    if overwrite and (finished or changed):
        return Verdict.REPLACE
    if finished and not changed:
        if deliverable:
            return Verdict.DELIVER
        raise RunDirError(
            f"output dir {run_dir} already holds a finished adapter ({SUMMARY_FILE}); "
            "set output.overwrite: true or choose another output.dir"
        )
    if changed:
        what = "a finished" if finished else "an unfinished"
        kept = (f" (the finished run it was replacing is kept in {run_dir / PREVIOUS_DIR})"
                if is_finished(run_dir / PREVIOUS_DIR) else "")
        raise RunDirError(
            f"output dir {run_dir} holds {what} run of {run_id} with other settings ({'; '.join(changed)}){kept}: "
            "set output.overwrite: true to replace it (the old run is kept until the new one finishes), "
            f"{'' if finished else 'resume it anyway with training.resumeAllowChanged naming them, '}"
            "use another output.dir, or delete the directory"
        )
    return Verdict.CONTINUE


class RunDirClaim:
    """Rank 0's hold on a run directory: lock, owner, replacement of the previous run.

    On other ranks (`writer=False`) every method is a no-op: only rank 0 writes the run dir,
    also when all ranks share one ReadWriteMany volume.
    """

    def __init__(self, path: Path, *, writer: bool) -> None:
        self.path = path
        self.writer = writer
        self._fd: int | None = None
        self._created: Path | None = None  # the topmost directory this run created
        self._moved: list[str] = []  # names moved into .previous by this run
        self._tracked: list[str] = []  # names written before commit, removed if the run stops first
        self._committed = False

    # ------------------------------------------------------------------ the lock
    def lock(self, run_id: str, *, wait_s: float = 0.0) -> None:
        """Take the directory for this run, or fail at once naming the holder.

        `wait_s`: how long to wait when the holder is this same run id (an earlier attempt).
        """
        if not self.writer:
            return
        self._create_dir()
        deadline = time.monotonic() + wait_s
        while True:
            fd = self._try_lock()
            if fd is not None:
                break
            holder = _read_json(self.path / LOCK_FILE) or {}
            if holder.get("run_id") != run_id or time.monotonic() >= deadline:
                self._remove_created()
                who = ", ".join(f"{k} {holder[k]}" for k in ("pid", "host", "run_id", "since") if k in holder)
                raise RunDirError(
                    f"output dir {self.path} is in use by another run ({who or 'holder unknown'}): "
                    "wait for it to finish, or use another output.dir"
                )
            time.sleep(1.0)
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())

    def _create_dir(self) -> None:
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        self._created = missing[-1] if missing else None

    def _try_lock(self) -> int | None:
        """flock the lock file; None when another process holds it.

        The file is unlinked at release, so after locking check that the path still names the
        inode we locked (a releaser may have unlinked it between our open and our flock).
        """
        lock = self.path / LOCK_FILE
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a holder that had created the directory failed and removed it
                self._create_dir()
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def release(self) -> None:
        """Let go of the directory. Before `commit` (a failed pre-flight) the directory goes back to
        how it was found: the replaced run moves back, the lock file and created folders go."""
        if self._fd is None:
            return
        if not self._committed:
            for name in self._tracked:
                shutil.rmtree(self.path / name, ignore_errors=True)
            self._restore()
        with contextlib.suppress(FileNotFoundError):
            (self.path / LOCK_FILE).unlink()
        os.close(self._fd)  # unlink first: a waiter that opened the old file re-checks the inode
        self._fd = None
        if not self._committed:
            self._remove_created()

    def _remove_created(self) -> None:
        if self._created is None:
            return
        with contextlib.suppress(OSError):  # not empty: something else lives there now; leave it
            for d in (self.path, *self.path.parents):
                d.rmdir()
                if d == self._created:
                    break
        self._created = None

    # ------------------------------------------------------------------ replacing a run
    def set_aside(self) -> None:
        """Move the run being replaced into `.previous/` (kept until the new run wrote its summary).

        When `.previous/` already holds a finished run and the directory only an unfinished one
        (an earlier replacement that crashed), the finished one is kept and the unfinished work
        discarded: output.overwrite asked to replace it.
        """
        if not self.writer:
            return
        previous = self.path / PREVIOUS_DIR
        current = [p for p in self.path.iterdir() if p.name not in (LOCK_FILE, PREVIOUS_DIR, COMPILE_CACHE_DIR)]
        if is_finished(previous) and not is_finished(self.path):
            for p in current:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            return
        shutil.rmtree(previous, ignore_errors=True)
        previous.mkdir()
        for p in current:
            os.replace(p, previous / p.name)
            self._moved.append(p.name)

    def _restore(self) -> None:
        previous = self.path / PREVIOUS_DIR
        for name in self._moved:
            os.replace(previous / name, self.path / name)
        if self._moved:
            shutil.rmtree(previous, ignore_errors=True)
        self._moved = []

    def track(self, name: str) -> None:
        """`name` is about to be written before `commit`: remove it if the run stops before that,
        unless it was there already (a resumed run's own file)."""
        if self.writer and not (self.path / name).exists():
            self._tracked.append(name)

    def commit(self, run_id: str, fields: dict[str, Any], config_yaml: str) -> None:
        """The pre-flight passed and training starts: record the owner and the config."""
        if not self.writer:
            return
        owner = {"run_id": run_id, "fields": fields,
                 "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _write_atomic(self.path / OWNER_FILE, json.dumps(owner, indent=2) + "\n")
        _write_atomic(self.path / "config.yaml", config_yaml)
        self._committed = True

    def finish(self) -> None:
        """The new run's summary is written: the run it replaced can go."""
        if self.writer:
            shutil.rmtree(self.path / PREVIOUS_DIR, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
