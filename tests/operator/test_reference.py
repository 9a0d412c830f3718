"""docs/reference.md: generated from the models (through the CRD schema), committed, never stale."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubelora_operator.reference import DEFAULT_PATH, main, render


def test_committed_reference_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check"]) == 0, capsys.readouterr().err + " (regenerate: python -m kubelora_operator.reference)"


def test_check_fails_on_a_stale_file_and_writing_fixes_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reference.md"
    assert main(["--check", "--out", str(out)]) == 1  # missing
    out.write_text(render().replace("`8`", "`16`", 1))
    assert main(["--check", "--out", str(out)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main(["--out", str(out)]) == 0 and main(["--check", "--out", str(out)]) == 0
    assert out.read_text() == render() == render()  # deterministic


def test_fields_carry_type_default_bounds_and_description() -> None:
    text = render()
    rows: dict[str, str] = {}
    for line in text.splitlines():  # spec comes first: a name used again in status keeps its spec row
        if line.startswith("| `"):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert "`8`" in rows["`r`"] and "integer" in rows["`r`"] and ">= 1; <= 1024" in rows["`r`"]
    assert "`0.0002`" in rows["`learningRate`"] and "> 0" in rows["`learningRate`"]
    assert "**required**" in rows["`data`"] and "[object](#specdata)" in rows["`data`"]
    assert '`"auto"`, `"xpu"`, `"cpu"`' in rows["`device`"]
    assert "| number or null | `1.0` |" in rows["`maxGradNorm`"]  # null disables clipping
    # Every object has its own table, reachable through the anchor its parent links to.
    for anchor in ("spec", "speclora", "specoutputs3", "specdistributedenv", "status", "statusprogress"):
        assert f'<a id="{anchor}"></a>' in text, anchor
    assert "### `status.progress`" in text and "| `trainLoss` | number |" in text
    assert DEFAULT_PATH.name == "reference.md" and DEFAULT_PATH.parent.name == "docs"
