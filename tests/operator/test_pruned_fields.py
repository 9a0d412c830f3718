"""pruned_spec_fields: spec keys in kubectl's last-applied configuration that the server pruned.

The stored specs here are what the server keeps of the applied ones (unknown keys dropped, defaults
filled); tests/operator/test_integration_schema.py checks the same against the real API server.
"""

from __future__ import annotations

import json
from typing import Any

from kubelora_operator.pruned_fields import LAST_APPLIED, pruned_spec_fields

BASE: dict[str, Any] = {"data": {"path": "sample://train.jsonl"}, "output": {"pvc": {"claimName": "runs"}}}


def body(applied_spec: Any, stored_spec: dict[str, Any], annotation: str | None = None) -> dict[str, Any]:
    text = annotation if annotation is not None else json.dumps({"apiVersion": "kubelora.dev/v1alpha1",
                                                                 "kind": "LoRAFineTune", "spec": applied_spec})  # fmt: skip
    return {"metadata": {"name": "x", "annotations": {LAST_APPLIED: text}}, "spec": stored_spec}


def test_typos_at_any_depth_are_named() -> None:
    applied = {**BASE, "lora": {"rank": 32, "alpha": 8}, "trainig": {"epochs": 3}, "workers": 2}
    stored = {**BASE, "lora": {"r": 8, "alpha": 8}, "workers": 2}
    assert pruned_spec_fields(body(applied, stored)) == ["spec.lora.rank", "spec.trainig"]


def test_list_items_are_compared_by_position() -> None:
    applied = {**BASE, "distributed": {"env": [{"name": "A", "value": "1"}, {"name": "B", "valeu": "2"}]}}
    stored = {**BASE, "distributed": {"env": [{"name": "A", "value": "1"}, {"name": "B"}]}}
    assert pruned_spec_fields(body(applied, stored)) == ["spec.distributed.env[1].valeu"]
    # A list edited since (other length): nothing to compare.
    assert pruned_spec_fields(body(applied, {**BASE, "distributed": {"env": [{"name": "A", "value": "1"}]}})) == []


def test_free_form_objects_and_maps_keep_every_key() -> None:
    affinity = {"nodeAffinity": {"anything": 1}}
    applied = {**BASE, "placement": {"affinity": affinity, "tolerations": [{"key": "k", "whatever": 1}]},
               "data": {**BASE["data"], "fieldMap": {"instruction": "q"}}}  # fmt: skip
    assert pruned_spec_fields(body(applied, applied)) == []


def test_declared_keys_absent_from_the_stored_spec_are_not_typos() -> None:
    """A declared field sent as null is pruned like unset; one removed by a later patch leaves the
    annotation stale. Neither is an unknown key."""
    applied = {**BASE, "image": None, "lora": {"r": 16}}
    assert pruned_spec_fields(body(applied, {**BASE, "lora": {"alpha": 16}})) == []


def test_no_or_unreadable_annotation_reports_nothing() -> None:
    assert pruned_spec_fields({"metadata": {}, "spec": BASE}) == []
    assert pruned_spec_fields({"spec": BASE}) == []
    for text in ("not json", "[]", '{"spec": "x"}', "null", ""):
        assert pruned_spec_fields(body(None, BASE, annotation=text)) == [], text


def test_a_given_schema_is_used() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}}}
    applied = {"a": {"b": "x", "c": "y"}, "d": 1}
    assert pruned_spec_fields(body(applied, {"a": {"b": "x"}}), schema) == ["spec.a.c", "spec.d"]
