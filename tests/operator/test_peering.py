"""Taking turns with other replicas (controller/peering.py): paused while a live other peer has a
higher or the same priority, as kopf decides; a peer whose lifetime ran out no longer counts; while
paused the Runner runs no reconcile; the newest replica is the active one."""

from __future__ import annotations

import datetime
import time
import urllib.parse
from typing import Any

from kubelora_operator.controller import Runner
from kubelora_operator.controller.cache import CachedKube
from kubelora_operator.controller.peering import Peer, PeeringWatch

from . import SETTINGS
from .test_handlers import FakeApiClient
from .test_pod_watch import FakeStream, listing

NOW = datetime.datetime(2026, 12, 3, 8, 0, tzinfo=datetime.timezone.utc)


def peering(namespace: str | None, **peers: tuple[int, int]) -> dict[str, Any]:
    """A kopf peering object; each peer (priority, seconds since it was last seen), lifetime 60 s."""
    status = {
        who: {"priority": prio, "lifetime": 60, "lastseen": (NOW - datetime.timedelta(seconds=ago)).isoformat()}
        for who, (prio, ago) in peers.items()
    }
    meta = {"name": "kubelora", **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": meta, "status": status}


def test_paused_while_a_live_peer_has_the_same_or_a_higher_priority() -> None:
    clock = [NOW.timestamp()]
    api = FakeApiClient(listing(peering(None, me=(0, 1)), rv="5"))
    gate = PeeringWatch(CachedKube(api, backoff=0), (), "kubelora", "me", clock=lambda: clock[0])
    gate.list_all()
    path, query = api.calls[0][1].split("?")
    assert path == "/apis/kopf.dev/v1/clusterkopfpeerings"
    assert dict(urllib.parse.parse_qsl(query)) == {"fieldSelector": "metadata.name=kubelora"}
    assert gate.active()  # alone
    api.script.append(FakeStream({"type": "MODIFIED", "object": peering(None, me=(0, 1), other=(0, 10))}))
    gate._watch("")
    assert not gate.active()  # the same priority: kopf pauses both until one is gone
    clock[0] += 55
    assert gate.active()  # the other's lifetime (60 s since it was last seen) ran out
    api.script.append(FakeStream({"type": "MODIFIED", "object": peering(None, me=(0, 1), low=(-1, 0))}))
    gate._watch("")
    clock[0] = NOW.timestamp()
    assert gate.active()  # a lower priority does not pause this one


def test_a_namespaced_operator_reads_each_namespaces_peering_and_a_paused_runner_runs_nothing() -> None:
    api = FakeApiClient(listing(peering("team-a", me=(0, 0)), rv="5"), listing(peering("team-b", boss=(10, 0)), rv="6"))
    gate = PeeringWatch(CachedKube(api, backoff=0), ["team-a", "team-b"], "kubelora", "me", clock=NOW.timestamp)
    gate.list_all()
    assert [c[1].split("?")[0] for c in api.calls] == [
        "/apis/kopf.dev/v1/namespaces/team-a/kopfpeerings",
        "/apis/kopf.dev/v1/namespaces/team-b/kopfpeerings",
    ]
    runs: list[str] = []
    runner = Runner(CachedKube(FakeApiClient(), backoff=0), SETTINGS, fn=lambda k, s, ns, name: runs.append(name))
    runner.active = gate.active
    runner.trigger("team-a", "demo")
    assert not gate.active() and runs == []  # a higher priority in any namespace pauses all of them
    api.script.append(FakeStream({"type": "DELETED", "object": peering("team-b")}))
    gate._watch("team-b")
    runner.trigger("team-a", "demo")
    assert gate.active() and runs == ["demo"]


def test_the_newest_replica_is_the_active_one() -> None:
    old, new = Peer.starting("kubelora"), Peer.starting("kubelora")._replace(priority=int(NOW.timestamp()) + 1)
    assert old.identity != new.identity and abs(old.priority - time.time()) < 5  # its start time
    old = old._replace(priority=int(NOW.timestamp()))
    seen = peering(None, **{old.identity: (old.priority, 5), new.identity: (new.priority, 1)})
    gates = {}
    for me in (old, new):
        gates[me] = PeeringWatch(CachedKube(FakeApiClient(listing(seen)), backoff=0), (), *me, clock=NOW.timestamp)
        gates[me].list_all()
    assert not gates[old].active() and gates[new].active()  # a rolling update: the new pod takes over
