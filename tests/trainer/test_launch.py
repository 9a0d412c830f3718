"""The pods' launcher wrapper (`kubelora_trainer.launch`) around a real torchrun: exit classes survive.

cffc930: the pods ran `exec torchrun ...`, and torchrun exits 1 for any failed child, so bad input
(2) was retried as a crash and a preemption (143) counted as a failure. Here tiny children record
their exit the way the trainer CLI does (`contract.record_exit`) under real torchrun processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubelora_trainer.contract import (
    EXIT_BAD_INPUT,
    EXIT_DIR_ENV,
    EXIT_PREEMPTED,
    EXIT_RETRYABLE,
    TERMINATION_LOG_ENV,
    ExitRecord,
    read_exit_records,
    record_exit,
    success_message,
)
from kubelora_trainer.launch import outcome

from tests.s3server import free_port

TORCHRUN = str(Path(sys.executable).parent / "torchrun")

#: A trainer stand-in: rank R exits with CODES[R] after recording it with MESSAGE (or is killed by
#: SIGKILL for "kill"; "term" waits for SIGTERM and exits 143, as the trainer does after a checkpoint).
CHILD = """
import os, signal, sys, time
from kubelora_trainer.contract import record_exit
rank = int(os.environ.get("RANK", "0"))
what = sys.argv[1 + rank]
if what == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if what == "term":
    def stop(*_):
        record_exit(143, f"rank {rank}: preempted by SIGTERM after a checkpoint at step 3")
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    open(os.path.join(os.environ["READY_DIR"], str(rank)), "w").close()
    time.sleep(120)
code = int(what)
time.sleep(0.2 * rank)  # rank order = record order
record_exit(code, f"rank {rank}: " + ('{"artifact":{"sha256":"ab","sizeBytes":1}}' if code == 0 else f"error {code}"))
sys.exit(code)
"""


def _wrapped(tmp: Path, *codes: str) -> list[str]:
    child = tmp / "child.py"
    child.write_text(CHILD)
    torchrun = [TORCHRUN, "--nnodes", "1", "--nproc-per-node", str(len(codes)), "--max-restarts", "0",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(child), *codes]
    return [sys.executable, "-m", "kubelora_trainer.launch", "--", *torchrun]


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBELORA_")}
    return {**env, TERMINATION_LOG_ENV: str(tmp / "termination-log"), "READY_DIR": str(tmp)}


@pytest.mark.parametrize(
    ("codes", "rc", "message"),
    [
        (("0", "2"), EXIT_BAD_INPUT, "rank 1: error 2"),
        (("2", "2"), EXIT_BAD_INPUT, "rank 0: error 2"),  # torchrun stops rank 1 once rank 0 failed
        (("143", "1"), EXIT_PREEMPTED, "rank 0: error 143"),
        (("0", "1"), EXIT_RETRYABLE, "rank 1: error 1"),
        (("0", "0"), 0, 'rank 0: {"artifact":{"sha256":"ab","sizeBytes":1}}'),
    ],
)
def test_torchrun_children_exit_class_survives_the_wrapper(tmp_path: Path, codes: tuple[str, ...], rc: int,
                                                             message: str) -> None:
    bare = subprocess.run(_wrapped(tmp_path, *codes)[4:], env=_env(tmp_path), capture_output=True, timeout=120)
    assert bare.returncode == (0 if rc == 0 else 1)  # torchrun alone: the class is lost
    done = subprocess.run(_wrapped(tmp_path, *codes), env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == rc, done.stderr[-3000:]
    assert (tmp_path / "termination-log").read_text() == message


def test_a_child_killed_without_a_record_is_retryable_and_says_so(tmp_path: Path) -> None:
    done = subprocess.run(_wrapped(tmp_path, "kill"), env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_RETRYABLE, done.stderr[-3000:]
    said = (tmp_path / "termination-log").read_text()
    assert "no trainer process recorded an error" in said and "torchrun exited with code 1" in said


def test_sigterm_reaches_the_trainer_through_torchrun_and_exits_143(tmp_path: Path) -> None:
    """Only PID 1 (the wrapper) gets the pod's SIGTERM: it forwards it, torchrun passes it on."""
    proc = subprocess.Popen(_wrapped(tmp_path, "term", "term"), env=_env(tmp_path), stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 90
    while not ((tmp_path / "0").exists() and (tmp_path / "1").exists()):
        assert time.monotonic() < deadline and proc.poll() is None, "children did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to the wrapper alone, as the container runtime does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "preempted by SIGTERM" in (tmp_path / "termination-log").read_text()


def test_outcome_order_and_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = [ExitRecord(1, "crash"), ExitRecord(143, "preempted"), ExitRecord(2, "bad")]
    assert outcome("torchrun", 1, recs) == outcome("torchrun", 1, recs[::-1])
    assert outcome("torchrun", 1, recs).code == EXIT_BAD_INPUT
    assert outcome("mpirun", 1, [ExitRecord(7, "odd")]).code == EXIT_RETRYABLE
    assert "killed by signal 9" in outcome("mpirun", -9, []).message
    # Each process its own file: two records from one directory, none overwritten.
    monkeypatch.setenv(EXIT_DIR_ENV, str(tmp_path / "exits"))
    record_exit(0, success_message(None, "ab", 1))
    subprocess.run([sys.executable, "-c", "from kubelora_trainer.contract import record_exit; record_exit(2, 'x')"],
                   env={**os.environ}, check=True)
    assert sorted(r.code for r in read_exit_records(tmp_path / "exits")) == [0, 2]


def test_termination_message_reaches_the_mounted_file_in_an_unwritable_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a non-root pod `/dev` is not writable but the kubelet's `/dev/termination-log` is. Found on the
    real node (tests/realnode/e2e.py): checking only the directory wrote nothing. Root may write any
    directory, so the non-root view is given through os.access."""
    from kubelora_trainer.contract import write_termination_message

    log_dir = tmp_path / "dev"
    log_dir.mkdir()
    mounted = log_dir / "termination-log"
    mounted.write_text("")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == log_dir else real_access(p, mode))
    write_termination_message('{"artifact": {}}', mounted)
    assert mounted.read_text() == '{"artifact": {}}'
    write_termination_message("x", log_dir / "absent")  # neither a file nor a writable directory: nothing
    assert not (log_dir / "absent").exists()
