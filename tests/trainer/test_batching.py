"""The unset `training.paddingFree` default, case by case (the measured table in docs/benchmarks.md)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from kubelora_trainer.batching import choose_padding_free, padding_free_default
from kubelora_trainer.config import parse_config
from kubelora_trainer.recipe import LoRAFineTuneRecipe

from .conftest import tiny_config


@pytest.mark.parametrize(("device_type", "dtype", "padding_free"), [
    ("cpu", "fp32", True),    # 2-core AVX2, fp32: 1.30x faster padding-free
    ("cpu", "bf16", False),   # AMX Xeon, bf16: padded rows 2.1x faster
    ("cpu", "fp16", False),
    ("cuda", "bf16", False),  # H100: padded rows 3.3-10x faster
    ("cuda", "fp32", False),
    ("xpu", "bf16", False),
])
def test_unset_padding_free_follows_device_and_dtype(device_type: str, dtype: str, padding_free: bool) -> None:
    chosen, reason = padding_free_default(device_type, dtype)
    assert chosen is padding_free
    assert device_type in reason or "CPU" in reason
    assert ("fp32" in reason) == (device_type == "cpu" and dtype == "fp32")


@pytest.mark.parametrize(("dtype", "padding_free"), [("fp32", True), ("bf16", False)])
def test_a_cpu_run_picks_its_batch_format_from_the_dtype(
    tiny_model_dir: Path, tmp_path: Path, dtype: str, padding_free: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """bf16 on a CPU trained on padded rows (it was padding-free on every CPU before); asked-for wins."""
    cfg = parse_config(tiny_config(tiny_model_dir, tmp_path / "run", model={"dtype": dtype}, training={"maxSteps": 1}))
    recipe = LoRAFineTuneRecipe(cfg)
    with caplog.at_level(logging.INFO, logger="kubelora.trainer"):
        recipe.run()
    assert recipe.padding_free is padding_free
    assert f"a CPU in {dtype}" in caplog.text
    assert choose_padding_free(not padding_free, False, recipe.device.type, recipe.dtype)[0] is not padding_free
