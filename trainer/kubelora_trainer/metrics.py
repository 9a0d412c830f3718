"""Where training progress goes: the log history files, the console line, Prometheus.

Why Prometheus: trainer pods have no Kubernetes API rights; the operator scrapes rank 0's
`/metrics` endpoint to fill `status.progress`, and any Prometheus can scrape it too.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from . import jsonsafe
from .config import TrackingConfig
from .tracking import Trackers

CSV_FIELDS = ("step", "epoch", "kind", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s")


class ProgressState:
    """Thread-safe snapshot of the run, read by the metrics endpoint."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values: dict[str, float] = {
            "step": 0,
            "total_steps": 0,
            "epoch": 0.0,
            "train_loss": math.nan,
            "eval_loss": math.nan,
            "tokens_per_second": 0.0,
            "eta_seconds": math.nan,
            "train_tokens": 0,
            "phase": 0,  # 0 starting, 1 training, 2 exporting, 3 done, 4 failed
        }

    def update(self, **values: float) -> None:
        with self._lock:
            self.values.update(values)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.values)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """prometheus_client's collector protocol: one gauge `kubelora_<key>` per value (the names the
        operator reads, controller/progress.py)."""
        for key, value in self.snapshot().items():
            yield GaugeMetricFamily(f"kubelora_{key}", f"kubelora trainer progress: {key}", value=float(value))

    def prometheus_text(self) -> str:
        """The Prometheus text exposition of the snapshot (prometheus_client's own writer)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry).decode()


def serve_metrics(state: ProgressState, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve `/metrics` (Prometheus text) and `/healthz` from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            if self.path.startswith("/metrics"):
                body = state.prometheus_text().encode()
                ctype = "text/plain; version=0.0.4"
            elif self.path.startswith("/healthz"):
                body, ctype = b"ok\n", "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # keep scrapes out of the training log
            return

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server


class MetricsLog:
    """Append-only log history in `metrics.jsonl` (source of truth) and `metrics.csv` (for people),
    and the same records to the experiment trackers (TensorBoard, MLflow: `tracking.Trackers`)."""

    def __init__(self, run_dir: Path, enabled: bool, tracking: TrackingConfig | None = None) -> None:
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.enabled = enabled
        self.trackers = Trackers(tracking, run_dir)

    def truncate_after(self, step: int) -> None:
        """Drop entries past `step` (a resumed run replays them), so the curve has no duplicates."""
        if not self.enabled:
            return
        self.trackers.resumed_at(step)
        if not self.jsonl.exists():
            return
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        self.jsonl.write_text("".join(jsonsafe.dumps(r) + "\n" for r in kept))
        self._rewrite_csv(kept)

    def read(self) -> list[dict[str, Any]]:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def append(self, record: dict[str, Any]) -> None:
        """One line per record; a NaN loss (a diverged step, eval over no rows) is written as null."""
        if not self.enabled:
            return
        with self.jsonl.open("a") as fh:
            fh.write(jsonsafe.dumps(record) + "\n")
        new = not self.csv.exists()
        with self.csv.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(record)
        self.trackers.log(record)

    def close(self) -> None:
        """End the trackers' runs (FAILED when called while an exception propagates)."""
        self.trackers.close()

    def _rewrite_csv(self, records: list[dict[str, Any]]) -> None:
        with self.csv.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(records)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ConsoleProgress:
    """One line per logged step: step/total, loss, tokens/s and ETA (a progress bar for log files)."""

    def __init__(self, total_steps: int, enabled: bool, stream: Any = None) -> None:
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.start = time.monotonic()

    def line(self, step: int, loss: float, lr: float, tokens_per_s: float, eta_s: float) -> None:
        if not self.enabled:
            return
        width = 20
        done = int(width * step / max(self.total, 1))
        bar = "#" * done + "." * (width - done)
        print(
            f"[{bar}] step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
            f"{tokens_per_s:,.0f} tok/s eta {format_eta(eta_s)}",
            file=self.stream,
            flush=True,
        )
