"""Names the operator gives things in pods: one definition per fact, imported by api, plan, wiring and validation.

Why a module of its own: these paths appear in the pod manifests (plan), in the environment and
commands (wiring), in the trainer config (api) and in the mount checks (validation); spelling them
once keeps those four in step.
"""

from __future__ import annotations

#: Pod paths the operator owns; a data volume may not be mounted on or under them.
CONFIG_DIR = "/etc/kubelora"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
SSH_DIR = "/etc/kubelora-ssh"
OUTPUT_DIR = "/output"
TMP_DIR = "/tmp"
CACHE_DIR = "/cache"
SHM_DIR = "/dev/shm"
#: The fetched `s3://` sources (fetch.py): the model-cache PVC or the run's per-run source directory.
SOURCES_DIR = "/sources"
#: `pvc://CLAIM/PATH` sources: each claim mounted read-only at SOURCE_PVCS_DIR/CLAIM.
SOURCE_PVCS_DIR = "/source-pvcs"
RESERVED_MOUNT_PATHS = (CONFIG_DIR, SSH_DIR, OUTPUT_DIR, TMP_DIR, CACHE_DIR, SHM_DIR, SOURCES_DIR, SOURCE_PVCS_DIR)
