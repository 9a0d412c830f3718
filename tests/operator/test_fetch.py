"""Sources in pods (fetch.py): the fetch pod, the workers' source volumes and config paths, validation."""

from __future__ import annotations

from typing import Any

import yaml
from kubelora_operator.controller.validate_create import reference_problems
from kubelora_operator.fetch import fetch_pod, needs_fetch
from kubelora_operator.placement import decide_placement
from kubelora_operator.plan import plan
from kubelora_operator.validation import check_resource, references
from kubelora_trainer.hub_fetch import hub_cache_dir
from kubelora_trainer.sources import cached_path

from . import SETTINGS, amx_node, raw_spec, resource

S3_MODEL = "s3://models/org/my-model"
ENDPOINT = "http://s3.example:8333"
SOURCES = {
    "model": {"nameOrPath": S3_MODEL},
    "data": {"path": "pvc://datasets/sets/train.jsonl", "evalPath": "s3://data/heldout.jsonl"},
    "sources": {
        "s3": {"endpoint": ENDPOINT, "verifyTls": False, "credentialsSecret": {"name": "s3-creds"}},
        "cachePvc": {"claimName": "model-cache"},
    },
    "workers": 2,
    "device": "cpu",
}


def test_workers_read_fetched_paths_from_read_only_volumes() -> None:
    res = resource(**SOURCES)
    p = plan(res, decide_placement(res.spec, [amx_node("c1"), amx_node("c2")], SETTINGS), SETTINGS)
    cfg = yaml.safe_load(p.config_map["data"]["config.yaml"])
    assert cfg["model"]["nameOrPath"] == cached_path(S3_MODEL, "/sources", ENDPOINT)
    assert cfg["data"]["path"] == "/source-pvcs/datasets/sets/train.jsonl"
    assert cfg["data"]["evalPath"].endswith("/heldout.jsonl") and cfg["data"]["evalPath"].startswith("/sources/")
    assert "sources" not in cfg or not cfg["sources"].get("s3")  # workers never fetch
    for pod in p.pods:
        vols = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert vols["sources"]["persistentVolumeClaim"] == {"claimName": "model-cache"}
        assert mounts["/sources"]["readOnly"] is True
        assert vols["source-pvc-0"]["persistentVolumeClaim"] == {"claimName": "datasets", "readOnly": True}
        assert mounts["/source-pvcs/datasets"]["readOnly"] is True
        env = pod["spec"]["containers"][0]["env"]
        assert not [e for e in env if e["name"].startswith("AWS_")]  # source credentials stay in the fetch pod


def test_fetch_pod_is_restricted_with_secret_credentials_and_no_accelerator() -> None:
    res = resource(**SOURCES)
    pod = fetch_pod(res, SETTINGS, "xpu")
    assert pod["metadata"]["name"] == "demo-fetch"
    assert pod["metadata"]["labels"]["kubelora.dev/role"] == "fetch"
    assert pod["metadata"]["ownerReferences"][0]["uid"] == "uid-1234"
    spec = pod["spec"]
    (c,) = spec["containers"]
    assert c["command"] == [
        "python", "-m", "kubelora_trainer.cli", "fetch", "--cache", "/sources", "--endpoint", ENDPOINT,
        "--no-verify-tls", "--", S3_MODEL, "/source-pvcs/datasets/sets/train.jsonl", "s3://data/heldout.jsonl",
    ]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert not [k for part in c["resources"].values() for k in part if "gpu" in k]
    aws = {e["name"]: e for e in c["env"] if e["name"].startswith("AWS_")}
    assert set(aws) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all("value" not in e and e["valueFrom"]["secretKeyRef"]["name"] == "s3-creds" for e in aws.values())
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert "readOnly" not in mounts["/sources"] and mounts["/source-pvcs/datasets"]["readOnly"] is True


