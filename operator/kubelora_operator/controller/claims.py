"""Run-directory claimants from memory: an index of the resources by namespace (kept by lft_watch.py).

Why: a start whose run directory is on a PVC must know every other resource's directory in its
namespace (run_dirs.py). Listing them from etcd for each start made a burst of N starts cost N lists of
N resources and N x N spec parses (300 resources delivering to one PVC: 119 s until all had workers,
against 16 s with S3 outputs; docs/operator-benchmark.md). The index is filled from the watch, is
complete before any reconcile runs (the startup lists first), and parses a resource's directory once
per generation.
What it can miss is a resource created a moment earlier whose watch event is not indexed yet: the
race run_dirs.py already names for two reconciles running at once, where the trainer's owner file on
the directory stays the last line of defence.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..conditions import ConditionReason as R
from ..conditions import ConditionType as T
from ..conditions import get_condition
from ..run_dirs import Claimant, RunDir, run_dir_of_spec
from .cache import index_values
from .started import StartRecord, record_from_status, record_of_resource


@dataclass(frozen=True)
class IndexedClaim:
    """One resource's claim as the index keeps it (the uid tells a re-created namesake apart)."""

    uid: str
    claimant: Claimant


def claim_of(body: Mapping[str, Any], record: StartRecord | None, run_dir: RunDir | None) -> Claimant | None:
    """The resource as a claimant: None when it holds no directory (none on a claim, or refused for
    another reason before it started). `run_dir`: of its started spec when `record`, else of its spec."""
    meta = body.get("metadata") or {}
    validated = get_condition((body.get("status") or {}).get("conditions"), T.VALIDATED) or {}
    refused = validated.get("status") == "False" and validated.get("reason") != R.RUN_DIR_IN_USE.value
    started = record is not None
    if run_dir is None or (refused and not started):
        return None
    return Claimant(meta.get("name", ""), meta.get("creationTimestamp", ""), started, run_dir)


class ClaimIndexer:
    """Each resource's claim from its body: its directory parsed once per spec it stands on."""

    def __init__(self, records: Mapping[tuple[str, str], tuple[str, StartRecord]]) -> None:
        self._records = records  # CachedKube.records: a start this process committed counts as started
        self._dirs: dict[tuple[str, str], tuple[Any, RunDir | None]] = {}  # (uid, name) -> (spec version, dir)

    def __call__(self, namespace: str | None, body: Mapping[str, Any]) -> dict[str, IndexedClaim]:
        meta = body.get("metadata") or {}
        if not namespace or meta.get("deletionTimestamp"):
            return {}
        name, uid = meta.get("name", ""), meta.get("uid", "")
        try:
            record = record_of_resource(body)
        except ValueError:
            return {}
        if record is None:
            known = self._records.get((namespace, name))
            record = known[1] if known is not None and known[0] == uid else None
        if record is None and (body.get("status") or {}).get("startTime"):
            # started by another process or before a restart: the live spec (changes after start are refused)
            record = record_from_status(body)
        spec = record.spec if record is not None else dict(body.get("spec") or {})
        version = ("started",) if record is not None else ("live", meta.get("generation"))
        key = (uid, name)
        known_dir = self._dirs.get(key)
        if known_dir is None or known_dir[0] != version:
            known_dir = (version, run_dir_of_spec(name, namespace, spec))
            self._dirs[key] = known_dir
        claim = claim_of(body, record, known_dir[1])
        return {namespace: IndexedClaim(uid, claim)} if claim is not None else {}

    def forget(self, uid: str, name: str) -> None:
        """A deleted resource's parsed directory."""
        self._dirs.pop((uid, name), None)


def claims_in(
    index: Mapping[str, Iterable[IndexedClaim]],
    namespace: str,
    records: Mapping[tuple[str, str], tuple[str, StartRecord]],
) -> list[Claimant]:
    """The namespace's claimants from the index, a start this process committed since its last watch
    event counted as started."""
    out = []
    for item in index_values(index, namespace):
        known = records.get((namespace, item.claimant.name))
        started = known is not None and known[0] == item.uid
        out.append(replace(item.claimant, started=True) if started and not item.claimant.started else item.claimant)
    return out
