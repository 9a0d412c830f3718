"""Reading a Dockerfile as Docker does, without a Docker engine: its instructions, ARG and ENV defaults,
EXPOSEd ports, the kubelora extras it installs, its .dockerignore. Used by test_dockerfiles.py."""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path
from typing import Any

from .deploy_helpers import REPO

PYPROJECT = REPO / "pyproject.toml"


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


def pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    project: dict[str, Any] = tomllib.loads(PYPROJECT.read_text())["project"]
    return project


def pyproject_extras() -> dict[str, list[str]]:
    extras: dict[str, list[str]] = pyproject()["optional-dependencies"]
    return extras


def exposed(path: Path) -> set[int]:
    return {int(p) for ins, rest in instructions(path) if ins == "EXPOSE" for p in rest.split()}


def installed_extras(path: Path) -> set[str]:
    """The extras of every `pip install ".[a,b]"` / `"kubelora[a,b]"` in the Dockerfile."""
    text = " ".join(rest for ins, rest in instructions(path) if ins == "RUN")
    found = re.findall(r"""["']?(?:\.|kubelora)\[([a-z0-9_,-]+)\]["']?""", text)
    assert found, f"{path.name} installs no kubelora extras"
    return {e for group in found for e in group.split(",")}


def dockerignore(dockerfile: Path) -> list[str]:
    """The patterns of `<Dockerfile>.dockerignore` (the build context is the repository root)."""
    path = dockerfile.with_name(f"{dockerfile.name}.dockerignore")
    assert path.exists(), f"{path.name} missing (context is the repository root)"
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
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
