"""The resource models and the checks beyond the schema."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from kubelora_operator.api import (
    LoRAFineTuneResource,
    LoRAFineTuneSpec,
    LoRAFineTuneStatus,
    SpecError,
    parse_spec,
)
from kubelora_operator.k8s_types import parse_quantity
from kubelora_operator.validation import check_resource, pvc_problems, references, validate_name, validate_spec
from kubelora_trainer.config import DataConfig, LoraSettings, ModelConfig, TrainingConfig

from . import SETTINGS, raw_spec


def problems(**over: Any) -> list[str]:
    return validate_spec(parse_spec(raw_spec(**over)), SETTINGS)


def test_spec_embeds_the_trainer_models() -> None:
    spec = parse_spec(raw_spec())
    assert type(spec.model) is ModelConfig and type(spec.data) is DataConfig
    assert type(spec.lora) is LoraSettings and type(spec.training) is TrainingConfig
    assert spec.training.max_steps == 20
    assert (spec.device, spec.workers, spec.distributed.launcher, spec.backoff_limit) == ("auto", 1, "torchrun", 3)
    # Field definitions mirrored from the trainer are reused, not re-declared.
    assert LoRAFineTuneSpec.model_fields["lora"].description == "LoRA adapter settings."


def test_camel_and_snake_input_and_unknown_keys() -> None:
    a = parse_spec(raw_spec(training={"microBatchSize": 2}))
    b = parse_spec(raw_spec(training={"micro_batch_size": 2}))
    assert a == b
    with pytest.raises(SpecError, match=r"spec\.training\.microBatchSze"):
        parse_spec(raw_spec(training={"microBatchSze": 2}))


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"workers": 0}, "spec.workers"),
        ({"device": "cuda"}, "spec.device"),
        ({"resources": {"cpu": "lots"}}, "not a Kubernetes quantity"),
        ({"resources": {"memory": "0"}}, "greater than zero"),
        ({"output": {"s3": {"uri": "s3://b/x"}}}, "exactly one of pvc or s3"),
        ({"output": {"pvc": {"claimName": "runs", "subPath": "../etc"}}}, "relative path"),
        ({"output": {"pvc": {"claimName": "Bad_Name"}}}, "claimName"),
        ({"dataVolume": {}}, "exactly one of pvc or configMap"),
        ({"distributed": {"deepspeedStage": 1}}, "deepspeedStage"),
        ({"distributed": {"launcher": "srun"}}, "launcher"),
        ({"distributed": {"env": [{"name": "A", "value": "1", "valueFrom": {}}]}}, "not both"),
        ({"lora": {"targetModules": []}}, "targetModules is empty"),
        ({"imagePullSecrets": ["Reg_Cred"]}, "spec.imagePullSecrets.0"),
        ({"imagePullSecrets": [f"r{i}" for i in range(17)]}, "at most 16"),
    ],
)
def test_schema_level_rejections(over: dict[str, Any], needle: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(raw_spec(**over))
    assert needle in str(err.value)


def test_quantities() -> None:
    assert parse_quantity("500m") == Decimal("0.5")
    assert parse_quantity("16Gi") == 16 * 2**30
    assert parse_quantity("1e3") == 1000
    assert parse_quantity(4) == 4
    assert parse_quantity("128974848") == 128974848
    with pytest.raises(ValueError):
        parse_quantity("4 cores")
    spec = parse_spec(raw_spec(resources={"cpu": 8, "memory": "32Gi"}))
    assert spec.resources.cpu == "8"


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"device": "xpu", "resources": {"gpus": 0}}, "resources.gpus is 0 but device is xpu"),
        (
            {"device": "xpu", "resources": {"gpus": 2}, "distributed": {"procsPerWorker": 3}},
            "procsPerWorker (3) must equal spec.resources.gpus (2)",
        ),
        ({"distributed": {"backend": "nccl"}}, "nccl needs CUDA"),
        ({"device": "cpu", "distributed": {"backend": "xccl"}}, "xccl needs Intel GPUs"),
        ({"device": "xpu", "distributed": {"backend": "gloo"}}, "gloo cannot reduce XPU"),
        ({"distributed": {"backend": "mpi"}}, "mpi needs launcher mpirun"),
        (
            {"workers": 2, "distributed": {"launcher": "mpirun", "deepspeedStage": 2}},
            "supported with launcher torchrun only",
        ),
        ({"device": "cpu", "distributed": {"deepspeedStage": 3}}, "only one"),
        ({"distributed": {"env": [{"name": "RANK", "value": "3"}]}}, "RANK is set by the operator"),
        ({"distributed": {"cclEnv": {"BAD NAME": "1"}}}, "not a valid environment variable"),
        ({"lora": {"targetModules": ["q_proj", "qkv_proj"]}}, "qkv_proj not in model smollm2-135m"),
        ({"data": {"path": "sample://../etc/passwd"}}, "not a bundled sample"),
        ({"data": {"path": "/data/train.jsonl"}}, "no dataVolume is mounted"),
        ({"data": {"path": "train.jsonl"}}, "relative file path 'train.jsonl'"),
        (
            {"data": {"path": "/mnt/x.jsonl"}, "dataVolume": {"configMap": {"name": "d", "mountPath": "/data"}}},
            "the dataVolume is mounted at /data",
        ),
        ({"dataVolume": {"pvc": {"claimName": "d", "mountPath": "/output/data"}}}, "collides with /output"),
        ({"data": {"template": "custom"}}, "customTemplate is not set"),
        ({"workers": 4, "data": {"maxSamples": 8}}, "maxSamples (8) is smaller than one batch per process"),
    ],
)
def test_validate_spec_messages(over: dict[str, Any], needle: str) -> None:
    found = problems(**over)
    assert any(needle in p for p in found), found


def test_a_model_path_off_any_volume_is_not_told_to_use_bundled_data() -> None:
    """sample:// names bundled data files only: the model's message must not suggest it (issue 12)."""
    (model,) = [p for p in problems(model={"nameOrPath": "/models/llama"}) if p.startswith("spec.model")]
    assert "is not on a mounted volume" in model and "sample://" not in model, model
    (data,) = [p for p in problems(data={"path": "/data/train.jsonl"}) if p.startswith("spec.data")]
    assert "sample://NAME for bundled data" in data, data


