"""The Argo CD health check (docs/argocd/health.lua) against sample LoRAFineTune statuses.

Argo CD runs health scripts in gopher-lua (Lua 5.1): `obj` is a global table, the script returns
`hs` with `status` and `message`. Here the script runs in Lua 5.1 from the PyPI package `lupa` (falling
back to its default Lua, or a `lua5.1`/`lua5.4`/`lua` binary); the test skips, saying so, when none
is available. The statuses are built with the operator's own condition helpers and phase function,
so they look exactly like what the operator writes.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubelora_operator.conditions import ConditionReason as R
from kubelora_operator.conditions import ConditionType as T
from kubelora_operator.conditions import phase_of, set_condition

REPO = Path(__file__).resolve().parents[2]
HEALTH = REPO / "docs" / "argocd" / "health.lua"
GITOPS_DOC = REPO / "docs" / "gitops.md"
NOW = "2026-01-01T00:00:00Z"


def lua_literal(value: Any) -> str:
    """Python JSON-like value -> Lua table constructor (JSON null -> nil, as Argo CD converts it)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid Lua string literal for this content
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{json.dumps(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def _program(obj: dict[str, Any], script: str) -> str:
    return (
        f"obj = {lua_literal(obj)}\n"
        f"local function check()\n{script}\nend\n"
        "local hs = check()\n"
        'return hs.status .. "\\t" .. (hs.message or "")\n'
    )


def _runner():  # noqa: ANN202
    for mod in ("lupa.lua51", "lupa.luajit21", "lupa"):
        try:
            lupa = importlib.import_module(mod)
        except ImportError:
            continue
        runtime = lupa.LuaRuntime()

        def execute(source: str, runtime: Any = runtime) -> str:
            return str(runtime.execute(source))

        return execute, f"{mod} ({runtime.execute('return _VERSION')})"
    for binary in ("lua5.1", "luajit", "lua5.4", "lua"):
        path = shutil.which(binary)
        if path:

            def run(source: str, path: str = path) -> str:
                wrapped = source.replace('return hs.status .. "\\t"', 'print(hs.status .. "\\t"', 1)
                wrapped = wrapped.rstrip("\n") + ")\n"
                proc = subprocess.run([path, "-"], input=wrapped, capture_output=True, text=True, timeout=30)
                assert proc.returncode == 0, proc.stderr
                return proc.stdout.rstrip("\n")

            return run, binary
    pytest.skip("no Lua interpreter: `pip install lupa` (test dependency) or `apt-get install lua5.4`")


@pytest.fixture(scope="module")
def health():  # noqa: ANN201
    run, _name = _runner()
    script = HEALTH.read_text()

    def check(obj: dict[str, Any]) -> tuple[str, str]:
        status, _, message = run(_program(obj, script)).partition("\t")
        return status, message

    return check


def lft(*conds: tuple[T, bool | str, R, str], **status: Any) -> dict[str, Any]:
    conditions: list[dict[str, Any]] = []
    for type_, st, reason, message in conds:
        conditions = set_condition(conditions, type_, st, reason, message, 1, NOW)
    body: dict[str, Any] = {
        "apiVersion": "kubelora.dev/v1alpha1",
        "kind": "LoRAFineTune",
        "metadata": {"name": "x", "namespace": "ml", "generation": 1},
        "spec": {"data": {"path": "sample://train.jsonl"}, "output": {"s3": {"uri": "s3://b/p"}}},
    }
    if conds or status:
        body["status"] = {"conditions": conditions, "phase": phase_of(conditions).value, **status}
    return body


VALID = (T.VALIDATED, True, R.SPEC_VALID, "spec and references are valid")
SCHEDULED = (T.SCHEDULED, True, R.PODS_SCHEDULED, "2/2 worker pods bound to nodes")


def bare(status: dict[str, Any]) -> dict[str, Any]:
    """A resource whose status is exactly `status` (what a freshly created one may carry)."""
    return {**lft(), "status": status}


RUNNING = (T.RUNNING, True, R.WORKERS_RUNNING, "2 workers running (attempt 0)")
PROGRESS = {"step": 90, "totalSteps": 200, "percent": 45, "trainLoss": 1.2345678, "etaSeconds": 300}
ARTIFACT = {"uri": "s3://b/p", "sha256": "ab" * 32, "sizeBytes": 123}
P = pytest.param

#: (resource, Argo CD health status, its message: exactly this string, or a list of texts: the first
#: starts it, the others are in it)
CASES = [
    P(lft(), "Progressing", [], id="no-status"),
    P(bare({}), "Progressing", [], id="empty-status"),
    P(bare({"conditions": []}), "Progressing", [], id="no-conditions"),
    P(
        lft(VALID, SCHEDULED, RUNNING, progress=PROGRESS),
        "Progressing",
        ["Running: 45%", "step 90/200", "loss 1.235"],
        id="running-with-progress",
    ),
    P(
        lft(VALID, (T.SCHEDULED, False, R.PODS_PENDING, "0/2 worker pods bound")),
        "Progressing",
        ["", "PodsPending"],
        id="starting",
    ),
    P(
        lft(VALID, SCHEDULED, (T.RUNNING, False, R.RESTARTING, "worker 1 failed (exit 1); restart 1/3")),
        "Progressing",
        ["Restarting"],
        id="restarting",
    ),
    P(
        lft(
            VALID,
            SCHEDULED,
            (T.RUNNING, False, R.TRAINING_COMPLETE, "all workers finished"),
            (T.SUCCEEDED, True, R.TRAINING_COMPLETE, "adapter delivered"),
            artifact=ARTIFACT,
        ),
        "Healthy",
        "Succeeded: adapter at s3://b/p",
        id="succeeded",
    ),
    *[
        P(
            lft(VALID, SCHEDULED, (T.FAILED, True, reason, "worker 0 exited 1: CUDA? no, CCL error")),
            "Degraded",
            ["", reason.value, "CCL error"],
            id=f"failed-{reason.value}",
        )
        for reason in (R.WORKER_FAILED, R.BACKOFF_LIMIT_EXCEEDED, R.DEADLINE_EXCEEDED, R.API_ERROR)
    ],
    P(
        lft((T.VALIDATED, False, R.SECRET_NOT_FOUND, "spec.output.s3.credentialsSecret: Secret 's3' not found")),
        "Degraded",
        ["", "SecretNotFound"],
        id="invalid",
    ),
    P(
        lft(VALID, (T.SCHEDULED, False, R.NO_MATCHING_NODES, "no matching nodes: xpu: asked for 4 GPUs")),
        "Degraded",
        ["", "asked for 4 GPUs"],
        id="no-matching-nodes",
    ),
    P(
        lft(
            VALID,
            SCHEDULED,
            (T.RUNNING, False, R.SUSPENDED_BY_USER, "suspended"),
            (T.SUSPENDED, True, R.SUSPENDED_BY_USER, "spec.suspend is true: worker pods deleted"),
        ),
        "Suspended",
        [],
        id="suspended",
    ),
    # Resumed: Suspended=False, no longer reported as suspended.
    P(
        lft(VALID, (T.SUSPENDED, False, R.RESUMED, "resumed from the newest checkpoint")),
        "Progressing",
        [],
        id="resumed",
    ),
    # A finished run stays Healthy/Degraded whatever else its conditions say (e.g. a later spec edit).
    P(
        lft(
            VALID,
            (T.SUCCEEDED, True, R.TRAINING_COMPLETE, "done"),
            (T.SPEC_CHANGE_REFUSED, True, R.SPEC_CHANGED_AFTER_START, "spec.lora.r changed after start"),
        ),
        "Healthy",
        [],
        id="terminal-state-wins",
    ),
]


@pytest.mark.parametrize(("resource", "status", "texts"), CASES)
def test_health(health, resource: dict[str, Any], status: str, texts: str | list[str]) -> None:  # noqa: ANN001
    got, message = health(resource)
    assert got == status
    if isinstance(texts, str):
        assert message == texts
    elif texts:
        assert message.startswith(texts[0]), message
        assert all(t in message for t in texts[1:]), message


def test_gitops_doc_embeds_the_same_script() -> None:
    """docs/gitops.md's argocd-cm snippet carries health.lua verbatim."""
    text = GITOPS_DOC.read_text()
    block = text.split("```yaml\n# argocd-cm", 1)[1].split("```", 1)[0]
    cm = yaml.safe_load("# argocd-cm" + block)
    key = "resource.customizations.health.kubelora.dev_LoRAFineTune"
    assert cm["data"][key].strip() == HEALTH.read_text().strip()
