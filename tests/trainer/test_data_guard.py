"""Records over data.maxRecordBytes are dropped unread and counted; memory stays bounded; all dropped is bad input.

Before the guard a 30 MB JSONL line was read whole, parsed, rendered and tokenized (4.9 GB peak) and
then silently dropped by the cutoff; a 300 MB line grew memory past 10 GB.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from kubelora_trainer.cli import EXIT_BAD_INPUT, main
from kubelora_trainer.config import DataConfig
from kubelora_trainer.data import DataError, RecordGuard, load_records, read_records

from .conftest import tiny_config

GOOD = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(40)]
HUGE_LINE = 17
HUGE_BYTES = 30 * 2**20


def _write_with_huge_line(path: Path, huge_bytes: int = HUGE_BYTES, at: int = HUGE_LINE) -> Path:
    """GOOD as JSONL with one record of ``huge_bytes`` as line ``at`` (written in pieces, never held whole)."""
    with open(path, "w") as fh:
        for i, rec in enumerate(GOOD, start=1):
            if i == at:
                fh.write('{"instruction": "')
                for _ in range(huge_bytes // 2**20):
                    fh.write("x" * 2**20)
                fh.write('", "output": "y"}\n')
            fh.write(json.dumps(rec) + "\n")
    return path


def test_jsonl_line_over_the_bound_is_dropped_and_named(tmp_path: Path) -> None:
    p = _write_with_huge_line(tmp_path / "train.jsonl", huge_bytes=3 * 2**20)
    guard = RecordGuard(2**20)
    assert read_records(str(p), guard=guard) == GOOD
    assert guard.dropped == 1 and guard.where == [f"train.jsonl line {HUGE_LINE}"]
    assert guard.message().startswith(f"dropped 1 record over 1 MiB (train.jsonl line {HUGE_LINE})")
    # Without a guard nothing is dropped (the reader itself has no hidden limit).
    assert len(read_records(str(p))) == len(GOOD) + 1


def test_bound_is_exact_and_line_numbers_stay_right(tmp_path: Path) -> None:
    def line_of(n: int) -> str:
        head = '{"instruction": "a", "output": "'
        return head + "b" * (n - len(head) - 2) + '"}'

    p = tmp_path / "d.jsonl"
    p.write_bytes((line_of(1024) + "\r\n" + line_of(1025) + "\n\n" + line_of(1024) + "\n" + line_of(2000)).encode())
    guard = RecordGuard(1024)
    rows = read_records(str(p), guard=guard)
    assert len(rows) == 2 and guard.where == ["d.jsonl line 2", "d.jsonl line 5"]


def test_other_formats_are_bounded_after_parsing(tmp_path: Path) -> None:
    big = {"instruction": "x" * 5000, "output": "y"}
    (tmp_path / "a.json").write_text(json.dumps([GOOD[0], big, GOOD[1]]))
    guard = RecordGuard(4096)
    assert read_records(str(tmp_path / "a.json"), guard=guard) == [GOOD[0], GOOD[1]] and guard.where == ["a.json record 1"]
    with open(tmp_path / "a.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows([GOOD[0], {**big, "input": ""}])
    guard = RecordGuard(4096)
    assert read_records(str(tmp_path / "a.csv"), guard=guard) == [GOOD[0]] and guard.where == ["a.csv record 1"]


def test_every_record_over_the_bound_is_one_line_error(tmp_path: Path) -> None:
    p = tmp_path / "big.jsonl"
    p.write_text("".join(json.dumps({"instruction": "x" * 3000, "output": str(i)}) + "\n" for i in range(3)))
    with pytest.raises(DataError, match=r"^every record of .*big.jsonl \(3\) is over data.maxRecordBytes \(1 KiB\)"):
        load_records(DataConfig(path=str(p), max_record_bytes=1024), seed=0)


_MEASURE = textwrap.dedent("""
    import json, sys
    from transformers import AutoTokenizer
    from kubelora_trainer.config import DataConfig
    from kubelora_trainer.data import build_datasets

    def status_kib(key):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))

    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    cfg = DataConfig(path=sys.argv[2], val_set_size=0, cutoff_len=64)
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
        fh.write("5")
    before = status_kib("VmRSS")
    data = build_datasets(cfg, tok, seed=0)
    print(json.dumps({"growth_kib": status_kib("VmHWM") - before, "stats": data.stats}))
""")


def test_huge_line_costs_no_memory(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Peak RSS growth of the whole data pipeline over a 30 MB line stays far below the line's size.

    Measured in a fresh process (peak RSS over the RSS before the pipeline); before the guard the same
    pipeline grew by ~90 bytes per byte of the line (891 MiB for a 10 MB line; 1.4 MiB for 30 MB with it).
    """
    p = _write_with_huge_line(tmp_path / "train.jsonl")
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(tiny_model_dir), str(p)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["stats"]["dropped_records"]["over_max_record_bytes"] == 1
    assert out["stats"]["dropped_records"]["first"] == [f"train.jsonl line {HUGE_LINE}"]
    assert out["stats"]["train_records"] == len(GOOD)
    assert out["growth_kib"] < 48 * 1024, f"peak RSS grew by {out['growth_kib'] / 1024:.0f} MiB"


def _run_cli(cfg: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["run", str(path)])
    return code, capsys.readouterr().err


@pytest.fixture(autouse=True)
def _termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kubelora_trainer.cli.TERMINATION_LOG", tmp_path / "termination-log")


def test_run_reports_the_dropped_record(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        caplog: pytest.LogCaptureFixture) -> None:
    p = _write_with_huge_line(tmp_path / "train.jsonl")
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", data={"path": str(p), "evalPath": None, "valSetSize": 4},
                      training={"maxSteps": 1}, evaluation={"exactMatch": False, "before": False})
    with caplog.at_level("WARNING", logger="kubelora"):
        code, err = _run_cli(cfg, tmp_path, capsys)
    assert code == 0, err[-3000:]
    assert f"dropped 1 record over 1 MiB (train.jsonl line {HUGE_LINE})" in caplog.text
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["dropped_records"] == {"over_max_record_bytes": 1, "max_record_bytes": 2**20,
                                                  "first": [f"train.jsonl line {HUGE_LINE}"]}


def test_run_with_every_record_too_big_is_bad_input(tiny_model_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "big.jsonl"
    p.write_text("".join(json.dumps({"instruction": "x" * 3000, "output": str(i)}) + "\n" for i in range(3)))
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", data={"path": str(p), "evalPath": None, "maxRecordBytes": 1024})
    code, err = _run_cli(cfg, tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.startswith("kubelora-train: error:")]
    assert code == EXIT_BAD_INPUT and len(lines) == 1 and "maxRecordBytes" in lines[0], err[-2000:]
