"""Operator settings: defaults, YAML file, env overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubelora_operator.settings import OperatorSettings, SettingsError, load_settings, parse_label


def test_defaults() -> None:
    s = load_settings(environ={})
    assert s == OperatorSettings()
    assert s.gpu_resource == "gpu.intel.com/i915"
    assert s.amx_node_label == "feature.node.kubernetes.io/cpu-cpuid.AMXBF16=true"
    assert (s.image_for("cpu"), s.image_for("xpu")) == ("kubelora/trainer-cpu:0.1.0", "kubelora/trainer-xpu:0.1.0")
    assert s.ccl_env["CCL_ATL_TRANSPORT"] == "ofi" and s.ccl_env["FI_PROVIDER"] == "tcp"
    assert (s.master_port, s.metrics_port) == (29500, 9400)


def test_file_then_env(tmp_path: Path) -> None:
    f = tmp_path / "settings.yaml"
    f.write_text("gpuResource: gpu.intel.com/xe\nmasterPort: 23456\ncclEnv: {FI_PROVIDER: psm3}\n")
    s = load_settings(environ={"KUBELORA_SETTINGS_FILE": str(f), "KUBELORA_MASTER_PORT": "24000"})
    assert s.gpu_resource == "gpu.intel.com/xe"
    assert s.master_port == 24000
    assert s.ccl_env == {"FI_PROVIDER": "psm3"}
    s2 = load_settings(environ={"KUBELORA_CCL_ENV": '{"A": "1"}', "KUBELORA_GPU_NODE_LABEL": "x=y"}, path=f)
    assert s2.ccl_env == {"A": "1"} and s2.gpu_node_label == "x=y"


def test_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="masterPort|master_port"):
        load_settings(environ={"KUBELORA_MASTER_PORT": "80"})
    with pytest.raises(SettingsError, match="JSON"):
        load_settings(environ={"KUBELORA_CCL_ENV": "{nope"})
    bad = tmp_path / "s.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(environ={}, path=bad)
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(environ={}, path=tmp_path / "missing.yaml")


def test_parse_label() -> None:
    assert parse_label("a/b=true") == ("a/b", "true")
    assert parse_label("a/b") == ("a/b", None)


def test_placement_settings_from_env_and_their_errors() -> None:
    s = load_settings(
        environ={
            "KUBELORA_WHEN_NO_NODE_MATCHES": "Wait",
            "KUBELORA_PLACEMENT_WAIT_SECONDS": "600",
            "KUBELORA_AUTO_DEVICE_PREFERENCE": '["cpu", "xpu"]',
        }
    )
    assert (s.when_no_node_matches, s.placement_wait_seconds, s.auto_device_preference) == ("Wait", 600, ["cpu", "xpu"])
    with pytest.raises(SettingsError, match="each device at most once"):
        load_settings(environ={"KUBELORA_AUTO_DEVICE_PREFERENCE": '["xpu", "xpu"]'})
    with pytest.raises(SettingsError, match="when_no_node_matches|whenNoNodeMatches"):
        load_settings(environ={"KUBELORA_WHEN_NO_NODE_MATCHES": "Sometimes"})
