"""Reading records (of any `data.kind`) from files, `datasets` directories or the hub, and splitting them.

Records are plain dicts (column -> value) so templates, exact-match scoring and tests need no
`datasets` objects. Every failure becomes a one-line :class:`DataError` naming the file (and line).
The split and sampling are deterministic in ``seed`` so a resumed or re-run job sees the same rows,
and every rank of a distributed job computes the same split without communicating. JSON Lines files
are streamed line by line and lines over ``data.maxRecordBytes`` are skipped unread (see ``guard``).
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..config import SAMPLE_DATA_DIR, SAMPLE_SCHEME, DataConfig
from .errors import DataError
from .guard import RecordGuard, human_bytes

Record = dict[str, Any]
#: A per-record check (see ``kinds.RecordChecker``): raises a DataError naming the field; the reader adds where.
Check = Callable[[Record], None]

_EXTENSIONS = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
#: Bytes read at a time while skipping the rest of an over-long JSONL line (bounds memory, not speed).
_SKIP_CHUNK = 1 << 20
# A hub id is `name` or `owner/name`: no leading dot or slash, at most one slash, no file extension.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def load_records(
    cfg: DataConfig, seed: int, guard: RecordGuard | None = None, check: Check | None = None
) -> tuple[list[Record], list[Record]]:
    """Return ``(train, eval)`` records as configured by ``cfg``.

    Records over ``cfg.max_record_bytes`` are left out and counted in ``guard`` (pass one to report
    them); a source whose every record is over the bound is an error. ``check`` runs on every
    record kept, in file order, and its DataError is reported with the file and line.

    The eval part comes from ``cfg.eval_path`` when set, otherwise ``val_set_size`` rows of
    ``cfg.path`` are held out by a ``seed``-determined permutation (a fraction when < 1, a count
    when >= 1). Training rows are then shuffled with ``seed`` (if ``cfg.shuffle``) *before*
    ``max_samples`` is applied, so a small ``max_samples`` is a random subset, not the file's head.
    Eval rows keep file order and are cut to ``max_eval_samples``.
    """
    guard = guard if guard is not None else RecordGuard(cfg.max_record_bytes)
    records = _read_guarded(cfg.path, cfg, guard, check)
    if not records:
        raise DataError(f"empty dataset after filtering: {cfg.path} has no records")
    if cfg.eval_path:
        train = records
        eval_records = _read_guarded(cfg.eval_path, cfg, guard, check)
        if not eval_records:  # else: "eval loss" NaN before and after, and a run that measured nothing
            raise DataError(f"data.evalPath {cfg.eval_path} has no records: add held-out records or unset evalPath")
    else:
        train, eval_records = split_records(records, cfg.val_set_size, seed)
        if not train:
            raise DataError(
                f"empty dataset after filtering: valSetSize {cfg.val_set_size:g} holds out all {len(records)} "
                f"records of {cfg.path}, none is left for training"
            )
    if cfg.shuffle:
        train = list(train)
        random.Random(seed).shuffle(train)
    if cfg.max_samples is not None:
        train = train[: cfg.max_samples]
    if cfg.max_eval_samples is not None:
        eval_records = eval_records[: cfg.max_eval_samples]
    return train, eval_records


def _read_guarded(path: str, cfg: DataConfig, guard: RecordGuard, check: Check | None) -> list[Record]:
    """Read one source under the size bound; all of its records over the bound is a one-line error."""
    before = guard.dropped
    records = read_records(path, cfg.format, cfg.split, guard, check)
    if not records and guard.dropped > before:
        raise DataError(
            f"every record of {path} ({guard.dropped - before}) is over data.maxRecordBytes "
            f"({human_bytes(guard.limit)}); raise data.maxRecordBytes or shorten the records"
        )
    return records


def split_records(records: list[Record], val_set_size: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Split off a held-out part deterministically; both parts keep the original relative order.

    A fraction (< 1) is rounded to a count, with at least one held-out row whenever the fraction is
    positive and the data has two or more rows, so a small file still gets an eval set.
    """
    n = len(records)
    if val_set_size <= 0 or n == 0:
        return list(records), []
    if val_set_size < 1:
        n_eval = round(n * val_set_size)
        if n_eval == 0 and n >= 2:
            n_eval = 1
    else:
        n_eval = int(val_set_size)
    n_eval = min(n_eval, n)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    eval_records = [r for i, r in enumerate(records) if i in held]
    return train, eval_records


