"""Run-directory claims from memory (controller/claims.py): a start with a PVC run directory checks the
namespace's directories without a LIST of every resource, each directory parsed once per generation,
and a start this process committed counts as started before its watch event says so."""

from __future__ import annotations

from typing import Any

import pytest
from kubelora_operator.conditions import ConditionType as T
from kubelora_operator.controller import claims as claims_module
from kubelora_operator.controller.cache import CachedKube
from kubelora_operator.controller.claims import ClaimIndexer, IndexedClaim, claims_in
from kubelora_operator.controller.lft_watch import LftWatch
from kubelora_operator.controller.reconcile import reconcile
from kubelora_operator.controller.started import StartRecord
from kubelora_operator.run_dirs import RunDir

from . import SETTINGS, raw_spec
from .test_handlers import FakeApiClient

T0, T1 = "2026-12-02T10:00:00Z", "2026-12-02T10:00:05Z"


def lft(name: str, created: str, sub: str = "shared", generation: int = 1, **status: Any) -> dict[str, Any]:
    spec = raw_spec(output={"pvc": {"claimName": "runs", "subPath": sub}})
    meta = {"name": name, "namespace": "team-a", "uid": f"uid-{name}", "generation": generation,
            "creationTimestamp": created, "resourceVersion": "5"}
    return {"apiVersion": "kubelora.dev/v1alpha1", "kind": "LoRAFineTune", "metadata": meta, "spec": spec,
            "status": status}


def indexed(kube: CachedKube, *bodies: dict[str, Any]) -> LftWatch:
    """The resource watch (lft_watch.py) after a listing of `bodies`: its claim index filled."""
    watch = LftWatch(kube, ["team-a"], lambda ns, name: None)
    watch._listed("team-a", list(bodies), report=False)
    return watch


def test_a_directory_is_parsed_once_per_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[str] = []
    real = claims_module.run_dir_of_spec
    monkeypatch.setattr(claims_module, "run_dir_of_spec", lambda n, ns, spec: parsed.append(n) or real(n, ns, spec))
    indexer = ClaimIndexer({})
    (claim,) = indexer("team-a", lft("a", T0)).values()
    assert claim == IndexedClaim("uid-a", claims_module.Claimant("a", T0, False, RunDir("runs", "shared")))
    indexer("team-a", lft("a", T0, phase="Pending"))  # a status change: same spec, no parse
    assert parsed == ["a"]
    indexer("team-a", lft("a", T0, sub="other", generation=2))  # a spec change
    assert parsed == ["a", "a"]
    started = indexer("team-a", lft("a", T0, sub="other", generation=2, startTime=T1))
    assert started["team-a"].claimant.started
    # S3 outputs and refused resources hold no directory.
    s3 = {**lft("s", T0), "spec": {**raw_spec(), "output": {"s3": {"uri": "s3://bucket/runs/s"}}}}
    refused = lft("r", T0, conditions=[{"type": T.VALIDATED.value, "status": "False", "reason": "SecretNotFound"}])
    assert indexer("team-a", s3) == {} and indexer("team-a", refused) == {}


def test_a_start_committed_here_counts_as_started_before_its_watch_event() -> None:
    kube = CachedKube(FakeApiClient(), backoff=0)
    records = kube.records
    index = indexed(kube, lft("old", T0)).claim_index
    assert [c.started for c in claims_in(index, "team-a", records)] == [False]
    records[("team-a", "old")] = ("uid-old", StartRecord(raw_spec(), 1, "cpu", T1))
    assert [c.started for c in claims_in(index, "team-a", records)] == [True]
    records[("team-a", "old")] = ("uid-a-namesake", StartRecord(raw_spec(), 1, "cpu", T1))
    assert [c.started for c in claims_in(index, "team-a", records)] == [False]
    assert claims_in(index, "team-b", records) == []


def test_a_start_checks_its_run_directory_without_listing_the_resources() -> None:
    claim = {"metadata": {"name": "runs"}, "spec": {"accessModes": ["ReadWriteMany"]}}
    api = FakeApiClient(claim, {}, {})  # the claim's GET (validation), the status patch, its Warning Event
    kube = CachedKube(api, backoff=0)
    holder = lft("first", T0, startTime=T0)
    late = lft("second", T1)
    kube.claim_index = indexed(kube, holder, late).claim_index
    reconcile(kube, SETTINGS, "team-a", "second")
    assert [c[0] for c in api.calls] == ["GET", "PATCH", "POST"], api.calls  # no LIST of the resources
    conditions = {c["type"]: c for c in api.calls[1][2]["status"]["conditions"]}
    assert conditions[T.VALIDATED.value]["reason"] == "RunDirInUse"
    assert "in use by LoRAFineTune first (started first)" in conditions[T.VALIDATED.value]["message"]
