"""Progress: scrape rank 0's Prometheus metrics into `status.progress`.

Why scraping: trainer pods get no API rights (automountServiceAccountToken: false), so they cannot
write status themselves; the trainer serves gauges (kubelora_trainer.metrics) and the operator reads
them over the pod network from worker 0 (the pod running rank 0).
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

#: Failed scrapes in a row after which the failure is reported (Event + Running condition message);
#: fewer would report a pod that is just starting its metrics server.
SCRAPE_FAILURES_TO_REPORT = 3
#: The Warning Event's reason.
EVENT_METRICS_UNREACHABLE = "MetricsUnreachable"

#: gauge name -> (status.progress key, int?)
GAUGES: dict[str, tuple[str, bool]] = {
    "kubelora_step": ("step", True),
    "kubelora_total_steps": ("totalSteps", True),
    "kubelora_epoch": ("epoch", False),
    "kubelora_train_loss": ("trainLoss", False),
    "kubelora_eval_loss": ("evalLoss", False),
    "kubelora_tokens_per_second": ("tokensPerSecond", False),
    "kubelora_eta_seconds": ("etaSeconds", True),
}


def parse_prometheus(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text exposition: name -> value, parsed by prometheus_client
    (the library the trainer exports with). An exposition it cannot parse gives no samples."""
    out: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.labels:
                    out[sample.name] = float(sample.value)
    except ValueError:
        return {}
    return out


def progress_from_metrics(samples: Mapping[str, float]) -> dict[str, Any]:
    """`status.progress` from the trainer's gauges; NaN/inf and negative counters are left out."""
    out: dict[str, Any] = {}
    for gauge, (key, integer) in GAUGES.items():
        value = samples.get(gauge)
        if value is None or not math.isfinite(value):
            continue
        if integer:
            if value < 0:
                continue
            out[key] = int(value)
        else:
            if key in ("epoch", "tokensPerSecond") and value < 0:
                continue
            out[key] = round(value, 6)
    step, total = out.get("step"), out.get("totalSteps")
    if step is not None and total:
        out["percent"] = max(0, min(100, int(100 * step // total)))
    if total == 0:
        out.pop("totalSteps", None)  # not known yet (0 in the trainer's gauge means "not planned yet")
    return out


def scrape(ip: str, port: int, timeout: float) -> dict[str, Any]:
    """GET http://ip:port/metrics and convert; raises OSError/ValueError when it cannot be read."""
    host = f"[{ip}]" if ":" in ip else ip
    # No proxies: pod IPs are reached directly, whatever HTTP(S)_PROXY the operator's pod has.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{host}:{port}/metrics", timeout=timeout) as resp:
        text = resp.read(1 << 20).decode("utf-8", errors="replace")
    return progress_from_metrics(parse_prometheus(text))
