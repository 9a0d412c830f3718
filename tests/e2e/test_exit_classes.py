"""Exit classes through the real pod command: the node agent runs each pod's `/bin/sh -c` script, i.e.
`exec python -m kubelora_trainer.launch -- torchrun ... -m kubelora_trainer.cli run ...`, with real
torchrun and trainer processes.

cffc930: the pods ran `exec torchrun ...`, torchrun exits 1 for any failed child, and `cutoffLen: 8`
(bad input: exit 2) ended `BackoffLimitExceeded ... exited with code 1` after 3 attempts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.operator.cluster_helpers import condition, pods, wait_condition, wait_events

from .conftest import E2E, add_hostpath_claim, apply, load_example
from .test_two_workers_s3 import NAME, _tiny

pytestmark = [pytest.mark.cluster, pytest.mark.s3]

TRAINER_LINE = "cutoff_len 8 is too small for any sample"


@pytest.mark.timeout(240)
def test_bad_input_through_torchrun_fails_at_once_with_the_trainers_line(
    e2e: E2E, s3_server: Any, s3_bucket: str, tiny_model_dir: Path
) -> None:
    add_hostpath_claim(e2e, "e2e-models", tiny_model_dir.parent, read_only=True)
    secret, lft = load_example(
        bucket=s3_bucket,
        endpoint=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        pool=e2e.pool,
    )
    lft = _tiny(lft)
    lft["spec"]["data"]["cutoffLen"] = 8  # valid for the schema; the trainer finds no sample that fits
    apply(e2e.cp, e2e.ns, secret, lft)
    try:
        obj = wait_condition(e2e.cp, e2e.ns, NAME, "Failed", "True", timeout=180)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{e2e.diagnostics(NAME)}") from None

    failed = condition(obj, "Failed")
    assert failed is not None and failed["reason"] == "InvalidSpec", (obj["status"], e2e.diagnostics(NAME))
    assert "exited with code 2" in failed["message"] and TRAINER_LINE in failed["message"], failed
    assert obj["status"].get("restarts", 0) == 0, obj["status"]
    assert {p["metadata"]["labels"]["kubelora.dev/attempt"] for p in pods(e2e.cp, e2e.ns, NAME)} == {"0"}
    said = [e["message"] for e in wait_events(e2e.cp, e2e.ns, NAME, "InvalidSpec") if e["reason"] == "InvalidSpec"]
    assert any(TRAINER_LINE in m for m in said), said
    # The pods really ran the wrapper around torchrun (not the CLI directly).
    script = pods(e2e.cp, e2e.ns, NAME)[0]["spec"]["containers"][0]["command"][-1]
    assert "-m kubelora_trainer.launch -- torchrun " in script, script