def test_valid_specs_have_no_problems() -> None:
    assert problems() == []
    assert problems(lora={"targetModules": ["q_proj", "v_proj"]}) == []
    assert problems(model={"nameOrPath": "org/other-model"}, lora={"targetModules": ["qkv"]}) == []
    assert problems(data={"path": "/data/t.jsonl"}, dataVolume={"pvc": {"claimName": "ds"}}) == []
    assert problems(data={"path": "tatsu-lab/alpaca"}) == []  # a hub id
    assert problems(image="me/trainer-with-data:1", data={"path": "/opt/data.jsonl"}) == []
    assert problems(device="cpu", distributed={"procsPerWorker": 4}) == []
    assert problems(workers=2, distributed={"launcher": "mpirun", "backend": "mpi"}) == []


def test_procs_per_worker_defaults() -> None:
    spec = parse_spec(raw_spec(resources={"gpus": 4}))
    assert (spec.procs_per_worker("xpu"), spec.procs_per_worker("cpu")) == (4, 1)
    spec = parse_spec(raw_spec(distributed={"procsPerWorker": 2}))
    assert (spec.procs_per_worker("xpu"), spec.procs_per_worker("cpu")) == (2, 2)


def test_names() -> None:
    assert validate_name("demo", 8) == []
    assert "must start with a letter" in validate_name("1demo", 1)[0]
    assert "too long" in validate_name("a" * 54, 11)[0]
    assert validate_name("a" * 54, 1) == []  # a-...-worker-0 is 63


def test_check_resource_collects_everything() -> None:
    spec, found = check_resource("demo", raw_spec(), SETTINGS)
    assert spec is not None and found == []
    spec, found = check_resource("Demo", raw_spec(device="xpu", resources={"gpus": 0}), SETTINGS)
    assert spec is None and len(found) == 2
    spec, found = check_resource("demo", {"output": {}}, SETTINGS)
    assert spec is None and any("spec.data" in p for p in found)


def test_references_for_existence_checks() -> None:
    spec = parse_spec(
        raw_spec(
            output={
                "pvc": None,
                "s3": {"uri": "s3://b/p", "credentialsSecret": {"name": "s3c"}, "workdirPvc": {"claimName": "scratch"}},
            },
            dataVolume={"pvc": {"claimName": "datasets"}},
            secrets={"hubTokenSecret": {"name": "hf", "key": "token"}},
            imagePullSecrets=["regcred"],
        )
    )
    refs = {(r.kind, r.name, r.key) for r in references(spec)}
    assert refs == {
        ("Secret", "regcred", None),
        ("PersistentVolumeClaim", "scratch", None),
        ("Secret", "s3c", "AWS_ACCESS_KEY_ID"),
        ("Secret", "s3c", "AWS_SECRET_ACCESS_KEY"),
        ("PersistentVolumeClaim", "datasets", None),
        ("Secret", "hf", "token"),
    }
    missing = next(r for r in references(spec) if r.name == "hf")
    assert missing.reason.value == "SecretNotFound"
    assert (
        missing.missing_message() == "spec.secrets.hubTokenSecret: Secret 'hf' (key 'token') not found in the namespace"
    )


def test_pvc_access_modes() -> None:
    one = parse_spec(raw_spec())
    two = parse_spec(raw_spec(workers=2))
    assert pvc_problems(one, "runs", ["ReadWriteOnce"], read_only=False) == []
    assert "need ReadWriteMany" in pvc_problems(two, "runs", ["ReadWriteOnce"], read_only=False)[0]
    assert pvc_problems(two, "data", ["ReadOnlyMany"], read_only=True) == []


def test_resource_from_body() -> None:
    body = {"metadata": {"name": "x", "namespace": "ns", "uid": "u", "generation": 4}, "spec": raw_spec()}
    res = LoRAFineTuneResource.from_body(body)
    assert (res.name, res.namespace, res.uid, res.generation) == ("x", "ns", "u", 4)
    with pytest.raises(SpecError):
        LoRAFineTuneResource.from_body({"metadata": {"name": "x"}, "spec": {}})


def test_status_round_trip_ignores_unknown_keys() -> None:
    status = LoRAFineTuneStatus.model_validate(
        {"phase": "Running", "progress": {"step": 3, "totalSteps": 10, "percent": 30}, "kopf": {"x": 1}, "restarts": 1}
    )
    assert status.progress is not None and status.progress.total_steps == 10
    assert status.model_dump(by_alias=True, exclude_none=True)["progress"] == {
        "step": 3,
        "totalSteps": 10,
        "percent": 30,
    }
