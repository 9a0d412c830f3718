"""Every trainer example config loads, and the seed recipes keep their defining settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubelora_trainer.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples" / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_loads(path: Path) -> None:
    cfg = load_config(path)
    assert Path(cfg.data.path).is_file()


def test_ipex_llm_recipe() -> None:
    cfg = load_config(EXAMPLES[0].parent / "ipex-llm-lora.yaml")
    assert cfg.model.dtype == "bf16" and cfg.model.quantization == "none"
    assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"}
    assert (cfg.training.learning_rate, cfg.training.lr_scheduler, cfg.training.max_grad_norm) == (3e-5, "cosine", 0.3)


def test_xeon_whitepaper_recipe() -> None:
    cfg = load_config(EXAMPLES[0].parent / "xeon-amx-whitepaper.yaml")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules, cfg.lora.init) == (8, 16, "all-linear", "olora")
    t = cfg.training
    assert (t.learning_rate, t.warmup_steps, t.micro_batch_size, t.eval_steps, t.save_total_limit) == (2e-4, 20, 4, 5, 3)
    assert cfg.data.packing
