"""Loading records from every supported source, one-line errors, and the deterministic split."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from kubelora_trainer.config import DataConfig
from kubelora_trainer.data import SAMPLE_DATA_DIR, DataError, load_records, read_records, split_records

ROWS = [{"instruction": f"task {i}", "input": "" if i % 2 else f"in {i}", "output": str(i)} for i in range(20)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_json_list_and_data_object(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    assert read_records(str(tmp_path / "a.json")) == ROWS
    assert read_records(str(tmp_path / "b.json")) == ROWS


def test_jsonl_and_jsonl_named_json(tmp_path: Path) -> None:
    assert read_records(str(write_jsonl(tmp_path / "a.jsonl", ROWS))) == ROWS
    assert read_records(str(write_jsonl(tmp_path / "a.json", ROWS))) == ROWS


def test_csv(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ROWS)
    assert read_records(str(p)) == ROWS


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    assert read_records(str(tmp_path / "a.parquet")) == ROWS


def test_datasets_dir_with_split(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "plain"))
    DatasetDict({"train": Dataset.from_list(ROWS[:5]), "test": Dataset.from_list(ROWS[5:])}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert read_records(str(tmp_path / "plain")) == ROWS
    assert read_records(str(tmp_path / "dd"), split="test") == ROWS[5:]
    with pytest.raises(DataError, match="no split 'validation'; splits: train, test"):
        read_records(str(tmp_path / "dd"), split="validation")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match=f"^data file not found: {missing}$"):
        read_records(str(missing))
    with pytest.raises(DataError, match="data file not found: data/train.csv"):
        read_records("data/train.csv")  # has an extension: never sent to the hub


def test_hub_id_failure_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def fail(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'someone/some-set' on the Hub\n(details)")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError) as err:
        read_records("someone/some-set", split="train")
    assert "not a local file or directory" in str(err.value) and "\n" not in str(err.value)


def test_sample_scheme(tmp_path: Path) -> None:
    assert read_records("sample://heldout.jsonl") == read_records(str(SAMPLE_DATA_DIR / "heldout.jsonl"))
    with pytest.raises(DataError, match="no such bundled sample file; available: heldout.jsonl, train.jsonl"):
        read_records("sample://nope.jsonl")


def test_unreadable_file(tmp_path: Path) -> None:
    p = tmp_path / "bin.jsonl"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=f"cannot read data file {p}: not UTF-8"):
        read_records(str(p))


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n')
    with pytest.raises(DataError, match=rf"^{p} line 3: invalid JSON"):
        read_records(str(p))
    p.write_text('{"instruction": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=rf"{p} line 2: expected a JSON object, got list"):
        read_records(str(p))


def test_unknown_extension_asks_for_format(tmp_path: Path) -> None:
    p = tmp_path / "data.txt"
    p.write_text("x")
    with pytest.raises(DataError, match="set data.format"):
        read_records(str(p))
    write_jsonl(p, ROWS)
    assert read_records(str(p), fmt="jsonl") == ROWS


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(DataError, match=f"^empty dataset after filtering: {p} has no records$"):
        load_records(DataConfig(path=str(p)), seed=0)


def test_split_is_deterministic_disjoint_and_complete() -> None:
    train, held = split_records(ROWS, 0.25, seed=42)
    assert (train, held) == split_records(ROWS, 0.25, seed=42)
    assert len(held) == 5 and len(train) == 15
    assert sorted(r["output"] for r in train + held) == sorted(r["output"] for r in ROWS)
    assert split_records(ROWS, 0.25, seed=43)[1] != held
    assert len(split_records(ROWS, 3, seed=0)[1]) == 3  # a count
    assert len(split_records(ROWS[:4], 0.1, seed=0)[1]) == 1  # small data still gets one eval row
    assert split_records(ROWS, 0, seed=0) == (ROWS, [])


def test_load_records_split_shuffle_and_limits(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = DataConfig(path=str(p), val_set_size=4, max_samples=10, max_eval_samples=3)
    train, held = load_records(cfg, seed=5)
    assert (train, held) == load_records(cfg, seed=5)
    assert len(train) == 10 and len(held) == 3
    all_train, all_held = load_records(DataConfig(path=str(p), val_set_size=4, max_eval_samples=None), seed=5)
    assert held == all_held[:3] and set(map(str, train)) <= set(map(str, all_train))
    assert not {r["output"] for r in all_train} & {r["output"] for r in all_held}
    ordered, _ = load_records(DataConfig(path=str(p), val_set_size=4, shuffle=False), seed=5)
    assert ordered == [r for r in ROWS if r in ordered] and ordered != all_train  # shuffle on by default
    with pytest.raises(DataError, match="none is left for training"):
        load_records(DataConfig(path=str(p), val_set_size=20), seed=0)


def test_eval_path_is_used_instead_of_split(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "t.jsonl", ROWS)
    e = write_jsonl(tmp_path / "e.jsonl", ROWS[:2])
    train, held = load_records(DataConfig(path=str(p), eval_path=str(e), shuffle=False), seed=0)
    assert train == ROWS and held == ROWS[:2]


def test_bundled_sample_data() -> None:
    import importlib.util

    train = read_records(str(SAMPLE_DATA_DIR / "train.jsonl"))
    held = read_records(str(SAMPLE_DATA_DIR / "heldout.jsonl"))
    assert len(train) == 2000 and len(held) == 200
    key = lambda r: (r["instruction"], r["input"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in held}
    assert all(set(r) == {"instruction", "input", "output"} and r["output"] for r in train + held)
    assert 0.1 < sum(1 for r in train if not r["input"]) / len(train) < 0.9  # both prompt variants
    spec = importlib.util.spec_from_file_location("sample_generate", SAMPLE_DATA_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.generate() == (train, held)  # the files are exactly what the generator writes
