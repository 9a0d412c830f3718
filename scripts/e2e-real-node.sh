#!/usr/bin/env bash
# The whole product in real containers on a real single-node cluster, checked from the outside
# (issue 11; tests/realnode/e2e.py says what it starts and checks). Needs root.
#
#   sudo bash scripts/e2e-real-node.sh [--yes] [--faults] [--timeout SECONDS] [--skip-build] [--tag T]
#
# --faults adds the fault run after the happy path, in the same cluster (tests/realnode/faults.py):
# docker kill of a worker after the first checkpoint, the operator pod deleted mid-run, S3 stopped
# during the upload; each outcome counts in the final line.
#
# It installs and starts a container engine (Debian's docker.io) and changes iptables, so it runs only
# when asked: --yes, KUBELORA_E2E_REAL_NODE=1, or CI=true. Needs the cluster binaries
# (bash tests/cluster/build.sh --node) and the venv (bash scripts/setup.sh). Last line:
# `N passed, M failed`; exit status 0 only when nothing failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || { echo "e2e-real-node: no $PY: run bash scripts/setup.sh first" >&2; exit 2; }
# It prints what it changes on the machine first, then refuses unless root and asked.
exec "$PY" -m tests.realnode.e2e "$@"
