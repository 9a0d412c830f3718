"""Fixtures for trainer runs: a tiny random Llama (fast) and configs that point at it.

The tiny model uses SmolLM2's real tokenizer so that templates, masking and packing are the
production ones; only the network is small and random. It is for checking mechanics (resume,
export, logits equality), never for claims about quality: those use the real SmolLM2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.s3server import S3Server

from . import build_tiny_llama

SAMPLE = Path(__file__).resolve().parents[2] / "trainer" / "kubelora_trainer" / "sample_data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def tiny_config(model_dir: Path, run_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A raw trainer config for the tiny model on the bundled data, with per-test overrides."""
    cfg: dict[str, Any] = {
        "model": {"nameOrPath": str(model_dir), "dtype": "fp32"},
        "data": {
            "path": str(SAMPLE / "train.jsonl"),
            "evalPath": str(SAMPLE / "heldout.jsonl"),
            "maxSamples": 256,
            "maxEvalSamples": 16,
            "cutoffLen": 128,
        },
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"maxSteps": 6, "microBatchSize": 2, "learningRate": 5e-3, "loggingSteps": 1, "seed": 7},
        "evaluation": {"maxExactMatchSamples": 4, "maxNewTokens": 4, "samplePrompts": 2},
        "output": {"dir": str(run_dir), "plot": True},
        "device": "cpu",
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """The real S3 server's credentials in the env, the termination log in tmp, no operator run id."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("kubelora_trainer.cli.TERMINATION_LOG", tmp_path / "termination-log")
    monkeypatch.delenv("KUBELORA_RUN_ID", raising=False)
    return s3_server
