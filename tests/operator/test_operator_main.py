"""The operator's kopf settings (`kubelora_operator.__main__`)."""

from __future__ import annotations

import logging

import kopf
from kubelora_operator.__main__ import EventOnlyDiffBase, QuietHandlerSuccess, kopf_settings
from kubelora_operator.controller import register
from kubelora_operator.controller.cache import CachedKube

from . import SETTINGS
from .test_handlers import FakeApiClient


def test_no_handler_reads_a_diff_base_so_kopf_builds_an_empty_one() -> None:
    # kopf reads the diff base only for on.create/update/resume (changing) handlers; with none
    # registered, an empty essence is exact and saves a deep copy of every watched body. A changing
    # handler added to `register` must come with kopf's own diff base again: this test says so.
    registry = kopf.OperatorRegistry()
    register(registry, SETTINGS, CachedKube(FakeApiClient(), backoff=0))
    changing = [h.id for h in registry._changing.get_all_handlers()]
    assert changing == [], f"changing handlers {changing} need kopf.AnnotationsDiffBaseStorage in kopf_settings"
    assert [h.id for h in registry._watching.get_all_handlers()]  # the on.event handlers are there

    storage = kopf_settings().persistence.diffbase_storage
    assert isinstance(storage, EventOnlyDiffBase)
    body = kopf.Body({"metadata": {"name": "a", "annotations": {"x": "1"}}, "spec": {"workers": 2}})
    assert storage.build(body=body) == {} and storage.fetch(body=body) == {}


def test_kopfs_handler_succeeded_lines_are_dropped_and_its_failures_kept() -> None:
    quiet = QuietHandlerSuccess()

    def record(level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord("kopf.objects", level, __file__, 1, msg, None, None)

    assert not quiet.filter(record(logging.INFO, "Handler 'worker-pods' succeeded."))
    assert quiet.filter(record(logging.ERROR, "Handler 'reconcile' failed with an exception and will try again"))
    assert quiet.filter(record(logging.WARNING, "Handler 'reconcile' succeeded."))  # not kopf's INFO line
    assert quiet.filter(record(logging.INFO, "Deletion, but no known finalizers"))
