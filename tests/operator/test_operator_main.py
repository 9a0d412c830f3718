"""What the operator asks of kopf (`kubelora_operator.__main__`, `controller.register`)."""

from __future__ import annotations

import logging

import kopf
from kubelora_operator.__main__ import QuietHandlerSuccess, kopf_settings
from kubelora_operator.controller import register
from kubelora_operator.controller.cache import CachedKube

from . import SETTINGS
from .test_handlers import FakeApiClient


def test_kopf_watches_no_resource_of_the_operators() -> None:
    # The LoRAFineTunes and the pods come from the operator's own watches (controller/list_watch.py:
    # kopf's per-event machinery was most of the operator's CPU in a ramp). A kopf resource handler
    # added to `register` would bring kopf's watch, and its per-object state, back: this test says so.
    registry = kopf.OperatorRegistry()
    register(registry, SETTINGS, CachedKube(FakeApiClient(), backoff=0))
    resource_handlers = [
        h.id for r in (registry._watching, registry._changing, registry._indexing, registry._spawning, registry._webhooks)
        for h in r.get_all_handlers()
    ]
    assert resource_handlers == []
    assert {h.id for h in registry._activities.get_all_handlers()} == {"watches"}  # startup and cleanup
    assert kopf_settings().posting.enabled is False


def test_kopfs_handler_succeeded_lines_are_dropped_and_its_failures_kept() -> None:
    quiet = QuietHandlerSuccess()

    def record(level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord("kopf.objects", level, __file__, 1, msg, None, None)

    assert not quiet.filter(record(logging.INFO, "Handler 'worker-pods' succeeded."))
    assert quiet.filter(record(logging.ERROR, "Handler 'reconcile' failed with an exception and will try again"))
    assert quiet.filter(record(logging.WARNING, "Handler 'reconcile' succeeded."))  # not kopf's INFO line
    assert quiet.filter(record(logging.INFO, "Deletion, but no known finalizers"))
