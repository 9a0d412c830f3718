"""What an image must install for a package: the third-party modules its code imports (optional ones
left out) and the distributions a set of requirements pulls in. Used by test_dockerfiles.py; the rule for
"optional" is pinned down by test_import_scan.py."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(reqs: list[str], extras: set[str] | None = None) -> set[str]:
    """Distribution names reachable from requirement strings (through the installed metadata)."""
    seen: set[str] = set()
    todo = [(Requirement(r), extras or set()) for r in reqs]
    while todo:
        req, _ = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = norm(req.name)
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


def _catches_import_error(node: ast.Try) -> bool:
    return any(
        h.type is not None and any(n in ast.unparse(h.type) for n in ("ImportError", "ModuleNotFoundError"))
        for h in node.handlers
    )


class _Scan(ast.NodeVisitor):
    """One pass over a module: the names it uses (each noted as guarded, i.e. inside the body of a
    `try/except ImportError`, or not) and its imports, each with the unit it runs in: the module-level
    function, or the module-level class for code directly in its `__init__` (calling the class runs it)."""

    def __init__(self) -> None:
        self.guarded = 0
        self.unit: str | None = None
        self.depth = 0  # def/class nesting
        self.uses: list[tuple[str, bool]] = []
        self.imports: list[tuple[str, bool, str | None]] = []  # (top-level module, guarded, unit)

    def visit_Try(self, node: ast.Try) -> None:
        catches = _catches_import_error(node)
        self.guarded += catches
        for stmt in node.body:
            self.visit(stmt)
        self.guarded -= catches
        for part in (node.handlers, node.orelse, node.finalbody):
            for stmt in part:
                self.visit(stmt)

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" not in ast.unparse(node.test):
            self.generic_visit(node)

    def _scope(self, node: ast.AST, unit: str | None) -> None:
        outer = self.unit
        self.unit, self.depth = unit, self.depth + 1
        self.generic_visit(node)
        self.unit, self.depth = outer, self.depth - 1

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if self.depth == 0:
            self._scope(node, node.name)
        elif self.depth == 1 and node.name == "__init__" and self.unit is not None:
            self._scope(node, self.unit)  # the class's own unit
        else:
            self._scope(node, None)  # a method or nested def runs on other paths: no caller guard

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._scope(node, node.name if self.depth == 0 else None)

    def visit_Name(self, node: ast.Name) -> None:
        self.uses.append((node.id, bool(self.guarded)))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.uses.append((node.attr, bool(self.guarded)))
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.imports.append((alias.name.split(".")[0], bool(self.guarded), self.unit))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self.imports.append((node.module.split(".")[0], bool(self.guarded), self.unit))


def required_imports(package: Path) -> set[str]:
    """Top-level third-party modules the package imports. Every import counts, also inside functions
    (code that runs in the image needs it), but an optional one: under `try: ... except ImportError`
    (a feature that turns itself off with a clear message), under `if TYPE_CHECKING:`, or in a function
    (a class's `__init__`) that the package only ever uses inside such a `try` (the caller turns it off)."""
    scans = []
    for py in sorted(package.rglob("*.py")):
        scan = _Scan()
        scan.visit(ast.parse(py.read_text()))
        scans.append(scan)
    unguarded_uses = {name for s in scans for name, guarded in s.uses if not guarded}
    guarded_uses = {name for s in scans for name, guarded in s.uses if guarded}
    caller_guarded = guarded_uses - unguarded_uses
    mods = {
        mod
        for s in scans
        for mod, guarded, unit in s.imports
        if not guarded and (unit is None or unit not in caller_guarded)
    }
    own = {"kubelora_operator", "kubelora_trainer"}
    return {m for m in mods if m not in sys.stdlib_module_names and m not in own and m != "__future__"}