def read_records(
    path: str, fmt: str = "auto", split: str = "train", guard: RecordGuard | None = None, check: Check | None = None
) -> list[Record]:
    """Read every record of one source: a local file or directory, or else a hub dataset id.

    ``sample://NAME`` names a file of the bundled sample set. The config loader resolves it too,
    but a config validated without that step (e.g. from a resource spec) must still work here.
    With a ``guard``, records over its limit are left out and counted there. ``check`` runs on every
    record kept; a DataError from it becomes ``FILE line N: ...`` (``FILE record N`` where the format
    has no lines).
    """
    if path.startswith(SAMPLE_SCHEME):
        name = path[len(SAMPLE_SCHEME) :]
        if "/" in name or not (SAMPLE_DATA_DIR / name).is_file():
            available = ", ".join(sorted(f.name for f in SAMPLE_DATA_DIR.glob("*.jsonl")))
            raise DataError(f"{path}: no such bundled sample file; available: {available}")
        path = str(SAMPLE_DATA_DIR / name)
    p = Path(path).expanduser()
    if p.exists():
        kind = _detect_format(p, fmt)
        if kind == "datasets":
            return _checked(_guarded(_read_datasets_dir(p, split), guard, p.name), check, str(p))
        if not p.is_file():
            raise DataError(f"data path {path} is a directory but not one saved with `datasets` (format {fmt})")
        if kind == "json":
            return _read_json(p, guard, check)
        if kind == "jsonl":
            return _read_jsonl(p, guard, check)
        if kind == "csv":
            return _checked(_guarded(_read_csv(p), guard, p.name), check, str(p))
        return _checked(_guarded(_read_parquet(p), guard, p.name), check, str(p))
    if _looks_like_hub_id(path) and fmt in ("auto", "datasets"):
        return _checked(_guarded(_read_hub(path, split), guard, path), check, path)
    raise DataError(f"data file not found: {path}")


def _guarded(records: list[Record], guard: RecordGuard | None, source: str) -> list[Record]:
    """Apply the size bound to records parsed whole (every format but JSON Lines, which is streamed)."""
    return records if guard is None else guard.keep(records, source)


def _check_one(check: Check | None, record: Record, where: str) -> None:
    if check is None:
        return
    try:
        check(record)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None


def _checked(records: list[Record], check: Check | None, source: str) -> list[Record]:
    """Run ``check`` over records parsed whole; a failure names the record's position in ``source``."""
    for i, rec in enumerate(records):
        _check_one(check, rec, f"{source} record {i}")
    return records


def _looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and Path(path).suffix.lower() not in _EXTENSIONS


