"""`python -m kubelora_trainer.launch -- COMMAND...`: run a launcher, exit with the trainer's exit class.

Why: torchrun turns a child's exit 2 (bad input) or 143 (preempted) into its own exit 1 (mpirun
does the same in its way), so without this the operator would retry bad input as a crash and count a
preemption as a failure. The pods run `exec python -m kubelora_trainer.launch -- torchrun ...` (or
`-- mpirun ...`, or the trainer CLI itself): this wrapper gives the trainer processes a directory
for their exit records (`contract.EXIT_DIR_ENV`), runs COMMAND, forwards SIGTERM/SIGINT to it (the
launcher passes them on and the trainer checkpoints), and then exits with the most significant
recorded class (2 over 143 over 1) and writes the container's termination message from that
record's one-line message. The class and message of each process are in `contract`.

Limit (mpirun): ranks on other pods record into their own pod's filesystem, which worker 0 cannot
read; worker 0's local ranks (rank 0 among them) are what the operator sees, and bad input is found
by every rank alike.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from .contract import (
    EXIT_BAD_INPUT,
    EXIT_DIR_ENV,
    EXIT_OK,
    EXIT_PRIORITY,
    EXIT_RETRYABLE,
    ExitRecord,
    one_line,
    read_exit_records,
    write_termination_message,
)

USAGE = "usage: python -m kubelora_trainer.launch -- COMMAND [ARG...]"
FORWARDED = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Outcome:
    """What the pod reports: its exit code and termination message."""

    code: int
    message: str


def outcome(launcher: str, returncode: int, records: Sequence[ExitRecord]) -> Outcome:
    """The pod's exit from the launcher's return code and the processes' records (oldest first).

    A successful launcher passes rank 0's success message on. A failed one reports the most
    significant recorded class with its message; a failure that no process recorded (a process
    killed by a signal, e.g. the OOM killer) is retryable and says so.
    """
    if returncode == 0:
        return Outcome(EXIT_OK, next((r.message for r in records if r.code == EXIT_OK and r.message), ""))
    for code in EXIT_PRIORITY:
        found = next((r for r in records if r.code == code), None)
        if found is not None:
            return Outcome(code, found.message)
    other = next((r for r in records if r.code != EXIT_OK), None)
    if other is not None:
        return Outcome(EXIT_RETRYABLE, other.message)
    how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited with code {returncode}"
    return Outcome(
        EXIT_RETRYABLE,
        f"{launcher} {how} and no trainer process recorded an error (a process killed by a signal, "
        "e.g. out of memory?); see the worker's log",
    )


@contextmanager
def _forwarding(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """Pass SIGTERM/SIGINT on to the launcher while it runs (the pod's SIGTERM reaches only PID 1)."""

    def forward(signum: int, _frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(command: Sequence[str]) -> Outcome:
    """Run `command` with an exit-record directory; reduce what its processes recorded."""
    with tempfile.TemporaryDirectory(prefix="kubelora-exit-") as tmp:
        try:
            proc = subprocess.Popen(list(command), env={**os.environ, EXIT_DIR_ENV: tmp})
        except OSError as err:
            return Outcome(EXIT_RETRYABLE, f"cannot start {command[0]}: {err}")
        with _forwarding(proc):
            returncode = proc.wait()
        return outcome(command[0], returncode, read_exit_records(Path(tmp)))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--":
        print(f"kubelora-launch: error: {USAGE}", file=sys.stderr)
        return EXIT_BAD_INPUT
    result = run(args[1:])
    message = one_line(result.message)
    if result.code != EXIT_OK:
        print(f"kubelora-launch: exit {result.code}: {message}", file=sys.stderr, flush=True)
    write_termination_message(message)
    return result.code


if __name__ == "__main__":
    sys.exit(main())
