"""One reconcile's status changes: conditions, fields and the Events that go with transitions.

Why a small accumulator: a reconcile decides several things (validated, scheduled, running, ...);
collecting them and writing one merge patch of only the changed top-level keys keeps API traffic
low and lets an Event be posted exactly when a condition actually changes (not on every resync).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from ..conditions import (
    ConditionReason,
    ConditionType,
    format_time,
    get_condition,
    phase_of,
    remove_condition,
    set_condition,
)
from ..kube import Kube

log = logging.getLogger(__name__)


class StatusUpdate:
    """Mutable copy of `status` plus pending Events; `flush` writes the difference."""

    def __init__(self, body: Mapping[str, Any], now: datetime | None = None) -> None:
        self.body = body
        self.now = now or datetime.now(timezone.utc)
        self.stamp = format_time(self.now)
        self.old: dict[str, Any] = copy.deepcopy(dict(body.get("status") or {}))
        self.status: dict[str, Any] = copy.deepcopy(self.old)
        self.generation = int((body.get("metadata") or {}).get("generation") or 1)
        self.events: list[tuple[str, str, str]] = []
        #: Set by the pass that created worker pods: the reconcile their watch events bring (within
        #: about a second) can write this pass's status together with its own (reconcile.py, `_carry`).
        self.created_pods = False

    @property
    def conditions(self) -> list[dict[str, Any]]:
        return list(self.status.get("conditions") or [])

    def condition(
        self,
        type_: ConditionType,
        status: bool,
        reason: ConditionReason,
        message: str,
        event: str | None = None,
        event_reason: str | None = None,
    ) -> bool:
        """Set a condition; post an Event of type `event` (Normal/Warning) when it changed. True if changed."""
        before = get_condition(self.conditions, type_)
        self.status["conditions"] = set_condition(
            self.conditions, type_, status, reason, message, self.generation, self.stamp
        )
        want = "True" if status else "False"
        changed = before is None or (before.get("status"), before.get("reason"), before.get("message") or "") != (
            want,
            reason.value,
            message,
        )
        if changed and event:
            self.events.append((event, event_reason or reason.value, message))
        return changed

    def drop(self, type_: ConditionType) -> None:
        if get_condition(self.conditions, type_) is not None:
            self.status["conditions"] = remove_condition(self.conditions, type_)

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    def fold_event(self, reason: str) -> None:
        """Fold a pending Normal Event of `reason` into the next Normal Event of this pass (one
        Event, its message first), when there is one: fewer requests, the same words."""
        for i, (type_, why, message) in enumerate(self.events):
            if type_ == "Normal" and why == reason:
                later = next((j for j in range(i + 1, len(self.events)) if self.events[j][0] == "Normal"), None)
                if later is not None:
                    t, r, m = self.events[later]
                    self.events[later] = (t, r, f"{message}; {m}")
                    del self.events[i]
                return

    def patch(self) -> dict[str, Any]:
        """The merge patch of changed top-level keys (phase recomputed); {} when nothing changed."""
        self.status["phase"] = phase_of(self.conditions).value
        out: dict[str, Any] = {}
        for key, value in self.status.items():
            if self.old.get(key) != value:
                out[key] = value
        for key in self.old:
            if key not in self.status:
                out[key] = None
        return out

    def carried(self) -> dict[str, Any]:
        """The changed top-level status keys (None: removed), for `adopt` by the next pass instead of
        a patch now."""
        return copy.deepcopy(self.patch())

    def adopt(self, carried: Mapping[str, Any]) -> None:
        """Take over what an earlier pass of this resource decided but did not write (`carried`): its
        keys count as changed, so this pass's patch writes them with its own."""
        for key, value in carried.items():
            if value is None:
                self.status.pop(key, None)
            else:
                self.status[key] = copy.deepcopy(value)

    def flush(self, kube: Kube) -> None:
        meta = self.body.get("metadata") or {}
        patch = self.patch()
        if patch:
            kube.patch_lft_status(meta["namespace"], meta["name"], patch)
            self.old = copy.deepcopy(self.status)
        self.post_events(kube)

    def post_events(self, kube: Kube) -> None:
        events, self.events = self.events, []
        for type_, reason, message in events:
            kube.post_event(self.body, type_, reason, message)
