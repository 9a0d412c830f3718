"""Who keeps a run directory when two LoRAFineTunes name the same claim and subPath (pure decision).

cffc930: both were accepted; the second resumed from the first's checkpoint and overwrote its config.
"""

from __future__ import annotations

import pytest
from kubelora_operator.run_dirs import Claimant, RunDir, claimant, holder, in_use_message

from . import raw_spec

T0, T1 = "2024-05-01T10:00:00Z", "2024-05-01T10:00:05Z"


def _out(output: dict) -> dict:
    return {**raw_spec(), "output": output}


def _pvc(sub: str | None = None, claim: str = "runs") -> dict:
    return _out({"pvc": {"claimName": claim, **({"subPath": sub} if sub else {})}})


def test_run_dir_is_the_claim_and_effective_sub_path() -> None:
    a = claimant("a", "ns", T0, _pvc("shared"), started=False, refused=False)
    assert a is not None and a.run_dir == RunDir("runs", "shared")
    default = claimant("b", "ns", T0, _pvc(), started=False, refused=False)
    assert default is not None and default.run_dir == RunDir("runs", "ns/b")  # <namespace>/<name>
    s3 = claimant("c", "ns", T0, _out({"s3": {"uri": "s3://b/p", "workdirPvc": {"claimName": "work", "subPath": "x"}}}),
                  started=False, refused=False)
    assert s3 is not None and s3.run_dir == RunDir("work", "x")
    assert claimant("d", "ns", T0, _out({"s3": {"uri": "s3://b/p"}}), started=False, refused=False) is None  # emptyDir
    assert claimant("e", "ns", T0, {"nonsense": 1}, started=False, refused=False) is None
    # Refused for another reason before start: holds nothing (a missing Secret never blocks a valid run).
    assert claimant("f", "ns", T0, _pvc("shared"), started=False, refused=True) is None
    assert claimant("f", "ns", T0, _pvc("shared"), started=True, refused=True) is not None


def test_overlap_same_or_nested_directories_of_one_claim() -> None:
    assert RunDir("runs", "a").overlaps(RunDir("runs", "a"))
    assert RunDir("runs", "a").overlaps(RunDir("runs", "a/b")) and RunDir("runs", "a/b").overlaps(RunDir("runs", "a"))
    assert not RunDir("runs", "a").overlaps(RunDir("runs", "ab"))
    assert not RunDir("runs", "a").overlaps(RunDir("other", "a"))


def test_older_wins_then_started_wins_and_the_answer_is_the_same_from_both_sides() -> None:
    d = RunDir("runs", "shared")
    old, new = Claimant("zeta", T0, False, d), Claimant("alpha", T1, False, d)
    assert holder(new, [old, new]) == old and holder(old, [old, new]) is None
    # Same second: the name decides, from both sides alike.
    x, y = Claimant("x", T0, False, d), Claimant("y", T0, False, d)
    assert holder(y, [x]) == x and holder(x, [y]) is None
    # A started resource keeps its directory against an older one that has not started.
    running = Claimant("beta", T1, True, d)
    assert holder(old, [running]) == running and holder(running, [old]) is None
    # Unrelated directories never conflict; several rivals: the strongest is named.
    assert holder(new, [Claimant("o", T0, True, RunDir("runs", "other"))]) is None
    assert holder(new, [old, running, Claimant("b", T0, False, RunDir("runs", "shared/sub"))]) == running


def test_in_use_message_names_the_directory_and_the_other_resource() -> None:
    me, other = Claimant("b", T1, False, RunDir("runs", "shared")), Claimant("a", T0, True, RunDir("runs", "shared"))
    msg = in_use_message(me, other)
    assert "pvc://runs/shared" in msg and "LoRAFineTune a (started first)" in msg and "deleted" in msg
    nested = in_use_message(Claimant("b", T1, False, RunDir("runs", "s/x")), Claimant("a", T0, False, RunDir("runs", "s")))
    assert "pvc://runs/s/x (overlaps pvc://runs/s)" in nested and "created earlier" in nested


def test_a_spec_naming_no_claim_has_no_run_dir_without_being_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubelora_operator import run_dirs

    s3 = _out({"s3": {"uri": "s3://b/p"}})
    work = _out({"s3": {"uri": "s3://b/p", "workdirPvc": {"claimName": "work", "subPath": "x"}}})
    assert run_dirs.run_dir_of_spec("a", "ns", work) == RunDir("work", "x")
    assert run_dirs.run_dir_of_spec("a", "ns", _pvc("shared")) == RunDir("runs", "shared")

    def no_parse(raw: dict) -> None:
        raise AssertionError("parsed")

    monkeypatch.setattr(run_dirs, "parse_spec", no_parse)
    assert run_dirs.run_dir_of_spec("a", "ns", s3) is None
