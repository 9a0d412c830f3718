"""The config contract: strict keys, both spellings, overrides, bundled sample paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubelora_trainer.config import ConfigError, TrainerConfig, apply_overrides, dump_config, load_config, parse_config


def test_unknown_key_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"training\.microBatchSzie: Extra inputs are not permitted"):
        parse_config({"data": {"path": "x.jsonl"}, "training": {"microBatchSzie": 2}})


def test_camel_and_snake_case_both_accepted() -> None:
    a = parse_config({"data": {"path": "x"}, "training": {"microBatchSize": 3}})
    b = parse_config({"data": {"path": "x"}, "training": {"micro_batch_size": 3}})
    assert a.training.micro_batch_size == b.training.micro_batch_size == 3


def test_dump_round_trips_with_camel_case_keys() -> None:
    cfg = parse_config({"data": {"path": "x", "cutoffLen": 64}, "lora": {"targetModules": ["q_proj"]}})
    text = dump_config(cfg)
    assert "cutoffLen: 64" in text and "targetModules:" in text
    import yaml

    assert TrainerConfig.model_validate(yaml.safe_load(text)) == cfg


def test_dump_keeps_nulls_that_switch_a_default_off() -> None:
    """Dumped without them (the operator's ConfigMap), `saveMinutes: null` came back as 10 minutes."""
    import yaml

    cfg = parse_config({"data": {"path": "x"}, "training": {"saveMinutes": None, "maxGradNorm": None}})
    back = TrainerConfig.model_validate(yaml.safe_load(dump_config(cfg)))
    assert back.training.save_minutes is None and back.training.max_grad_norm is None
    assert back == cfg
    assert "ggufFile" not in dump_config(cfg)  # unset optional fields stay out


def test_dump_round_trips_strings_that_need_quoting() -> None:
    """dump_config writes its YAML itself for speed (plain_yaml.py): what it writes must read back as
    the same config, quoted and escaped strings included."""
    import yaml

    odd = ["a: b", "trailing ", " lead", "üñíçødé", "x" * 200, "'q'", "#h", "null", "yes", "1e3", "- d", "long words " * 30]
    cfg = parse_config({"data": {"path": "s3://b/" + "/".join(odd), "cutoffLen": 64},
                        "lora": {"targetModules": odd}, "training": {"saveMinutes": None}})
    assert TrainerConfig.model_validate(yaml.safe_load(dump_config(cfg))) == cfg


def test_set_overrides_parse_yaml_scalars() -> None:
    raw = apply_overrides({"data": {"path": "x"}}, ["training.maxSteps=20", "lora.targetModules=[q_proj, v_proj]",
                                                    "output.merge=true"])
    cfg = parse_config(raw)
    assert cfg.training.max_steps == 20 and cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.output.merge


def test_set_without_equals_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["training.maxSteps"])


def test_custom_template_requires_its_string() -> None:
    with pytest.raises(ConfigError, match="customTemplate is not set"):
        parse_config({"data": {"path": "x", "template": "custom"}})


def test_unknown_template_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"data\.template: Input should be 'alpaca', 'alpaca_legacy', 'chat' or 'custom'"):
        parse_config({"data": {"path": "x", "template": "vicuna"}})


def test_sample_paths_resolve_to_bundled_files(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  path: sample://train.jsonl\n  evalPath: sample://heldout.jsonl\n")
    cfg = load_config(cfg_file)
    assert Path(cfg.data.path).is_file() and cfg.data.path.endswith("sample_data/train.jsonl")
    cfg_file.write_text("data:\n  path: sample://nope.jsonl\n")
    with pytest.raises(ConfigError, match="available: heldout.jsonl, train.jsonl"):
        load_config(cfg_file)


def test_relative_data_path_resolves_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "c.yaml").write_text("data:\n  path: d.jsonl\n")
    assert load_config(tmp_path / "c.yaml").data.path == str((tmp_path / "d.jsonl").resolve())


def test_missing_and_malformed_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_config_module_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, kubelora_trainer.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
