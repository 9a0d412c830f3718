# kubelora operator: Python + kopf + the kubernetes client, no torch (the `operator` extra only).
#
#   bash scripts/build-images.sh                # the supported way (offline recipe, lock, caching)
#   DOCKER_BUILDKIT=1 docker build -f docker/operator.Dockerfile -t kubelora/operator:0.1.0 .   # by hand
#
# Runs as uid 65532 with a read-only root filesystem; /tmp must be a writable mount (the chart mounts an
# emptyDir: ssh-keygen writes mpirun key pairs there). kopf's liveness endpoint listens on 8080.
# Any Debian 12 (bookworm) image with python3 (3.11) and its venv module serves as BASE_IMAGE: the
# default, or the local one scripts/build-images.sh makes with debootstrap where no registry is reachable.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# PIP_INDEX_URL / PIP_CERT are read by pip from the environment (ARGs are set there during RUN).
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
# Every dependency pinned by docker/constraints.txt (the versions the test suite runs with).
COPY docker/constraints.txt /tmp/constraints.txt
RUN python3 -m venv /opt/venv
WORKDIR /src
# Both Python packages: the operator imports kubelora_trainer.config (needs only pydantic and PyYAML).
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -c /tmp/constraints.txt ".[operator]" \
 && /opt/venv/bin/pip check

FROM ${BASE_IMAGE}
# openssh-client: ssh-keygen makes the `<name>-ssh` key pair for launcher mpirun. Pinned to bookworm's
# current release; empty takes whatever the archive has (a new Debian point release drops old versions).
ARG OPENSSH_CLIENT_VERSION=1:9.2p1-2+deb12u10
RUN apt-get update \
 && apt-get install -y --no-install-recommends "openssh-client${OPENSSH_CLIENT_VERSION:+=$OPENSSH_CLIENT_VERSION}" \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 kubelora \
 && useradd --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin kubelora
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/venv \
    HOME=/tmp \
    TMPDIR=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -c "import kubelora_operator.__main__, kopf, kubernetes" && command -v ssh-keygen
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["python", "-m", "kubelora_operator", "run"]
# The chart passes its own flags (--liveness, --standalone/--peering, --namespace ...).
CMD ["--liveness=http://0.0.0.0:8080/healthz", "--standalone"]
