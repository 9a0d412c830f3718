# syntax=docker/dockerfile:1
# kubelora operator: Python + kopf + the kubernetes client, no torch (the `operator` extra only).
#
#   docker build -f docker/operator.Dockerfile -t kubelora/operator:0.1.0 .     # from the repository root
#
# Runs as uid 65532 with a read-only root filesystem; /tmp must be a writable mount (the chart mounts an
# emptyDir: ssh-keygen writes mpirun key pairs there). kopf's liveness endpoint listens on 8080.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
WORKDIR /src
# The package (both Python packages: the operator imports kubelora_trainer.config, which needs only
# pydantic and PyYAML) and its metadata.
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels ".[operator]"

FROM python:${PYTHON_VERSION}-slim-bookworm
# openssh-client: ssh-keygen makes the `<name>-ssh` key pair for launcher mpirun.
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssh-client \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 kubelora \
 && useradd --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin kubelora
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links /wheels "kubelora[operator]" \
 && python -c "import kubelora_operator.__main__, kopf, kubernetes"
ENV HOME=/tmp \
    TMPDIR=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["python", "-m", "kubelora_operator", "run"]
# The chart passes its own flags (--liveness, --standalone/--peering, --namespace ...).
CMD ["--liveness=http://0.0.0.0:8080/healthz", "--standalone"]
