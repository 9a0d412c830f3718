"""The reconcile step between the commit point and the first worker pod: sources fetched (fetch.py).

Why a step of its own: a missing or unreadable `s3://`/`pvc://` source or hub model must fail the run
before any worker pod (and so any accelerator) is requested, and a model must be fetched once per
run, not per worker and restart. The `<name>-fetch` pod does the work; this step creates it, waits for it, and
remembers its success in the annotation `kubelora.dev/sources-fetched` (operator memory lives in
annotations), so later passes and later attempts (restarts, resume) neither read nor re-create it:
a settled run costs no request here. Its failure with exit 2 (the source is wrong) fails the run
at once (SourceUnavailable); another failure (store unreachable) is retried by re-creating the pod,
counted in status.restarts against backoffLimit like a worker failure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from kubelora_trainer.contract import EXIT_BAD_INPUT

from ..api import LoRAFineTuneResource
from ..conditions import ConditionReason as R
from ..conditions import ConditionType as T
from ..fetch import fetch_pod, fetch_pod_name, needs_fetch
from ..kube import Kube
from ..settings import OperatorSettings
from .actions import delete_pods, fail, plural
from .pods import worker_state
from .status import StatusUpdate

ANN_SOURCES_FETCHED = "kubelora.dev/sources-fetched"


def _summary(message: str | None) -> str:
    """`2 sources (1 downloaded, 1 reused; 3 files, 1234 bytes)` from the fetch pod's termination message."""
    try:
        fetched = json.loads(message or "")["sources"]
        files = sum(int(s["files"]) for s in fetched)
        size = sum(int(s["bytes"]) for s in fetched)
        down = sum(1 for s in fetched if s["downloaded"])
    except (ValueError, KeyError, TypeError):
        return "sources ready"
    return (f"{plural(len(fetched), 'source')} ready ({down} downloaded, {len(fetched) - down} already cached or "
            f"local; {plural(files, 'file')}, {size} bytes)")


def sources_ready(
    kube: Kube,
    settings: OperatorSettings,
    u: StatusUpdate,
    resource: LoRAFineTuneResource,
    device: str | None,
    annotations: Mapping[str, str],
) -> bool:
    """True when worker pods may be created: nothing to fetch, or the fetch pod succeeded (now or before)."""
    if not needs_fetch(resource.spec) or annotations.get(ANN_SOURCES_FETCHED):
        return True
    ns, name = resource.namespace, fetch_pod_name(resource.name)
    body = kube.get_pod(ns, name)
    if body is None:
        kube.create_if_absent(fetch_pod(resource, settings, device or "cpu"))
        u.condition(T.RUNNING, False, R.FETCHING_SOURCES,
                    f"pod {name} fetches the model/data sources; worker pods are created after it succeeded",
                    event="Normal")
        return False
    pod = worker_state(body)
    if pod.deleting:
        return False  # a failed fetch being replaced: created again once it is gone
    if pod.succeeded:
        summary = _summary(pod.message)
        kube.patch_lft_annotations(ns, resource.name, {ANN_SOURCES_FETCHED: summary})
        u.condition(T.RUNNING, False, R.SOURCES_FETCHED, f"{summary}; creating worker pods", event="Normal")
        return True
    if pod.failed:
        what = f"pod {name} exited with code {pod.exit_code}: {pod.message or 'no message'}"
        restarts = int(u.status.get("restarts") or 0)
        if pod.exit_code == EXIT_BAD_INPUT or restarts >= resource.spec.backoff_limit:
            fail(u, R.SOURCE_UNAVAILABLE, f"{what}; no worker pod was created")
            return False
        u.status["restarts"] = restarts + 1
        delete_pods(kube, ns, [pod], keep_terminated=False)
        u.condition(T.RUNNING, False, R.FETCHING_SOURCES,
                    f"{what}; fetching again (restart {restarts + 1}/{resource.spec.backoff_limit})", event="Warning")
        return False
    stuck = f": {pod.waiting}" if pod.waiting else (f": {pod.unschedulable}" if pod.unschedulable else "")
    u.condition(T.RUNNING, False, R.FETCHING_SOURCES,
                f"pod {name} fetches the model/data sources ({pod.phase}{stuck}); no worker pod yet")
    return False