def test_without_a_cache_pvc_the_run_claim_holds_a_per_run_copy() -> None:
    res = resource(model={"nameOrPath": S3_MODEL})
    mounts = {m["mountPath"]: m for m in fetch_pod(res, SETTINGS, "cpu")["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/sources"]["subPath"] == ".kubelora-sources/team-a/demo"
    pod = fetch_pod(res, SETTINGS, "cpu")
    assert {v["name"]: v for v in pod["spec"]["volumes"]}["sources"]["persistentVolumeClaim"]["claimName"] == "runs"
    assert pod["spec"]["containers"][0]["command"][-2:] == ["--", S3_MODEL]


def test_plain_sources_need_no_fetch_pod() -> None:
    assert not needs_fetch(resource().spec)
    no_claim = {"pvc": None, "s3": {"uri": "s3://out/run"}}
    assert not needs_fetch(resource(model={"nameOrPath": "org/name"}, output=no_claim).spec)  # nowhere to cache it
    assert needs_fetch(resource(data={"path": "pvc://d/x.jsonl"}).spec)


HUB = {
    "model": {"nameOrPath": "org/name", "revision": "v1"},
    "secrets": {"hubTokenSecret": {"name": "hf", "key": "token"}},
    "sources": {"cachePvc": {"claimName": "model-cache"}},
}


def test_a_hub_model_is_fetched_once_with_the_token_and_workers_load_it_offline() -> None:
    res = resource(**HUB)
    uri = "hf://org/name@v1"
    (c,) = fetch_pod(res, SETTINGS, "cpu")["spec"]["containers"]
    assert c["command"][-2:] == ["--", uri]
    token = [e for e in c["env"] if e["name"] == "HF_TOKEN"]
    assert token == [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/sources"]["name"] == "sources" and "/cache" in mounts  # HF_HOME: writable, not the image
    p = plan(res, decide_placement(res.spec, [amx_node("c1")], SETTINGS), SETTINGS)
    assert yaml.safe_load(p.config_map["data"]["config.yaml"])["model"]["nameOrPath"] == "org/name"  # the id stays
    for pod in p.pods:
        (w,) = pod["spec"]["containers"]
        env = {e["name"]: e for e in w["env"]}
        assert "HF_TOKEN" not in env  # the token stays in the fetch pod
        assert env["HF_HUB_OFFLINE"]["value"] == "1"
        assert env["HF_HUB_CACHE"]["value"] == hub_cache_dir(uri, "/sources")
        assert env["HF_HUB_CACHE"]["value"].startswith("/sources/") and env["HF_HUB_CACHE"]["value"].endswith("/hub")
        assert {m["mountPath"]: m for m in w["volumeMounts"]}["/sources"]["readOnly"] is True
        assert {v["name"]: v for v in pod["spec"]["volumes"]}["sources"]["persistentVolumeClaim"] == {
            "claimName": "model-cache"}


def test_a_hub_model_without_a_cache_claim_is_downloaded_by_the_workers_as_before() -> None:
    res = resource(**{**HUB, "sources": {}}, output={"pvc": None, "s3": {"uri": "s3://out/run"}})
    p = plan(res, decide_placement(res.spec, [amx_node("c1")], SETTINGS), SETTINGS)
    env = {e["name"] for e in p.pods[0]["spec"]["containers"][0]["env"]}
    assert "HF_TOKEN" in env and "HF_HUB_OFFLINE" not in env and "HF_HUB_CACHE" not in env


def test_a_hub_model_on_the_run_claim_gets_a_per_run_cache() -> None:
    res = resource(**{**HUB, "sources": {}})
    mounts = {m["mountPath"]: m for m in fetch_pod(res, SETTINGS, "cpu")["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/sources"]["subPath"] == ".kubelora-sources/team-a/demo"


def problems(**over: Any) -> list[str]:
    return check_resource("demo", raw_spec(**over), SETTINGS)[1]


def test_validation_of_sources() -> None:
    assert problems(**SOURCES) == []
    no_claim = problems(model={"nameOrPath": S3_MODEL}, output={"pvc": None, "s3": {"uri": "s3://out/run"}})
    assert no_claim == [
        "spec.model.nameOrPath: an s3:// source is fetched once for all workers into a claim: set "
        "spec.sources.cachePvc (a model cache reused across runs), or give the run dir a claim (output.pvc or "
        "output.s3.workdirPvc)"
    ]
    assert problems(data={"path": "pvc://datasets"}) == [
        "spec.data.path: 'pvc://datasets': expected pvc://CLAIM/PATH with a PVC name and a relative path without '..'"
    ]
    assert problems(data={"path": "pvc://d/../etc/passwd"})[0].startswith("spec.data.path: 'pvc://d/../etc/passwd'")
    refs = {(r.kind, r.name, r.field, r.key) for r in references(resource(**SOURCES).spec)}
    assert {
        ("Secret", "s3-creds", "sources.s3.credentialsSecret", "AWS_ACCESS_KEY_ID"),
        ("Secret", "s3-creds", "sources.s3.credentialsSecret", "AWS_SECRET_ACCESS_KEY"),
        ("PersistentVolumeClaim", "model-cache", "sources.cachePvc.claimName", None),
        ("PersistentVolumeClaim", "datasets", "data.path", None),
    } <= refs


def test_tracking_reaches_the_trainer_config() -> None:
    res = resource(tracking={"tensorboard": False, "mlflow": {"trackingUri": "http://mlflow:5000", "experiment": "x"}})
    p = plan(res, decide_placement(res.spec, [amx_node("c1")], SETTINGS), SETTINGS)
    cfg = yaml.safe_load(p.config_map["data"]["config.yaml"])
    assert cfg["tracking"] == {
        "tensorboard": False, "mlflow": {"trackingUri": "http://mlflow:5000", "experiment": "x"}
    }


class Objects:
    """The three reads reference_problems makes, answered from dicts (PVC access modes, Secret keys)."""

    def __init__(self, modes: dict[str, list[str]]) -> None:
        self.modes = modes

    def read_pvc(self, namespace: str, name: str) -> dict[str, Any] | None:
        return {"spec": {"accessModes": self.modes[name]}} if name in self.modes else None

    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return {"data": {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}}

    def read_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        return None


def test_a_pvc_source_is_read_only_the_cache_is_written() -> None:
    spec = resource(**SOURCES).spec  # 2 workers
    ok = Objects({"runs": ["ReadWriteMany"], "model-cache": ["ReadWriteMany"], "datasets": ["ReadOnlyMany"]})
    assert reference_problems(ok, "team-a", spec) == []  # type: ignore[arg-type]
    rox_cache = Objects({"runs": ["ReadWriteMany"], "model-cache": ["ReadOnlyMany"], "datasets": ["ReadOnlyMany"]})
    assert [m for _, m in reference_problems(rox_cache, "team-a", spec)] == [  # type: ignore[arg-type]
        "PVC 'model-cache' has access modes ReadOnlyMany; 2 workers on several nodes need ReadWriteMany"
    ]
