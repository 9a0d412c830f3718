"""A local HTTP server playing the Hugging Face hub (HF_ENDPOINT) for tests without a network.

It serves the endpoints `snapshot_download` and `model_info` use, for repos made of real files (a tiny
model's directory): `GET /api/models/ORG/NAME[/revision/REV]` (sha, siblings), `GET
/api/models/ORG/NAME/tree/COMMIT` (sizes, LFS sha256) and `HEAD|GET /ORG/NAME/resolve/REV/PATH` (the
file with X-Repo-Commit, ETag and size headers, as huggingface.co answers). Any other repo gets
the answer configured in `errors` (status, headers: e.g. `X-Error-Code: GatedRepo`), as the hub
refuses gated, missing or unauthorized repos. Every request is recorded (`requests`), so a test can
count what a second fetch asked for; the Authorization header of each is kept too.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

#: The hub's own refusals, as `model_info` and `snapshot_download` read them.
REFUSALS: dict[str, tuple[int, dict[str, str]]] = {
    "org/missing": (401, {"X-Error-Code": "RepoNotFound"}),
    "org/gated": (403, {"X-Error-Code": "GatedRepo"}),
    "org/badtoken": (401, {"X-Error-Message": "Invalid credentials in Authorization header"}),
}


@dataclass
class FakeRepo:
    """A repo at one commit: {path: bytes}."""

    files: dict[str, bytes]
    commit: str = "a" * 40

    @classmethod
    def from_dir(cls, directory: Path, commit: str = "a" * 40) -> FakeRepo:
        return cls({str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()},
                   commit)


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo]
    errors: dict[str, tuple[int, dict[str, str]]] = field(default_factory=lambda: dict(REFUSALS))
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    """(method, path, Authorization header) of every request, in order."""
    url: str = ""

    def repo_requests(self) -> list[tuple[str, str, str | None]]:
        """The requests about repos (metadata, tree, files): huggingface_hub's other calls are left out."""
        return [r for r in self.requests if r[1].startswith("/api/models/") or "/resolve/" in r[1]]

    def downloads(self) -> list[str]:
        """Paths of the file bodies sent (GET .../resolve/...)."""
        return [p for m, p, _ in self.requests if m == "GET" and "/resolve/" in p]


def _handler(hub: FakeHub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, status: int, headers: dict[str, str], body: bytes, send_body: bool) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def _json(self, status: int, body: object, headers: dict[str, str] | None = None, send: bool = True) -> None:
            self._answer(status, {**(headers or {}), "Content-Type": "application/json"}, json.dumps(body).encode(),
                         send)

        def _serve(self, send_body: bool) -> None:
            path = unquote(self.path.split("?")[0])
            hub.requests.append((self.command, path, self.headers.get("Authorization")))
            api = path.startswith("/api/models/")
            parts = path.removeprefix("/api/models/" if api else "/").split("/")
            repo_id, rest = "/".join(parts[:2]), parts[2:]
            repo = hub.repos.get(repo_id)
            if repo is None:
                status, headers = hub.errors.get(repo_id, (404, {"X-Error-Code": "RepoNotFound"}))
                return self._json(status, {"error": f"refused {repo_id}"}, headers, send_body)
            if api and rest[:1] == ["tree"]:
                return self._json(200, [_tree_entry(p, b) for p, b in sorted(repo.files.items())], send=send_body)
            if api:
                return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                                        "siblings": [{"rfilename": p} for p in sorted(repo.files)]}, send=send_body)
            if rest[:1] == ["resolve"] and "/".join(rest[2:]) in repo.files:
                data = repo.files["/".join(rest[2:])]
                etag = f'"{hashlib.sha256(data).hexdigest()}"'
                return self._answer(200, {"X-Repo-Commit": repo.commit, "ETag": etag,
                                          "Content-Type": "application/octet-stream"}, data, send_body)
            return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, send_body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._serve(True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(False)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def _tree_entry(path: str, data: bytes) -> dict[str, object]:
    entry: dict[str, object] = {"type": "file", "path": path, "size": len(data),
                                "oid": hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()}
    if path.endswith(".safetensors"):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


@contextmanager
def serve(repos: dict[str, FakeRepo]) -> Iterator[FakeHub]:
    """Run a FakeHub on a free local port for the duration of the block."""
    hub = FakeHub(repos)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
