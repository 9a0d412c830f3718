"""`kubelora submit`'s pure part: a laptop trainer config plus `cluster:` becomes a valid LoRAFineTune."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubelora_operator.api import parse_spec
from kubelora_operator.submit import SubmitError, default_name, resource_from_config

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "trainer" / "quickstart.yaml"


def quickstart(**cluster: object) -> dict:
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["cluster"] = cluster
    return raw


def test_quickstart_with_cluster_fields_becomes_a_valid_resource() -> None:
    raw = quickstart(namespace="ml", workers=2, output={"s3": {"uri": "s3://b/p", "credentialsSecret": {"name": "s"}}})
    lft = resource_from_config(raw, name="qs")
    assert lft["metadata"] == {"name": "qs", "namespace": "ml"}
    spec = parse_spec(lft["spec"])
    assert spec.workers == 2 and spec.training.max_steps == 90 and spec.data.path == "sample://train.jsonl"
    assert spec.output.s3 is not None and spec.output.s3.credentials_secret is not None
    assert "dir" not in lft["spec"]["output"]  # the run dir is the operator's


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"device": "cuda"}, "device: cuda"),
        ({"tracking": {"mlflow": {"trackingUri": ""}}}, "spec.tracking.mlflow.trackingUri"),
        ({"cluster": {}}, "set exactly one of pvc or s3"),
        ({"cluster": {"workers": 0, "output": {"pvc": {"claimName": "c"}}}}, "spec.workers"),
    ],
)
def test_bad_config_is_one_specific_line(change: dict, message: str) -> None:
    raw = {**quickstart(output={"pvc": {"claimName": "c"}}), **change}
    with pytest.raises(SubmitError, match=message.replace(".", r"\.")) as err:
        resource_from_config(raw, name="qs")
    assert "\n" not in str(err.value)


def test_tracking_and_s3_sources_are_carried() -> None:
    raw = quickstart(output={"pvc": {"claimName": "c"}}, sources={"s3": {"credentialsSecret": {"name": "s"}}})
    raw["model"] = {"nameOrPath": "s3://models/m"}
    raw["tracking"] = {"mlflow": {"trackingUri": "http://mlflow:5000"}}
    raw["sources"] = {"s3": {"endpoint": "http://s3:8333"}, "cacheDir": "/home/me/.cache/src"}
    spec = parse_spec(resource_from_config(raw, name="qs")["spec"])
    assert spec.tracking.mlflow is not None and spec.tracking.mlflow.tracking_uri == "http://mlflow:5000"
    assert spec.sources.s3 is not None and spec.sources.s3.endpoint == "http://s3:8333"
    assert spec.sources.s3.credentials_secret is not None and spec.model.name_or_path == "s3://models/m"


def test_default_name_is_dns_1123() -> None:
    assert default_name("My_Run.v2") == "my-run-v2" and default_name("___") == "lora-finetune"
