"""A base model that cannot be loaded is bad input: one line, exit 2, at once (the real CLI, in a subprocess).

The hub is played by a local HTTP server (HF_ENDPOINT) that answers as huggingface.co does (status
plus X-Error-Code headers), or by a closed port for an unreachable hub; nothing here needs a network.
Before the fix an unreachable hub cost ~50 s of download retries and ended in two tracebacks, exit 1.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .conftest import tiny_config

CLI = Path(sys.executable).parent / "kubelora-train"
#: Far below transformers' retry loop (~50 s), far above a slow CI start of torch (~5-10 s).
FAST_S = 20.0

# repo id -> (status, headers, body) as the hub's /api/models/<id> answers it.
HUB_ANSWERS: dict[str, tuple[int, dict[str, str], dict]] = {
    "org/missing": (401, {"X-Error-Code": "RepoNotFound"}, {"error": "Repository not found"}),
    "org/gated": (403, {"X-Error-Code": "GatedRepo"}, {"error": "Access to model org/gated is restricted"}),
    "org/badtoken": (401, {"X-Error-Message": "Invalid credentials in Authorization header"}, {"error": "bad"}),
    "org/ggufonly": (200, {}, {"id": "org/ggufonly", "siblings": [{"rfilename": "model.Q4_0.gguf"}]}),
}


class _FakeHub(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        repo = "/".join(self.path.split("?")[0].removeprefix("/api/models/").split("/")[:2])
        status, headers, body = HUB_ANSWERS.get(repo, (500, {}, {"error": "unexpected request"}))
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {**headers, "Content-Type": "application/json"}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def fake_hub() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _run_cli(name: str, tiny_model_dir: Path, tmp_path: Path, env: dict[str, str],
             **sections: dict) -> tuple[int, str, float]:
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", **sections)
    cfg["model"]["nameOrPath"] = name
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    full_env.update({"HF_HUB_CACHE": str(tmp_path / "hub-cache"), "KUBELORA_TERMINATION_LOG": str(tmp_path / "tl"),
                     **env})
    t0 = time.monotonic()
    proc = subprocess.run([str(CLI), "run", str(path)], env=full_env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr, time.monotonic() - t0


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("kubelora-train: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_unreachable_hub_fails_at_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    code, err, wall = _run_cli("org/no-such-model", tiny_model_dir, tmp_path, {"HF_ENDPOINT": _closed_port_endpoint()})
    line = _one_error_line(err)
    assert code == 2, err[-2000:]
    assert "org/no-such-model" in line and "not a local directory" in line and "unreachable" in line
    assert wall < FAST_S, f"took {wall:.1f} s"


def test_offline_mode_without_cache_fails_at_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    code, err, wall = _run_cli("org/no-such-model", tiny_model_dir, tmp_path, {"HF_HUB_OFFLINE": "1"})
    line = _one_error_line(err)
    assert code == 2 and "HF_HUB_OFFLINE=1" in line and "not in the hub cache" in line, err[-2000:]
    assert wall < FAST_S, f"took {wall:.1f} s"


@pytest.mark.parametrize(("repo", "expected"), [
    ("org/missing", "not found on the hub"),
    ("org/gated", "is gated on the hub"),
    ("org/badtoken", "refused the token"),
    ("org/ggufonly", "has no config.json; set model.ggufFile"),
])
def test_hub_answers_become_one_line(repo: str, expected: str, fake_hub: str, tiny_model_dir: Path,
                                     tmp_path: Path) -> None:
    code, err, wall = _run_cli(repo, tiny_model_dir, tmp_path, {"HF_ENDPOINT": fake_hub, "HF_TOKEN": "hf_test"})
    line = _one_error_line(err)
    assert code == 2 and repo in line and expected in line, err[-2000:]
    assert wall < FAST_S, f"took {wall:.1f} s"


def test_cached_model_trains_while_the_hub_is_unreachable(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The probe must not refuse what the hub cache can serve, nor wait for the network to load it."""
    snapshot = tmp_path / "hub-cache" / "models--org--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    code, err, wall = _run_cli("org/tiny", tiny_model_dir, tmp_path, {"HF_ENDPOINT": _closed_port_endpoint()},
                               training={"maxSteps": 1}, evaluation={"exactMatch": False, "before": False})
    assert code == 0, err[-3000:]
    assert "loading model org/tiny from the hub cache" in err
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert wall < 120, f"took {wall:.1f} s"


def test_gguf_path_that_is_not_gguf(tiny_model_dir: Path, tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text("<html>404 page saved as a model</html>")
    code, err, _ = _run_cli(str(fake), tiny_model_dir, tmp_path, {})
    line = _one_error_line(err)
    assert code == 2 and "model.gguf" in line and "does not start with the GGUF magic bytes" in line, err[-2000:]
