"""A blocked metrics scrape is reported, not only logged (issue 12, "Observability that does not fail
silently"): rank 0 runs but its /metrics cannot be reached (as behind a NetworkPolicy) -> a Warning
Event `MetricsUnreachable` and the reason in the Running condition's message; once the port answers,
progress flows and the message is clean again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.controlplane import ControlPlane

from .cluster_helpers import (
    Env,
    add_gpu_node,
    condition,
    create_lft,
    free_port,
    get_lft,
    lft_spec,
    operator_env_in_namespace,
    run_pod,
    show_operator_log,
    uid,
    wait_condition,
    wait_events,
    wait_pods,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(90)]

METRICS_PORT = free_port()


@pytest.fixture
def env(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    log_dir = tmp_path_factory.mktemp("operator-logs")
    with operator_env_in_namespace(control_plane, log_dir, KUBELORA_METRICS_PORT=str(METRICS_PORT)) as env:
        yield env
        show_operator_log(env)


def test_unreachable_metrics_are_reported_then_cleared(env: Env) -> None:
    from kubelora_trainer.metrics import ProgressState, serve_metrics

    cp, ns = env.cp, env.ns
    pool = uid()
    add_gpu_node(cp, f"gpu-{pool}", pool, gpus=2)
    name = f"blocked-{pool}"
    create_lft(cp, ns, name, lft_spec(pool, device="xpu", workers=1))
    (pod,) = wait_pods(cp, ns, name, 1, lambda p: bool(p["spec"].get("nodeName")))
    run_pod(cp, ns, pod["metadata"]["name"])  # nothing listens on METRICS_PORT yet: every scrape fails
    wait_condition(cp, ns, name, "Running", "True", "WorkersRunning")
    warned = [e for e in wait_events(cp, ns, name, "MetricsUnreachable") if e["reason"] == "MetricsUnreachable"]
    assert len(warned) == 1 and warned[0]["type"] == "Warning", warned
    assert f"127.0.0.1:{METRICS_PORT}" in warned[0]["message"] and "NetworkPolicy" in warned[0]["message"]
    obj = wait_condition(cp, ns, name, "Running", "True", "WorkersRunning", contains="not readable")
    assert "progress" not in obj["status"] or not obj["status"]["progress"].get("step")

    state = ProgressState()
    state.update(step=3, total_steps=20, train_loss=1.5)
    server = serve_metrics(state, METRICS_PORT, host="127.0.0.1")
    try:
        cp.wait_for(
            lambda: (get_lft(cp, ns, name)["status"].get("progress") or {}).get("step") == 3,
            timeout=20,
            what="progress after the port opened",
        )
        cp.wait_for(
            lambda: "not readable" not in (condition(get_lft(cp, ns, name), "Running") or {}).get("message", "x"),
            timeout=20,
            what="the Running message without the scrape problem",
        )
    finally:
        server.shutdown()
    # One Warning per streak of failures, and no second WorkersRunning Event for the message changes.
    reasons = [e["reason"] for e in wait_events(cp, ns, name, "WorkersRunning")]
    assert reasons.count("MetricsUnreachable") == 1 and reasons.count("WorkersRunning") == 1, reasons
