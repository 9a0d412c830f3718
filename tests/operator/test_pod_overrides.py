"""`spec.pod`: the bounded pod overrides, from validation to the rendered worker pods."""

from __future__ import annotations

from typing import Any

import pytest
from kubelora_operator.api import SpecError, parse_spec
from kubelora_operator.pod_overrides import is_operator_key, qualified_name_problem
from kubelora_operator.validation import references, validate_spec

from . import SETTINGS, raw_spec, resource
from .test_plan import AMX_NODES, container, make, mounts, volumes

POD: dict[str, Any] = {
    "labels": {"kueue.x-k8s.io/queue-name": "team-a", "cost-centre": "ml-42"},
    "annotations": {"sidecar.istio.io/inject": "false"},
    "runtimeClassName": "kata",
    "serviceAccountName": "trainer-wi",
    "shmSize": "8Gi",
    "volumes": [
        {"name": "proxy-ca", "configMap": {"name": "corp-ca"}},
        {"name": "tokens", "secret": {"secretName": "tokens", "optional": True}},
        {"name": "shared", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}},
        {"name": "scratch", "emptyDir": {"sizeLimit": "20Gi"}},
    ],
    "volumeMounts": [
        {"name": "proxy-ca", "mountPath": "/etc/ssl/corp", "readOnly": True},
        {"name": "shared", "mountPath": "/datasets", "subPath": "instruct"},
        {"name": "scratch", "mountPath": "/scratch"},
    ],
    "envFrom": [{"configMapRef": {"name": "proxy-env"}}, {"configMapRef": {"name": "extra"}, "prefix": "X_"}],
}