def _detect_format(p: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if p.is_dir():
        return "datasets"
    kind = _EXTENSIONS.get(p.suffix.lower())
    if kind is None:
        raise DataError(
            f"cannot tell the format of {p} from its extension; set data.format to one of json, jsonl, csv, "
            "parquet, datasets"
        )
    return kind


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"cannot read data file {p}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise DataError(f"cannot read data file {p}: {err.strerror or err}") from None


def _check_objects(rows: list[Any], p: Path) -> list[Record]:
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{p}: record {i} is a {type(row).__name__}, expected a JSON object")
    return rows


def _read_json(p: Path, guard: RecordGuard | None, check: Check | None) -> list[Record]:
    """A JSON list of objects or ``{"data": [...]}``; a `.json` file that is really JSONL also works.

    A JSON list is parsed whole (its records are size-checked after parsing): big data belongs in JSONL.
    """
    text = _read_text(p)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON Lines saved as .json
            del text
            return _read_jsonl(p, guard, check)
        raise DataError(f"{p} line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{p}: expected a JSON list of objects or an object with a 'data' list")
    return _checked(_guarded(_check_objects(obj, p), guard, p.name), check, str(p))


def _lines(p: Path, limit: int | None) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, bytes)`` per line, streamed; ``bytes`` is None for a line over ``limit`` bytes.

    An over-long line is skipped in bounded chunks, so memory stays at ``limit`` however long it is.
    """
    try:
        with open(p, "rb") as fh:
            lineno = 0
            while True:
                line = fh.readline(limit + 2) if limit is not None else fh.readline()  # +2: room for \r\n
                if not line:
                    return
                lineno += 1
                if limit is None or len(line.rstrip(b"\r\n")) <= limit:
                    yield lineno, line
                    continue
                while not line.endswith(b"\n"):
                    line = fh.readline(_SKIP_CHUNK)
                    if not line:
                        break
                yield lineno, None
    except OSError as err:
        raise DataError(f"cannot read data file {p}: {err.strerror or err}") from None


def _read_jsonl(p: Path, guard: RecordGuard | None, check: Check | None = None) -> list[Record]:
    """Parse JSON Lines one line at a time; lines over the guard's limit are counted, never parsed."""
    rows: list[Record] = []
    for lineno, raw in _lines(p, guard.limit if guard is not None else None):
        if raw is None:
            if guard is not None:
                guard.drop(f"{p.name} line {lineno}")
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"cannot read data file {p}: not UTF-8 text (line {lineno}, byte {err.start})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{p} line {lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p} line {lineno}: expected a JSON object, got {type(obj).__name__}")
        _check_one(check, obj, f"{p} line {lineno}")
        rows.append(obj)
    return rows


def _read_csv(p: Path) -> list[Record]:
    """Stream the rows (fields over csv's 128 KiB field limit are an error that names the line)."""
    rows: list[Record] = []
    try:
        with open(p, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            try:
                for row in reader:
                    if None in row:  # more cells than header columns
                        raise DataError(
                            f"{p} line {reader.line_num}: more values than the {len(reader.fieldnames or [])} columns"
                        )
                    rows.append(dict(row))
            except csv.Error as err:
                raise DataError(f"{p} line {reader.line_num}: invalid CSV ({err})") from None
    except UnicodeDecodeError:  # offsets are per decoded chunk, so no byte position here
        raise DataError(f"cannot read data file {p}: not UTF-8 text") from None
    except OSError as err:
        raise DataError(f"cannot read data file {p}: {err.strerror or err}") from None
    return rows


def _read_parquet(p: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a trainer dependency
        raise DataError(f"reading {p} needs pyarrow (pip install 'kubelora[trainer]')") from None
    try:
        return pq.read_table(p).to_pylist()
    except OSError as err:
        raise DataError(f"cannot read Parquet file {p}: {err}") from None
    except Exception as err:  # pyarrow raises ArrowInvalid (a ValueError) for non-Parquet bytes
        raise DataError(f"cannot read Parquet file {p}: {err}") from None


def _select_split(ds: Any, split: str, where: str) -> Any:
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{where} has no split {split!r}; splits: {', '.join(ds.keys())}")
        return ds[split]
    return ds


def _read_datasets_dir(p: Path, split: str) -> list[Record]:
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{p} is not a directory saved with `datasets` save_to_disk ({err})") from None
    return list(_select_split(ds, split, str(p)).to_list())


def _read_hub(dataset_id: str, split: str) -> list[Record]:
    """Load a hub dataset; tried only when the path does not exist locally and looks like an id."""
    from datasets import load_dataset

    try:
        ds = load_dataset(dataset_id, split=split)
    except Exception as err:  # network, auth, unknown id, unknown split: all one message for the user
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"data path {dataset_id!r} is not a local file or directory, and loading it as a hub dataset "
            f"(split {split!r}) failed: {reason}"
        ) from None
    return list(ds.to_list())
