#!/usr/bin/env bash
# README line 1: a real LoRA fine-tune of SmolLM2-135M on the bundled sample tasks, on CPU.
# Writes runs/quickstart/ (adapter/, metrics, loss.png, samples.md, summary.json).
set -euo pipefail
cd "$(dirname "$0")/.."
KUBELORA_EXTRAS="${KUBELORA_EXTRAS:-trainer}" bash scripts/setup.sh
exec .venv/bin/kubelora-train run examples/trainer/quickstart.yaml --set output.overwrite=true "$@"