def test_every_override_is_rendered_into_every_worker() -> None:
    p = make(resource(workers=2, pod=POD))
    for pod in p.pods:
        meta, spec = pod["metadata"], pod["spec"]
        assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and meta["labels"]["cost-centre"] == "ml-42"
        assert meta["annotations"]["sidecar.istio.io/inject"] == "false"
        assert "kubelora.dev/config-sha256" in meta["annotations"]
        assert (spec["runtimeClassName"], spec["serviceAccountName"]) == ("kata", "trainer-wi")
        assert spec["automountServiceAccountToken"] is False
        assert volumes(pod)["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
        assert volumes(pod)["proxy-ca"] == {"name": "proxy-ca", "configMap": {"name": "corp-ca", "optional": False}}
        assert volumes(pod)["tokens"]["secret"] == {"secretName": "tokens", "optional": True}
        assert volumes(pod)["shared"]["persistentVolumeClaim"] == {"claimName": "datasets", "readOnly": True}
        assert volumes(pod)["scratch"]["emptyDir"] == {"sizeLimit": "20Gi"}
        assert mounts(pod)["/datasets"] == {"name": "shared", "mountPath": "/datasets", "readOnly": False,
                                            "subPath": "instruct"}
        assert mounts(pod)["/etc/ssl/corp"]["readOnly"] is True
        assert container(pod)["envFrom"] == [
            {"configMapRef": {"name": "proxy-env", "optional": False}},
            {"configMapRef": {"name": "extra", "optional": False}, "prefix": "X_"},
        ]
        assert {"/tmp", "/cache", "/dev/shm", "/etc/kubelora", "/output"} <= set(mounts(pod))


def test_overrides_leave_the_restricted_security_context_alone() -> None:
    plain = make(resource(device="cpu"), AMX_NODES).pods[0]
    shaped = make(resource(device="cpu", pod=POD), AMX_NODES).pods[0]
    assert shaped["spec"]["securityContext"] == plain["spec"]["securityContext"]
    assert container(shaped)["securityContext"] == container(plain)["securityContext"]
    for key in ("hostIPC", "hostNetwork", "hostPID"):
        assert key not in shaped["spec"]


def test_defaults_change_nothing() -> None:
    pod = make(resource()).pods[0]
    assert "runtimeClassName" not in pod["spec"] and "envFrom" not in container(pod)
    assert volumes(pod)["dshm"]["emptyDir"] == {"medium": "Memory"}


def test_every_key_the_operator_sets_is_reserved() -> None:
    """Drift guard: a label/annotation the plan sets must be one spec.pod cannot override."""
    pod = make(resource(pod={"labels": {"team": "a"}, "annotations": {"note": "x"}})).pods[0]
    own = [k for k in (*pod["metadata"]["labels"], *pod["metadata"]["annotations"]) if k not in ("team", "note")]
    assert own and all(is_operator_key(k) for k in own), [k for k in own if not is_operator_key(k)]


@pytest.mark.parametrize(
    ("pod", "needle"),
    [
        ({"labels": {"kubelora.dev/attempt": "9"}}, "'kubelora.dev/attempt' is set by the operator"),
        ({"labels": {"app.kubernetes.io/name": "x"}}, "'app.kubernetes.io/name' is set by the operator"),
        ({"annotations": {"kubelora.dev/config-sha256": "x"}}, "is set by the operator"),
        ({"annotations": {"x.kubelora.dev/y": "x"}}, "is set by the operator"),
        ({"labels": {"Bad_Domain/x": "y"}}, "prefix before '/' must be a DNS subdomain"),
        ({"labels": {"-x": "y"}}, "the name must be 1-63 characters"),
        ({"labels": {"team": "a b"}}, "label 'team': value 'a b'"),
        ({"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}, "hostPath"),
        ({"volumes": [{"name": "v", "emptyDir": {}, "secret": {"secretName": "s"}}]}, "exactly one of"),
        ({"volumes": [{"name": "output", "emptyDir": {}}]}, "volume name 'output' is used by the operator"),
        ({"volumes": [{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}]}, "listed twice"),
        ({"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, "'nope' is not in pod.volumes"),
        ({"volumeMounts": [{"name": "a", "mountPath": "/x", "subPath": "../etc"}]}, "relative path"),
        ({"envFrom": [{"secretRef": {"name": "s"}}]}, "secretRef"),
        ({"hostIPC": True}, "hostIPC"),
        ({"securityContext": {"privileged": True}}, "securityContext"),
        ({"shmSize": "lots"}, "not a Kubernetes quantity"),
        ({"runtimeClassName": "Kata_VM"}, "runtimeClassName"),
    ],
)
def test_rejections_are_specific(pod: dict[str, Any], needle: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(raw_spec(pod=pod))
    assert needle in str(err.value) and "spec.pod" in str(err.value)


def test_mount_paths_cannot_shadow_the_operators_or_the_data_volume() -> None:
    vol = [{"name": "v", "emptyDir": {}}]
    for path, needle in (
        ("/output", "collides with /output, which the operator uses"),
        ("/etc", "collides with /etc/kubelora"),
        ("/data/sub", "collides with /data, which the dataVolume uses"),
    ):
        spec = parse_spec(
            raw_spec(dataVolume={"configMap": {"name": "d"}}, pod={"volumes": vol,
                                                                  "volumeMounts": [{"name": "v", "mountPath": path}]})
        )
        problems = validate_spec(spec, SETTINGS)
        assert any(needle in p for p in problems), problems


def test_data_on_an_extra_volume_is_reachable() -> None:
    pod = {"volumes": [{"name": "ds", "persistentVolumeClaim": {"claimName": "ds"}}],
           "volumeMounts": [{"name": "ds", "mountPath": "/datasets"}]}
    assert validate_spec(parse_spec(raw_spec(data={"path": "/datasets/train.jsonl"}, pod=pod)), SETTINGS) == []
    problems = validate_spec(parse_spec(raw_spec(data={"path": "/elsewhere/train.jsonl"}, pod=pod)), SETTINGS)
    assert any("is not on a mounted volume" in p for p in problems)


def test_referenced_objects_are_checked_unless_optional() -> None:
    refs = {(r.kind, r.name, r.field) for r in references(parse_spec(raw_spec(pod=POD)))}
    assert {
        ("ConfigMap", "corp-ca", "pod.volumes[0].configMap.name"),
        ("PersistentVolumeClaim", "datasets", "pod.volumes[2].persistentVolumeClaim.claimName"),
        ("ConfigMap", "proxy-env", "pod.envFrom[0].configMapRef.name"),
        ("ConfigMap", "extra", "pod.envFrom[1].configMapRef.name"),
    } <= refs
    assert not any(name == "tokens" for _, name, _ in refs)  # optional: true


def test_qualified_names() -> None:
    assert qualified_name_problem("example.com/team") is None
    assert qualified_name_problem("team") is None
    assert qualified_name_problem("a" * 64) is not None
    assert qualified_name_problem("/team") is not None
