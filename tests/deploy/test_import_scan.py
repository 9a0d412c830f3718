"""The import scanner's rule (import_scan.required_imports): what counts as an import the image must
provide, and what is optional (the code, or every caller of it, turns the feature off on ImportError)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .import_scan import required_imports

OPTIONAL_CALLER = """
class Client:
    def __init__(self):
        import {mod}

def start():
    try:
        return Client()
    except ImportError:
        return None
"""


@pytest.mark.parametrize(
    ("source", "required"),
    [
        ("import {mod}\n", True),
        ("def f():\n    import {mod}\n", True),  # runs in the image when called
        ("try:\n    import {mod}\nexcept ImportError:\n    {mod} = None\n", False),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import {mod}\n", False),
        (OPTIONAL_CALLER, False),  # every caller turns the feature off on ImportError
        (OPTIONAL_CALLER + "\nCLIENT = Client()\n", True),  # ... but one caller does not
        (
            "class C:\n    def run(self):\n        import {mod}\n\ndef g():\n    try:\n        C()\n"
            "    except ImportError:\n        pass\n",
            True,
        ),  # a method other than __init__: not run by C()
    ],
    ids=[
        "module-level",
        "in-function",
        "try-except",
        "type-checking",
        "caller-guarded",
        "one-unguarded-caller",
        "method-not-init",
    ],
)
def test_import_scanner(tmp_path: Path, source: str, required: bool) -> None:
    (tmp_path / "mod.py").write_text(source.format(mod="somedist"))
    assert ("somedist" in required_imports(tmp_path)) is required
