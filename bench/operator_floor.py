#!/usr/bin/env python3
"""The floor for bench/operator_scale.py: the least an operator of kubelora's object model can send.

Why it exists: issue 15 asks for 1,000 resources' workers 1.84x sooner than cffc930's operator on a
2-core machine that runs the control plane too. This stand-in does only what no operator of this
object model can skip, with the real operator's manifests (`plan.plan`, so the objects are as large
as the real ones): per LoRAFineTune its ConfigMap, its headless Service (unless `--no-service`) and
its worker pods, then one status patch with Validated=True and Scheduled=True (which the benchmark
waits for), and with `--events` the operator's two Events of a start. No validation pass, no pod
handling, no kopf, no resync: one list+watch of the LoRAFineTunes, one of the pods (the benchmark waits
for both), and a thread pool of creates. What the real operator needs beyond this, in time and CPU,
is the price of its own machinery; what this one needs is the control plane's.

Run by `bench/operator_scale.py --floor service|no-service|service-events` in place of
`python -m kubelora_operator run`; not a product: it never fails a run, retries a start or deletes.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from kubelora_operator.api import API_VERSION, KIND, LoRAFineTuneResource
from kubelora_operator.conditions import set_condition
from kubelora_operator.kube import Kube, collection_path, new_api_client
from kubelora_operator.placement import NodeFacts, decide_placement
from kubelora_operator.plan import LABEL_NAME, plan
from kubelora_operator.settings import load_settings

#: Threads creating children at once (the measured runs used 48; the operator allows controller.API_THREADS, 60).
THREADS = 48


def watch(kube: Kube, path: str, on_object: Callable[[dict[str, Any]], None]) -> None:
    """List `path`, then watch it for good: `on_object` for each listed or ADDED object. A watch that
    ends (the API server ended the LoRAFineTune watch six times in one ramp of 1,000) is resumed from
    the last resourceVersion seen, and listed again after a 410."""
    sep = "&" if "?" in path else "?"
    rv = None
    while True:
        if rv is None:
            listed = kube.request("GET", path)
            for item in listed["items"]:
                on_object(item)
            rv = listed["metadata"]["resourceVersion"]
        resp = kube.api.call_api(
            f"{path}{sep}watch=1&resourceVersion={rv}&timeoutSeconds=3600",
            "GET",
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _return_http_data_only=True,
        )
        buf = b""
        for chunk in resp.read_chunked(decode_content=True):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                event = json.loads(line)
                if event["type"] == "ERROR":  # 410 Gone: too old a resourceVersion
                    rv = None
                    break
                rv = event["object"]["metadata"]["resourceVersion"]
                if event["type"] == "ADDED":
                    on_object(event["object"])
            if rv is None:
                break
        resp.release_conn()
        print(f"operator_floor: watch of {path} ended; {'listing again' if rv is None else 'resuming'}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--no-service", action="store_true", help="create no Service (the control plane's cost of it)")
    ap.add_argument("--events", action="store_true", help="post the two Events the operator posts per start")
    args = ap.parse_args()
    ns = args.namespace
    kube = Kube(new_api_client(connections=THREADS))
    settings = load_settings()
    nodes = [NodeFacts.from_k8s(n) for n in kube.request("GET", "/api/v1/nodes")["items"]]
    pool = ThreadPoolExecutor(THREADS)

    def start(body: dict[str, Any]) -> None:
        resource = LoRAFineTuneResource.from_body(body)
        manifests = plan(resource, decide_placement(resource.spec, nodes, settings), settings)
        for child in [manifests.config_map, *([] if args.no_service else [manifests.service]), *manifests.pods]:
            kube.create_if_absent(child)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        conditions = set_condition(None, "Validated", True, "Floor", "floor", resource.generation, now)
        conditions = set_condition(conditions, "Scheduled", True, "Floor", "floor", resource.generation, now)
        kube.patch_lft_status(ns, resource.name, {"conditions": conditions})
        if args.events:  # the operator's two Events of a start, here both at once
            kube.post_event(body, "Normal", "Validated", f"valid; created {len(manifests.pods)} worker pods")
            kube.post_event(body, "Normal", "PodsScheduled", f"{len(manifests.pods)} worker pods bound")

    def report(done: Future[None]) -> None:
        if done.exception() is not None:
            print(f"operator_floor: {done.exception()}", flush=True)

    def on_lft(body: dict[str, Any]) -> None:
        if not (body.get("status") or {}).get("conditions"):
            pool.submit(start, body).add_done_callback(report)

    pods = f"/api/v1/namespaces/{ns}/pods?labelSelector={LABEL_NAME}"
    threading.Thread(target=watch, args=(kube, pods, lambda _: None), daemon=True).start()
    watch(kube, collection_path(API_VERSION, KIND, ns), on_lft)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
